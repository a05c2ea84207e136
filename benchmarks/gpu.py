"""Train and predict throughput on a CUDA GPU: one prepared script for a machine that has one.

    python3 benchmarks/gpu.py [--backbone NAME] [--data DIR] [--seconds 20] [--json FILE]

On a machine without a CUDA device it says so in one line and exits 0, measuring nothing: no
CPU figure is ever reported as a GPU one.

What it measures, each after a warm-up, on random pixels of the backbone's input size (so
that the figures are the GPU's and not the disk's or the JPEG decoder's):
1. predict: the network in eval mode, channels_last, bf16 autocast (fp32 where the GPU has
   no bf16), uint8 batches copied from pinned host memory with `non_blocking`, normalised on
   the GPU as `xferlearn predict` does; images/s per batch size;
2. train: a full fine-tuning step (forward, cross-entropy, backward, AdamW) under the same
   autocast, every layer trainable; images/s;
3. with --data: `xferlearn train DATA` (the default recipe, or its linear recipe on --backbone
   where one is given) and `xferlearn predict` on DATA, end to end, as a user runs them on
   this machine (decoding included).
It prints the device, versions, the figures and the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def no_gpu_message() -> str | None:
    try:
        import torch
    except ImportError:
        return "gpu.py: PyTorch is not installed; nothing measured."
    if not torch.cuda.is_available():
        return "gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing measured."
    return None


def timed_loop(step, seconds: float, warmup: int = 5) -> tuple[int, float]:
    """Run `step` (returns images done) for about `seconds` after `warmup` calls; (images, seconds)."""
    import torch

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        images += step()
    torch.cuda.synchronize()
    return images, time.perf_counter() - started


def measure(backbone: str, seconds: float, batch_sizes: list[int], train_batch: int) -> dict:
    import torch

    from xferlearn.models.backbones import create_empty, resolve
    from xferlearn.models.inference import pixel_scale

    device = torch.device("cuda")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    arch = resolve(backbone)
    model = create_empty(arch, 2).to(device, memory_format=torch.channels_last)
    size = int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])
    mean, std = pixel_scale((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), device)
    results: dict = {"backbone": arch, "input_size": size, "autocast": str(dtype).replace("torch.", ""),
                     "predict": {}, "train": {}}

    model.eval()
    for batch in batch_sizes:
        host = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).pin_memory()

        @torch.inference_mode()
        def predict_step(host=host, batch=batch):
            pixels = host.to(device, non_blocking=True)
            x = ((pixels.float() - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=dtype):
                model(x).float().softmax(-1).cpu()  # the copy back synchronises, as predict's rows do
            return batch

        images, wall = timed_loop(predict_step, seconds)
        results["predict"][str(batch)] = round(images / wall, 1)
        print(f"  predict  batch {batch:4d}: {images / wall:9.1f} images/s", flush=True)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    host = torch.randint(0, 256, (train_batch, 3, size, size), dtype=torch.uint8).pin_memory()
    labels = torch.randint(0, 2, (train_batch,), device=device)

    def train_step():
        pixels = host.to(device, non_blocking=True)
        x = ((pixels.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return train_batch

    images, wall = timed_loop(train_step, seconds)
    results["train"][str(train_batch)] = round(images / wall, 1)
    print(f"  train    batch {train_batch:4d}: {images / wall:9.1f} images/s", flush=True)
    return results


def end_to_end(data: Path, backbone: str | None) -> dict:
    """The default recipe (on `backbone` where given) and `predict` on DATA, as a user runs them
    (fresh cache), timed."""
    work = Path(tempfile.mkdtemp(prefix="xferlearn-gpu-"))
    env = {**os.environ, "XFERLEARN_CACHE": str(work / "cache")}
    out: dict = {}
    for name, command in (
            ("train_default_s", [sys.executable, "-m", "xferlearn.cli", "train", str(data), "--out", str(work / "run")]
             + (["--backbone", backbone] if backbone else [])),
            ("predict_s", [sys.executable, "-m", "xferlearn.cli", "predict", str(work / "run"), str(data),
                           "--output", str(work / "predictions.csv")])):
        print(f"\n$ {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        out[name] = round(time.perf_counter() - started, 1)
        out[name.replace("_s", "_command")] = shlex.join(command)
    metrics = json.loads((work / "run" / "validation_metrics.json").read_text())
    out["validation_auc"] = metrics.get("auc")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help="the network of every figure (default: efficientnet_lite0 for the model "
                        "alone, the default recipe's for --data)")
    parser.add_argument("--seconds", type=float, default=20, help="timed seconds per figure (default: 20)")
    parser.add_argument("--batch-sizes", default="32,128,512", help="predict batch sizes (default: 32,128,512)")
    parser.add_argument("--train-batch", type=int, default=64, help="fine-tuning batch size (default: 64)")
    parser.add_argument("--data", type=Path, help="a class-per-folder image folder for the end-to-end figures")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    message = no_gpu_message()
    if message:
        print(message)
        return 0
    import torch

    name = torch.cuda.get_device_name(0)
    print(f"gpu.py on {name} (CUDA {torch.version.cuda}, torch {torch.__version__}, Python {platform.python_version()})")
    results = {"device": name, "cuda": torch.version.cuda, "torch": torch.__version__,
               "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    results |= measure(args.backbone or "efficientnet_lite0", args.seconds,
                       [int(b) for b in args.batch_sizes.split(",")], args.train_batch)
    if args.data:
        results["end_to_end"] = end_to_end(args.data, args.backbone)
    print(json.dumps(results, indent=2))
    print(f"command: {results['command']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
