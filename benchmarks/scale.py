"""Bigger than memory: wall time and peak resident memory of `xferlearn train` as the folder grows.

    python3 benchmarks/scale.py [--sizes 5000 20000 100000] [--root DIR] [--size PX] [--epochs E]
                                [--head-sizes 5000 20000 100000]

For each N it makes (once, kept under --root) a synthetic folder of N small grayscale PNGs
in two classes (noise with a faint bright blob in one class: a task with AUC below 1), then
trains on it in a fresh process (the `linear` recipe, resnet18 without pretrained weights at
--size pixels, --views 0, one loader process at most) and reports that process's wall time
and peak resident set (ru_maxrss of the process, and separately of its loader processes).
Memory should stay flat: the decode cache is one file per image, the feature cache is
written and read in parts by offset (models/feature_store.py), and the head's batches are
read from it. What does grow with N: the manifest (paths and hashes, ~200 bytes an image).

`--head-sizes` also runs the part that used to hold every feature in memory (the head on
cached features) alone on N synthetic feature rows: it reaches 100,000 images in minutes
where the whole recipe's scan, decode and backbone passes take hours on a small machine.

Times depend on the machine and its load; compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from machine import describe as describe_machine  # benchmarks/machine.py

OPTIONS = dict(backbone="resnet18", weights="none", views=0, lr=0.003, workers=1, compile="off")


def make_folder(root: Path, n: int, size: int) -> Path:
    """N images, half per class (kept: a second run reuses them)."""
    done = root / f"n{n}-{size}px"
    if (done / ".complete").exists():
        return done
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[:size, :size]
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        (done / name).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            image = rng.normal(100, 30, (size, size))
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            image += label * 25 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 6) ** 2))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(done / name / f"{name.lower()}_{i}.png",
                                                                       compress_level=1)
    (done / ".complete").touch()
    return done


def train_once(data: str, out: str, cache: str, size: int, epochs: int) -> None:
    """One training in this process; prints its time and peak memory as JSON."""
    import xferlearn

    started = time.perf_counter()
    result = xferlearn.train(data=data, out=out, cache_dir=cache, image_size=size, epochs=epochs, **OPTIONS)
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loaders = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(own), "loader_peak_rss_mb": round(loaders),
                      "val_auc": round(result.metrics["auc"], 4)}))


def head_once(n: int, root: str, epochs: int, dim: int = 512) -> None:
    """The head phase alone, at scale: N rows of `dim` synthetic features (resnet18's width)
    written to a FeatureStore, then the linear recipe's own pieces (streamed mean/std,
    FeatureRowsDataset, the shared Lightning fit). Prints time and peak memory as JSON."""
    from xferlearn.config import TrainConfig
    from xferlearn.models.feature_store import FeatureStore
    from xferlearn.training.distributed import trainer_options
    from xferlearn.training.linear import FeatureRowsDataset
    from xferlearn.training.loop import ClassifierModule, fit, train_loader
    from torch.utils.data import DataLoader
    import torch

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    signal = rng.normal(size=dim).astype(np.float32) * 0.2
    store = FeatureStore("bench", Path(root) / "cache")
    digests = [f"{i:040x}" for i in range(n)]
    store.write("clean", digests, (rng.normal(size=(min(4096, n - s), dim)).astype(np.float32)
                                   + labels[s:s + 4096, None] * signal for s in range(0, n, 4096)))
    cut = n * 4 // 5
    rows = store.rows("clean", digests[:cut])
    mean, std = rows.mean_std()
    config = TrainConfig(data=root, epochs=epochs, batch_size=128)
    module = ClassifierModule(torch.nn.Linear(dim, 2), ["a", "b"], lr=1e-3, weight_decay=1e-4, epochs=epochs)
    train = train_loader(FeatureRowsDataset(rows, labels[:cut], mean, std), labels[:cut], config, 2, batch_size=128)
    val = DataLoader(FeatureRowsDataset(store.rows("clean", digests[cut:]), labels[cut:], mean, std), batch_size=1024)
    best = fit(module, train, val, config, Path(root) / "run", **trainer_options(config, "cpu"))
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "val_auc": round(best["best_epoch_val_auc"], 4)}))


def head_table(sizes: list[int], root: Path, epochs: int) -> None:
    print("\n| feature rows (head phase alone) | seconds | peak RSS MB | val AUC |\n|---|---|---|---|")
    for n in sizes:
        work = root / f"head-{n}-{time.time_ns()}"
        done = subprocess.run([sys.executable, __file__, "--head", str(n), str(work), "--epochs", str(epochs)],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"| {n} | failed: {done.stderr.strip().splitlines()[-1:]} |")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {n} | {row['seconds']} | {row['peak_rss_mb']} | {row['val_auc']} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[5000, 20000, 100000],
                        help="whole-recipe runs on N synthetic images (none: only --head-sizes)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/xferlearn-scale"))
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32, the smallest allowed)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--head-sizes", type=int, nargs="*", default=[],
                        help="also time the head phase alone on this many synthetic feature rows (e.g. 5000 20000 100000)")
    parser.add_argument("--one", nargs=3, metavar=("DATA", "OUT", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--head", nargs=2, metavar=("N", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.head:
        head_once(int(args.head[0]), args.head[1], args.epochs)
        return 0
    if args.one:
        train_once(*args.one, args.size, args.epochs)
        return 0

    print(f"# benchmarks/scale.py on {describe_machine()}; {OPTIONS}, {args.size} px, {args.epochs} epochs")
    print("| images | make folder s | train s (fresh caches) | peak RSS MB | loader peak RSS MB | val AUC |")
    print("|---|---|---|---|---|---|")
    if args.head_sizes:
        head_table(args.head_sizes, args.root, args.epochs)
    rows = []
    for n in args.sizes:
        started = time.perf_counter()
        data = make_folder(args.root, n, args.size)
        made = time.perf_counter() - started
        run = args.root / f"run-{n}-{time.time_ns()}"
        done = subprocess.run([sys.executable, __file__, "--one", str(data), str(run / "out"), str(run / "cache"),
                               "--size", str(args.size), "--epochs", str(args.epochs)],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"| {n} | failed: {done.stderr.strip().splitlines()[-1:]} |")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {n} | {made:.0f} | {row['seconds']} | {row['peak_rss_mb']} | {row['loader_peak_rss_mb']} | "
              f"{row['val_auc']} |", flush=True)
    if len(rows) > 1:
        peaks = [r["peak_rss_mb"] for r in rows]
        print(f"\npeak RSS, largest / smallest: {max(peaks) / min(peaks):.2f}x (flat means within 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
