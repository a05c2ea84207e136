"""Score `--recipe linear` runs on a held-out folder from cached frozen features, and compare threshold rules.

    python3 benchmarks/conflict_linear.py SPLIT/val RUN [RUN ...] [--shift-preset robust --shift-views 1]

A linear run is its frozen backbone plus the trained head, so its probabilities on a folder
are head(features) / temperature: the features are computed once per image (in the shared
feature store, as training does) and every further run on the same backbone is scored in
seconds. This is the benchmark's shortcut for the conflict split of shift_split.py; the
product's own figure is `xferlearn evaluate RUN SPLIT/val` (same network, fp32 throughout).

For each run it prints AUC, accuracy, sensitivity and specificity on the folder at the run's
own threshold, and at thresholds from other rules, each chosen on the run's *own* random
validation split only (never on the folder scored):
- `youden-val`: Youden's J on the clean validation images (the run's threshold);
- `0.5`: the balanced-loss model's natural cut;
- `youden-shifted`: Youden's J on the validation images pooled with `--shift-views`
  augmented views of them (`--shift-preset`), a validation set that varies the acquisition.
With several runs, the mean of their probabilities (an ensemble) is scored too, its threshold
chosen by Youden's J on the mean of their validation probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from xferlearn.data.folders import scan  # noqa: E402
from xferlearn.data.images import DecodeCache  # noqa: E402
from xferlearn.evaluation.metrics import compute_metrics  # noqa: E402
from xferlearn.evaluation.thresholds import apply_temperature, choose_threshold  # noqa: E402
from xferlearn.models.checkpoint import load_checkpoint  # noqa: E402
from xferlearn.models.features import FeatureExtractor, FeatureStore, extract, feature_key  # noqa: E402
from xferlearn.models.inference import default_device, resolve_precision  # noqa: E402


def features_of(checkpoint, paths, digests, cache, view=0, preset="none", seed=0):
    precision = resolve_precision(checkpoint.config.get("precision", "auto"), default_device())
    store = FeatureStore(feature_key(checkpoint.arch, checkpoint.weights, checkpoint.preprocessing, precision))
    extractor = FeatureExtractor(checkpoint.build_model(), checkpoint.preprocessing, precision)
    return extract(extractor, paths, digests, cache, view=view, preset=preset, seed=seed, store=store)


def probabilities(checkpoint, features) -> np.ndarray:
    model = checkpoint.build_model()
    with torch.inference_mode():
        logits = model.get_classifier()(torch.from_numpy(features)).numpy()
    return apply_temperature(logits, checkpoint.temperature)


def row(name, y, probs, classes, threshold) -> dict:
    m = compute_metrics(y, probs, classes, threshold, "")
    return {"name": name, "auc": m["auc"], "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
            "specificity": m["specificity"], "threshold": threshold}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--shift-preset", default="robust")
    parser.add_argument("--shift-views", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows, folder_probs, val_probs = [], [], []
    for run in args.runs:
        checkpoint = load_checkpoint(run)
        pos, classes = checkpoint.positive_index, checkpoint.classes
        pre = checkpoint.preprocessing
        cache = DecodeCache.of(pre)
        manifest = scan(args.folder, cache, classes=classes, dedupe=False)
        y = manifest.labels
        probs = probabilities(checkpoint, features_of(checkpoint, manifest.paths, manifest.digests, cache))
        val = json.loads((run / "split.json").read_text())["val"]
        vpaths, vdigests = [v["path"] for v in val], [v["digest"] for v in val]
        vy = np.array([v["label"] for v in val])
        vprobs = probabilities(checkpoint, features_of(checkpoint, vpaths, vdigests, cache))
        shifted = [vprobs] + [probabilities(checkpoint, features_of(checkpoint, vpaths, vdigests, cache, view=k,
                                                                    preset=args.shift_preset, seed=1000))
                              for k in range(1, args.shift_views + 1)]
        t_shift = choose_threshold(np.tile(vy == pos, len(shifted)).astype(int), np.concatenate(shifted)[:, pos])
        name = run.name
        rows.append(row(f"{name} youden-val", y, probs, classes, checkpoint.threshold))
        rows.append(row(f"{name} 0.5", y, probs, classes, 0.5))
        rows.append(row(f"{name} youden-shifted({args.shift_preset}x{args.shift_views})", y, probs, classes, t_shift))
        rows[-3]["val_auc"] = compute_metrics(vy, vprobs, classes, checkpoint.threshold, "")["auc"]
        folder_probs.append(probs)
        val_probs.append((vdigests, vy, vprobs))
    if len(args.runs) > 1 and all(v[0] == val_probs[0][0] for v in val_probs):
        vy, mean_val = val_probs[0][1], np.mean([v[2] for v in val_probs], axis=0)
        t = choose_threshold((vy == pos).astype(int), mean_val[:, pos])
        rows.append(row("ensemble (mean) youden-val", y, np.mean(folder_probs, axis=0), classes, t))
        rows[-1]["val_auc"] = compute_metrics(vy, mean_val, classes, t, "")["auc"]
    print("| run, threshold rule | conflict AUC | accuracy | sensitivity | specificity | threshold | random-val AUC |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['auc']:.4f} | {r['accuracy']:.4f} | {r['sensitivity']:.4f} | "
              f"{r['specificity']:.4f} | {r['threshold']:.3f} | {r.get('val_auc') and round(r['val_auc'], 4)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
