"""Which way of training the linear head holds up on images it was not tuned on? Head variants on cached features.

    python3 benchmarks/head_variants.py RUN HELD_OUT [--variants base,last,wd=1,ls=0.1] [--seeds 0,1,2]
    python3 benchmarks/head_variants.py RUN HELD_OUT --variants last,wd=1+last --against last

RUN is a binary `--recipe linear` run (one network or an ensemble) trained on a shifted split's
train side (benchmarks/shift_split.py), HELD_OUT that split's val/. The features of RUN's
training views, of its validation images and of HELD_OUT's images come from the feature store
as training computes them (from RUN's cache, so seconds where it is still there). Then, per
variant and seed, every member's head is trained again by a plain loop that mirrors
training/linear.py's `train_head` (standardised features, zero start, AdamW, a cosine over the
epochs, class-weighted cross-entropy, batches of 128) with one thing changed; an ensemble's
logits are the mean of its members'. Variants, joined with `+`: `base` (each head at its
epoch with the best validation AUC, as every member was until session 12 and a single network
still is); `last` (the last epoch: an ensemble's members now); `swa=N` (the mean of the last N
epochs' weights); `wd=X` (AdamW weight decay); `ls=X` (label smoothing); `mix=A` (mixup of
standardised features, Beta(A, A)); `drop=P` (dropout on the features); `epochs=N`; `lr=X`;
`cw=X` (class weights to the power X: 0 is none); `teach=T` (distillation: every member learns
the soft targets, at temperature T, of the ensemble of `last` heads on the training rows, so
each member's column shows what a single network distilled from the ensemble ranks).

Prints, per variant and seed, the validation and held-out AUC, accuracy, sensitivity and
specificity at the threshold chosen on validation (Youden's J, the library's `choose_threshold`
and `compute_metrics` on the softmax of the mean logits), each member's held-out AUC, and the
paired stratified-bootstrap difference in held-out AUC against `--against` (default `base`) at
the same seed (benchmarks/ensemble.py's `paired_auc_difference`, as compare_runs.py reports it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ensemble import paired_auc_cell  # benchmarks/ensemble.py, beside this file
from xferlearn.config import TrainConfig
from xferlearn.data.contrast import is_grayscale_folder
from xferlearn.data.folders import scan
from xferlearn.data.layout import find_layout, training_files
from xferlearn.data.images import DecodeCache
from xferlearn.evaluation.metrics import compute_metrics
from xferlearn.evaluation.thresholds import choose_threshold
from xferlearn.models.backbones import create_model
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.models.ensemble import Ensemble, member_names
from xferlearn.rundir import RunDir
from xferlearn.training.linear import compute_features
from xferlearn.training.pipeline import choose_for_images

DEFAULTS = dict(wd=1e-4, ls=0.0, mix=0.0, drop=0.0, swa=0, last=False, epochs=30, lr=1e-3, cw=1.0, teach=0.0)


def parse(variant: str, config: TrainConfig) -> dict:
    options = dict(DEFAULTS, wd=config.weight_decay, epochs=config.epochs, lr=config.lr)
    for part in filter(lambda p: p != "base", variant.split("+")):
        if part == "last":
            options["last"] = True
            continue
        key, _, value = part.partition("=")
        if key not in DEFAULTS or key == "last":
            sys.exit(f"head_variants: unknown variant {part!r}")
        options[key] = type(DEFAULTS[key])(float(value))
    return options


def member_features(run: str, held_out: str):
    """Per member: (training rows, labels), (validation rows, labels), (held-out rows, labels)."""
    checkpoint = load_checkpoint(run)
    config = TrainConfig.from_dict(checkpoint.config)
    model, raw_preprocessing, _ = create_model(config.backbone, config.weights, len(checkpoint.classes),
                                               config.image_size)
    cache = DecodeCache.of(raw_preprocessing, config.cache_dir)
    layout = find_layout(config.data, config.val)
    roots = list(layout.train_roots) + ([layout.val_root] if layout.val_root is not None else [])
    manifest = scan(roots, cache, classes=checkpoint.classes)
    split = json.loads(RunDir(run).split.read_text())
    row = {digest: i for i, digest in enumerate(manifest.digests)}
    train_idx, val_idx = (np.array([row[s["digest"]] for s in split[side]]) for side in ("train", "val"))
    preprocessing = choose_for_images(config, is_grayscale_folder(training_files(layout)), cache, raw_preprocessing)
    held = scan([held_out], cache, classes=checkpoint.classes, dedupe=False)  # every file, as compare_runs.py
    everything = np.arange(len(held.samples))
    if isinstance(model, Ensemble):
        members = [(f"{name}@{m.size}", m, tag)
                   for name, m, tag in zip(member_names(checkpoint.arch), model.members, model.weights_tags)]
    else:
        members = [(checkpoint.arch, model, checkpoint.weights)]
    out = []
    for arch, member, tag in members:
        views, val_rows = compute_features(member, manifest, train_idx, val_idx, config, arch, tag, preprocessing,
                                           cache)
        [(_, held_rows)], _ = compute_features(member, held, everything, everything[:0], replace(config, views=0),
                                               arch, tag, preprocessing, cache, scored_training=True)
        matrix = lambda table: table.read(np.arange(len(table)))  # noqa: E731
        out.append(((np.concatenate([matrix(t) for _, t in views]),
                     np.concatenate([manifest.labels[idx] for idx, _ in views])),
                    (matrix(val_rows), manifest.labels[val_idx]), (matrix(held_rows), held.labels)))
    return out, checkpoint.positive_index


def train_head(train, val, held, options: dict, seed: int, teacher: torch.Tensor | None = None,
               trace: list | None = None):
    """Validation, held-out and training-row logits of one member's head, trained as the
    variant says (`teacher`: logits on the training rows to distil from, with `teach=T`; `trace`:
    a list that gets the (validation, held-out) logits after every epoch)."""
    (x, y), (x_val, y_val), (x_held, _) = train, val, held
    mean, std = x.mean(0), x.std(0)
    std = np.maximum(std, 0.1 * std.mean() + 1e-12)
    z = lambda rows: torch.from_numpy(((rows - mean) / std).astype(np.float32))  # noqa: E731
    xs, ys, xv = z(x), torch.from_numpy(y).long(), z(x_val)
    weight = torch.tensor(len(y) / (2 * np.bincount(y, minlength=2)), dtype=torch.float32) ** options["cw"]
    head = torch.nn.Linear(xs.shape[1], 2)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=options["lr"], weight_decay=options["wd"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options["epochs"])
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    loss = lambda out, target: F.cross_entropy(out, target, weight=weight, label_smoothing=options["ls"])  # noqa
    temperature = options["teach"]
    soft = None if teacher is None else (teacher / temperature).softmax(1)
    torch.manual_seed(seed)  # dropout masks and mixup partners: the same for the same seed

    def batch_loss(rows, target, batch):
        if soft is not None:  # Hinton et al. (2015): soft targets at T, scaled by T^2; rows class-weighted
            per_row = -(soft[batch] * F.log_softmax(head(rows) / temperature, 1)).sum(1) * weight[target]
            return per_row.sum() / weight[target].sum() * temperature ** 2
        if options["drop"]:
            rows = F.dropout(rows, options["drop"])
        if options["mix"]:
            share, other = float(rng.beta(options["mix"], options["mix"])), torch.randperm(len(batch))
            out = head(share * rows + (1 - share) * rows[other])
            return share * loss(out, target) + (1 - share) * loss(out, target[other])
        return loss(head(rows), target)

    best, kept, averaged = -1.0, None, []
    for epoch in range(options["epochs"]):
        for batch in torch.randperm(len(xs), generator=generator).split(128):
            value = batch_loss(xs[batch], ys[batch], batch)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        schedule.step()
        state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if options["swa"] and epoch >= options["epochs"] - options["swa"]:
            averaged.append(state)
        with torch.no_grad():
            auc = roc_auc_score(y_val, head(xv).softmax(1)[:, 1].numpy())
            if trace is not None:
                trace.append((head(xv).numpy(), head(z(x_held)).numpy()))
        if auc > best:
            best, kept = auc, state
    if averaged:
        head.load_state_dict({k: torch.stack([s[k] for s in averaged]).mean(0) for k in averaged[0]})
    elif not options["last"]:
        head.load_state_dict(kept)
    with torch.no_grad():
        return head(xv).numpy(), head(z(x_held)).numpy(), head(xs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("held_out")
    parser.add_argument("--variants", default="base,last")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--against", default="base", help="the variant the others are paired with")
    parser.add_argument("--boot", type=int, default=2000)
    args = parser.parse_args()
    print("command: python3 " + shlex.join(sys.argv))
    members, positive = member_features(args.run, args.held_out)
    if positive is None:
        sys.exit("head_variants: a binary run is needed (AUC of the positive class)")
    checkpoint = load_checkpoint(args.run)
    config, classes = TrainConfig.from_dict(checkpoint.config), checkpoint.classes
    (x_train, _), (_, y_val), (_, y_held) = members[0]
    is_pos_val = (y_val == positive).astype(int)
    print(f"training rows (views included): {len(x_train)}; validation: {len(y_val)} images; held out: "
          f"{len(y_held)} images ({(y_held == positive).sum()} positive)\n")
    print(f"| variant | seed | validation AUC | held-out AUC | accuracy | sensitivity | specificity | members' "
          f"held-out AUC | AUC - {args.against} (95% CI), ahead in |\n|---|---|---|---|---|---|---|---|---|")
    probabilities = lambda logits: torch.softmax(torch.as_tensor(logits), 1).numpy()  # noqa: E731
    reference = {}
    for variant in args.variants.split(","):
        options = parse(variant, config)
        for seed in map(int, args.seeds.split(",")):
            teacher = None
            if options["teach"]:
                taught = parse("last", config)
                teacher = torch.stack([train_head(*member, taught, seed)[2] for member in members]).mean(0)
            logits = [train_head(*member, options, seed, teacher)[:2] for member in members]
            val_probs, held_probs = (probabilities(np.mean([pair[k] for pair in logits], 0)) for k in (0, 1))
            # The ensemble's rule: Youden's J on the validation probabilities of the mean logits.
            threshold = choose_threshold(is_pos_val, val_probs[:, positive], "youden")
            held = compute_metrics(y_held, held_probs, classes, threshold, "Youden's J on validation", positive)
            versus = ""
            if variant == args.against:
                reference[seed] = held_probs[:, positive]
            elif seed in reference:
                versus = paired_auc_cell((y_held == positive).astype(int), held_probs[:, positive], reference[seed],
                                         args.boot)
            members_auc = ", ".join(f"{roc_auc_score(y_held == positive, probabilities(h)[:, positive]):.4f}"
                                    for _, h in logits)
            print(f"| {variant} | {seed} | {roc_auc_score(is_pos_val, val_probs[:, positive]):.4f} | "
                  f"{held['auc']:.4f} | {held['accuracy']:.4f} | {held['sensitivity']:.4f} | "
                  f"{held['specificity']:.4f} | {members_auc} | {versus} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
