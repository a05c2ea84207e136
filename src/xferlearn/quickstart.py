"""`xferlearn demo`: the whole job on the packaged chest X-ray sample, with nothing of one's own.

Train the default recipe on the sample's train/ part, evaluate on its test/ part (the
report lands in the run folder), explain one image with Grad-CAM, and print the figures and
the commands to try next. The run it leaves is an ordinary one: `xferlearn predict`,
`serve`, `explain` and `export` take it as is.

The sample's test/ part comes from the same source as its train/ part (other patients, the
same hospital and machines), so its figures are in-distribution: they show the job works,
not how a model would fare elsewhere. The demo says so every time it prints them.
"""

from __future__ import annotations

import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from .config import TrainConfig
from .datasets import chest_xray_sample
from .errors import XferlearnError
from .rundir import RunDir

DEFAULT_OUT = "xferlearn-demo"
STEPS = 3


@dataclass
class DemoResult:
    run_dir: Path
    sample: Path
    metrics: dict            # evaluate()'s, on the sample's test/ part
    explanation: Path        # the Grad-CAM PNG of one test image
    seconds: float


def prepare_out(out: str | Path, force: bool) -> RunDir:
    """The run folder to write, refusing to overwrite a trained model unless `force`."""
    run = RunDir(out)
    if run.checkpoint.exists():
        if not force:
            raise XferlearnError(f"{run.root} already holds a model; pass --force to replace it, or --out NEW_FOLDER.")
        if not run.config.exists():  # a model.pt that xferlearn did not write: not ours to delete
            raise XferlearnError(f"{run.root} holds a model.pt but no config.json, so it is not an xferlearn run; "
                                 "choose another --out.")
        shutil.rmtree(run.root)  # a whole earlier run: stale Lightning checkpoints must not mix into the new one
    return run


def explain_target(sample: Path) -> Path:
    """The image the demo explains: the first positive test image (always the same one)."""
    return sorted((sample / "test" / "PNEUMONIA").iterdir())[0]


def demo(out: str | Path = DEFAULT_OUT, *, force: bool = False, console: Console | None = None,
         **options) -> DemoResult:
    """Train, evaluate and explain on the packaged sample; `options` are TrainConfig's fields
    (the defaults are the default recipe; tests pass a tiny backbone)."""
    from .evaluation.evaluate import evaluate
    from .evaluation.explain import explain_files
    from .training.pipeline import train

    console = console or Console(stderr=True)
    started = time.perf_counter()
    sample = chest_xray_sample()
    config = TrainConfig(data=str(sample / "train"), out=str(out), **options)  # checked before --force deletes
    run = prepare_out(config.out, force)
    config.resolve_backbone(grayscale=True)  # the sample is chest X-rays: named in step 1's title

    console.rule(f"[bold]Step 1/{STEPS}: train[/] ({config.recipe}, {config.backbone}) on the sample's train/ part")
    train(config)
    console.rule(f"[bold]Step 2/{STEPS}: evaluate[/] on the sample's test/ part (other patients)")
    with console.status("Predicting the test images, bootstrapping intervals, writing report.md..."):
        # No error gallery: its Grad-CAM of every shown mistake took two thirds of this step
        # (`xferlearn evaluate` on the same run draws it); step 3 explains one image instead.
        metrics = evaluate(run.root, sample / "test", gallery=False)
    console.rule(f"[bold]Step 3/{STEPS}: explain[/] one test image with Grad-CAM")
    with console.status("Computing the Grad-CAM heatmap..."):
        explanation = explain_files(run.root, [explain_target(sample)], run.explanations)[0]
    seconds = time.perf_counter() - started
    print_summary(run, sample, metrics, explanation, seconds)
    return DemoResult(run.root, sample, metrics, explanation, seconds)


def _figure(metrics: dict, name: str) -> str:
    interval = (metrics.get("intervals") or {}).get(name)
    text = f"{metrics[name]:.3f}"
    return text + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else "")


def print_summary(run: RunDir, sample: Path, metrics: dict, explanation: Path, seconds: float) -> None:
    """The figures, what they cannot show, and what to try next, on stdout."""
    q = lambda path: shlex.quote(str(path))  # noqa: E731  (the package may live under a path with spaces)
    from .evaluation.metrics import decision_rule

    image = explain_target(sample)
    out = Console(highlight=False, soft_wrap=True)  # commands stay whole, to copy
    out.print(f"\n[bold]Done in {seconds:.0f} s.[/] Run folder: {run.root}")
    out.print(f"On the sample's test/ part ({metrics['n']} images, {metrics['n_per_class']}):")
    out.print(f"  AUC {_figure(metrics, 'auc')}\n  sensitivity {_figure(metrics, 'sensitivity')}\n"
              f"  specificity {_figure(metrics, 'specificity')}")
    rule = decision_rule(metrics["threshold"], metrics["threshold_source"], metrics.get("positive_class"))
    out.print(f"  at {rule}.")
    out.print("  The test/ part is other patients from the same source as train/ (in-distribution): these "
              "figures show the job works end to end, not how the model would do on another hospital's images "
              f"(they cannot show shift). {metrics['n']} images are far too few to judge a model by.")
    out.print(f"Report: {run.root / 'report.md'}   Grad-CAM: {explanation}")
    out.print("\n[bold]Try next:[/]")
    out.print(f"  xferlearn predict {q(run.root)} {q(image)}        # classify images (CSV)")
    out.print(f"  xferlearn serve {q(run.root)}        # HTTP service and upload page at http://127.0.0.1:8000")
    out.print(f"  xferlearn explain {q(run.root)} IMAGE.jpeg --out heatmaps        # where the model looked")
    out.print(f"  xferlearn stress {q(run.root)} {q(sample / 'test')}        # the test/ part under acquisition-like "
              "shifts (blur, noise, JPEG, markers, ...)")
    out.print(f"  xferlearn evaluate {q(run.root)} {q(sample / 'test')}        # the report again, with a gallery "
              "of the mistakes and their heatmaps")
    out.print("  xferlearn train path/to/your_images --out runs/mine        # your own images: one subfolder per class,")
    out.print("        # e.g. your_images/NORMAL/*.jpeg and your_images/PNEUMONIA/*.jpeg (or ants/ and bees/)")
