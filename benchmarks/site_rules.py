"""How should `calibrate` use a small labelled sample of a site? Threshold rules compared by simulation.

    python3 benchmarks/site_rules.py RUN POOL [--site clean --site noise:2 ...] [--n 100] [--draws 200]
                                     [--scores FILE.npz]

POOL is a labelled folder of class folders the run was not tuned on (a grouped or shifted
held-out split from benchmarks/shift_split.py; never a test split). Each `--site` is POOL as it
is (`clean`) or under one of the stress test's shifts at a severity (`SHIFT:SEVERITY`, the
pixels of evaluation/corruptions.py) standing for another site's acquisition. Some shifts
(noise, low contrast, heavy JPEG) leave the ranking nearly intact but make normal images score
higher, which is what the held-back chest X-ray test split does to a threshold chosen on
validation; `xferlearn stress` shows which shifts do that to a given run.

The run scores every image of a site once. Then, `draws` times, a sample of n images is drawn
(stratified by class in the site's own proportions, as a user labelling what arrives would
get; at least 20 per class, calibrate's minimum), each rule picks a threshold on the sample,
and the rest of the site is judged at that threshold. The rules:
- `keep`: the run's own validation threshold (no calibration);
- `site`: Youden's J on the sample (`xferlearn calibrate --always-move`);
- `gated`: the sample's threshold only where its bootstrap 95% interval (calibrate's
  `threshold_interval`) excludes the run's threshold; the run's threshold otherwise (what
  `xferlearn calibrate` does by default since this study).
Calibrate also refits the temperature; a temperature does not change which images Youden's J
separates, so the study leaves it out. Prints per site and rule the mean accuracy, balanced
accuracy (what Youden's J maximises; accuracy also rewards calling everything the majority
class), sensitivity and specificity on the rest over the draws, and the 10th percentiles of
accuracy and balanced accuracy (a user's unlucky sample). `--scores` keeps the images' scores
in a file and reuses them when it exists (the same run, pool and sites), so that the rules can
be re-examined without scoring again.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from xferlearn.data.folders import scan
from xferlearn.data.images import DecodeCache
from xferlearn.errors import XferlearnError
from xferlearn.evaluation.corruptions import check_choices
from xferlearn.evaluation.evaluate import evaluation_root
from xferlearn.evaluation.stress import decode_all, shifted_probabilities
from xferlearn.evaluation.thresholds import choose_threshold
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.models.predictor import Predictor
from xferlearn.training.site import MIN_PER_CLASS, threshold_interval

RULES = ("keep", "site", "gated")


def parse_site(site: str) -> tuple[str, int]:
    """'clean' -> ('clean', 0); 'noise:2' -> ('noise', 2), checked before any image is scored."""
    if site == "clean":
        return "clean", 0
    shift, _, severity = site.partition(":")
    try:
        check_choices([shift], [int(severity)] if severity.isdigit() else [])
    except XferlearnError as error:
        sys.exit(f"site_rules: --site {site!r} is not clean or SHIFT:SEVERITY: {error}")
    return shift, int(severity)


def site_scores(run: Path, pool: Path, sites: list[str], saved: Path | None
                ) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """(is_positive, {site: p_positive}, the run's threshold) for every image of `pool` under each site."""
    key = f"{Path(run).resolve()}|{Path(pool).resolve()}"
    if saved and saved.exists():
        stored = np.load(saved)
        if str(stored["key"]) != key or not set(sites) <= set(stored.files):
            sys.exit(f"site_rules: {saved} holds other scores ({stored['key']}, sites {stored.files[3:]})")
        return stored["y"], {site: stored[site] for site in sites}, float(stored["threshold"])
    checkpoint = load_checkpoint(run)
    if checkpoint.positive_index is None:
        sys.exit(f"site_rules: {run} has {len(checkpoint.classes)} classes; the study needs a two-class run")
    cache = DecodeCache.of(checkpoint.preprocessing, None)
    manifest = scan(evaluation_root(pool, checkpoint.classes), cache, classes=checkpoint.classes, dedupe=False)
    images = decode_all(manifest.paths, manifest.digests, cache)
    predictor = Predictor(checkpoint, precision="fp32", engine="onnx")  # the fastest engine on a CPU
    scores = {}
    for site in sites:
        probs = shifted_probabilities(predictor, images, manifest.digests, *parse_site(site))
        scores[site] = probs[:, checkpoint.positive_index]
    y = (manifest.labels == checkpoint.positive_index).astype(int)
    if saved:
        np.savez(saved, key=key, y=y, threshold=checkpoint.threshold, **scores)
    return y, scores, checkpoint.threshold


def draw(y: np.ndarray, n: int, rng) -> np.ndarray:
    """A boolean mask of n images, stratified by class, at least MIN_PER_CLASS of each."""
    n_pos = int(np.clip(round(n * y.mean()), MIN_PER_CLASS, n - MIN_PER_CLASS))
    pick = np.concatenate([rng.choice(np.flatnonzero(y == 1), n_pos, replace=False),
                           rng.choice(np.flatnonzero(y == 0), n - n_pos, replace=False)])
    mask = np.zeros(len(y), bool)
    mask[pick] = True
    return mask


def thresholds(y, p, trained: float, n_boot: int, seed: int) -> dict[str, float]:
    """Each rule's threshold on one sample."""
    site = choose_threshold(y, p, "youden")
    low, high = threshold_interval(y, np.column_stack([1 - p, p]), 1, "youden", None, n_boot, seed)
    return {"keep": trained, "site": site, "gated": trained if low <= trained <= high else site}


def judged(y, p, threshold: float) -> tuple[float, float, float, float]:
    """Accuracy, balanced accuracy, sensitivity, specificity at `threshold`."""
    called = p >= threshold
    sensitivity, specificity = float(called[y == 1].mean()), float(1 - called[y == 0].mean())
    return float((called == y).mean()), (sensitivity + specificity) / 2, sensitivity, specificity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a two-class run folder")
    parser.add_argument("pool", type=Path, help="a labelled folder of class folders the run was not tuned on")
    parser.add_argument("--site", action="append", help="clean, or SHIFT:SEVERITY (repeatable; default: clean)")
    parser.add_argument("--n", type=int, default=100, help="images in each site sample (default: 100)")
    parser.add_argument("--draws", type=int, default=200, help="samples drawn per site (default: 200)")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of each sample's threshold "
                        "interval (default: 1000, as calibrate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scores", type=Path, help="an .npz to keep the scores in, reused when it exists")
    args = parser.parse_args(argv)
    sites = args.site or ["clean"]
    for site in sites:
        parse_site(site)

    y, scores, trained = site_scores(args.run, args.pool, sites, args.scores)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"run: {args.run} (validation threshold {trained:.3f}); pool: {args.pool}, {len(y)} images "
          f"({int(y.sum())} positive); samples of {args.n}, {args.draws} draws per site\n")
    print("| site | AUC | rule | accuracy on the rest (mean / 10th pct) | balanced accuracy (mean / 10th pct) | "
          "sensitivity | specificity | threshold (median) | moved in |")
    print("|---|---|---|---|---|---|---|---|---|")

    for site in sites:
        p = scores[site]
        rng = np.random.default_rng(args.seed)
        results = {rule: [] for rule in RULES}
        for i in range(args.draws):
            mask = draw(y, args.n, rng)
            chosen = thresholds(y[mask], p[mask], trained, args.boot, args.seed + i)
            for rule in RULES:
                results[rule].append((*judged(y[~mask], p[~mask], chosen[rule]), chosen[rule]))
        auc = roc_auc_score(y, p)
        for rule in RULES:
            r = np.array(results[rule])
            cell = lambda k: f"{r[:, k].mean():.4f} / {np.percentile(r[:, k], 10):.4f}"  # noqa: E731
            print(f"| {site} | {auc:.4f} | {rule} | {cell(0)} | {cell(1)} | {r[:, 2].mean():.4f} | "
                  f"{r[:, 3].mean():.4f} | {np.median(r[:, 4]):.3f} | {100 * np.mean(r[:, 4] != trained):.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
