"""How fast does a fine-tune stage train on this CPU? Its training step, wholly in PyTorch and with
the frozen layers on ONNX Runtime, side by side.

    python3 benchmarks/finetune_step.py [--backbone tf_efficientnet_lite0] [--depths 4,9,all]
                                        [--size 224] [--batch 32] [--seconds 20] [--rounds 2]

For each stage depth (layer groups below the head that train, as `--stages` counts them), the
library's own `FinetuneModule` takes AdamW steps on random uint8 pixels in memory (no files,
decoding or augmentation: the model's step alone), once with `--frozen-engine onnx` (the frozen
lower layers through ONNX Runtime, models/frozen_prefix.py) and once as it trains by default
(every layer in PyTorch). The two take turns, --rounds times,
so a change in the machine's load reaches both; compare the rows of one run, not runs. Also
printed: the largest difference between the two engines' logits at the start (rounding only).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from machine import describe  # benchmarks/machine.py

from xferlearn.config import TrainConfig
from xferlearn.models.backbones import Preprocessing
from xferlearn.models.base import usable_cores
from xferlearn.training import finetune as ft

CLASSES = ["NORMAL", "PNEUMONIA"]


def module_for(net, depth, engine: str, size: int, batch: int) -> ft.FinetuneModule:
    ft.unfreeze(net, depth)
    config = TrainConfig(data="x", recipe="finetune", feature_engine=engine, finetune_batch_size=batch,
                         frozen_engine="onnx" if engine == "auto" else "torch")
    module = ft.FinetuneModule(net, CLASSES, Preprocessing(size, (0.5,) * 3, (0.5,) * 3, "bilinear"), config,
                               update_bn=False)
    module.on_train_epoch_start()  # the stage's modes, and on "auto" the frozen layers' export
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="a timm model name")
    parser.add_argument("--depths", default="4,9,all", help="stage depths, as --stages takes them (default 4,9,all)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default: 224)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default: 32, the fine-tune's)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per engine and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import timm

    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    targets = torch.arange(args.batch) % 2
    rows = []
    for depth_text in args.depths.split(","):
        depth = None if depth_text == "all" else int(depth_text)
        net = timm.create_model(args.backbone, pretrained=False, num_classes=2)
        modules = {name: module_for(net, depth, engine, args.size, args.batch)
                   for name, engine in (("PyTorch", "torch"), ("frozen layers on ONNX Runtime", "auto"))}
        with torch.no_grad():
            logits = [module(pixels) for module in modules.values()]
        difference = float((logits[0] - logits[1]).abs().max())
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

        def step(module):
            loss = torch.nn.functional.cross_entropy(module(pixels), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        done = {name: [0, 0.0] for name in modules}
        for module in modules.values():
            step(module)  # warm-up
        for _ in range(args.rounds):
            for name, module in modules.items():
                started = time.perf_counter()
                while time.perf_counter() - started < args.seconds:
                    step(module)
                    done[name][0] += args.batch
                done[name][1] += time.perf_counter() - started
        frozen = modules["frozen layers on ONNX Runtime"]._frozen
        split = f"{frozen.count} of {frozen.total} blocks frozen" if frozen else "nothing frozen: no split"
        rates = {name: images / seconds for name, (images, seconds) in done.items()}
        rows.append((depth_text, split, rates, difference))

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {describe()}; {usable_cores()} threads; torch {torch.__version__}")
    print(f"{args.backbone} at {args.size} px, batches of {args.batch}, random pixels, AdamW steps, "
          f"{args.rounds} rounds of {args.seconds:g} s per engine, taking turns\n")
    print("| stage depth | split | PyTorch, images/s | frozen layers on ONNX Runtime, images/s | ratio | "
          "largest logit difference |")
    print("|---|---|---|---|---|---|")
    for depth_text, split, rates, difference in rows:
        torch_rate, onnx_rate = rates["PyTorch"], rates["frozen layers on ONNX Runtime"]
        print(f"| {depth_text} | {split} | {torch_rate:.1f} | {onnx_rate:.1f} | {onnx_rate / torch_rate:.2f} | "
              f"{difference:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
