"""How long does a run's test-time-augmented validation pass take, through PyTorch and through ONNX Runtime?

    python3 benchmarks/tta_engines.py RUN [--limit N] [--rounds 2] [--views 1]

At the end of `--recipe finetune` (TTA on by default) the trained network scores every
validation image over the TTA views to choose the threshold (training/calibration.py's
`validation_view_logits`). This times that pass on RUN's own validation images (split.json),
decoded once beforehand (the decode cache serves training the same way): PyTorch's fast path
in fp32, and the network exported in memory to ONNX Runtime (`Predictor(engine="onnx")`, the
CPU default since this benchmark was written; the export is timed apart). The engines take
turns, --rounds times, and the largest probability difference between them is printed: the
threshold is chosen on these probabilities. `--views 1` times the clean view alone: what the
fine-tune's validation computes after every epoch (there the export is paid once per epoch).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings

import numpy as np
import torch

from machine import describe  # benchmarks/machine.py

from xferlearn._io import read_json
from xferlearn.data.images import DecodeCache
from xferlearn.evaluation.stress import decode_all
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.models.predictor import Predictor
from xferlearn.rundir import RunDir


def view_logits(predictor: Predictor, images: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate([predictor.view_logits(images[i:i + batch_size]).numpy()
                           for i in range(0, len(images), batch_size)], axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder with split.json")
    parser.add_argument("--limit", type=int, help="time the first N validation images only")
    parser.add_argument("--rounds", type=int, default=2, help="turns each engine takes (default: 2)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default: 32, the recipe's)")
    parser.add_argument("--views", type=int, choices=(1, 5), default=5,
                        help="5: the TTA views (default); 1: the clean image, as each epoch's validation")
    args = parser.parse_args(argv)

    checkpoint = load_checkpoint(args.run)
    val = read_json(RunDir.of(args.run).split)["val"][:args.limit]
    images = decode_all([v["path"] for v in val], [v["digest"] for v in val],
                        DecodeCache.of(checkpoint.preprocessing, None))
    predictors, setup = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TTA forced on for a run trained without it
        for engine in ("torch", "onnx"):
            started = time.perf_counter()
            predictors[engine] = Predictor(checkpoint, engine=engine, tta=args.views > 1, batch_size=args.batch)
            setup[engine] = time.perf_counter() - started
    seconds, logits = {engine: [] for engine in predictors}, {}
    for _ in range(args.rounds):
        for engine, predictor in predictors.items():
            started = time.perf_counter()
            logits[engine] = view_logits(predictor, images, args.batch)
            seconds[engine].append(time.perf_counter() - started)
    probs = {engine: torch.from_numpy(z / checkpoint.temperature).softmax(-1).mean(0).numpy()
             for engine, z in logits.items()}
    views = logits["torch"].shape[0]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {describe()}")
    print(f"run: {args.run} ({checkpoint.arch}); {len(images)} validation images x {views} views, batches of "
          f"{args.batch}, {torch.get_num_threads()} threads\n")
    print("| engine | set-up s | pass s (each round) | images x views / s |")
    print("|---|---|---|---|")
    for engine, times in seconds.items():
        best = min(times)
        print(f"| {engine} | {setup[engine]:.1f} | {', '.join(f'{t:.1f}' for t in times)} | "
              f"{len(images) * views / best:.0f} |")
    difference = float(np.abs(probs["torch"] - probs["onnx"]).max())
    print(f"\nlargest difference in the probabilities: {difference:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
