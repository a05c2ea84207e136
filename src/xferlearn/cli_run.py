"""The `xferlearn` subcommands that take a trained run further: stress, calibrate, explain,
export, serve, and the backbone list. Each is an `add_X(commands)` / `run_X(args)` pair over
a library function, registered in cli.COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import EXPORT_FORMATS, ENGINES, STRESS_SHIFTS, STRESS_SPLITS, THRESHOLDS
from .errors import XferlearnError
from .rundir import RunDir

# predict and explain share one rule for files they cannot read (said in both --help texts).
UNREADABLE_RULE = ("Exit status: 0 when every file was read, 1 when some could not be (each is reported, the "
                   "rest are done), 2 for an error that stops the command (one line saying what to do).")


# Images per model call where none is asked for. On 2 CPU cores ONNX Runtime ran the packaged
# networks 1.1-1.4x faster in batches of 4 or 8 than of 32 (a small batch's activations stay in
# cache), and `predict` ran 1.1-1.3x faster end to end (benchmarks/RESULTS.md, session 19). A GPU
# wants larger batches.
CPU_BATCH, GPU_BATCH = 8, 32


def add_batch_size(parser) -> None:
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help=f"images per model call (default: {CPU_BATCH} on a CPU, {GPU_BATCH} with a GPU)")


def batch_size(args) -> int:
    """--batch-size, or the default for the machine (CPU_BATCH, GPU_BATCH)."""
    from .models.base import gpu_present

    if args.batch_size is not None and args.batch_size < 1:
        raise XferlearnError(f"--batch-size must be at least 1, not {args.batch_size}.")
    return args.batch_size or (GPU_BATCH if gpu_present() else CPU_BATCH)


def add_backbones(commands) -> None:
    parser = commands.add_parser("backbones", help="the backbones and which weights each can get right now",
                                 epilog="example: xferlearn backbones --json")
    parser.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                        help="print the table as JSON (default: %(default)s)")
    parser.set_defaults(func=run_backbones)


def run_backbones(args) -> int:
    from .models.backbones import list_backbones

    rows = list_backbones()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "timm architecture", "weights available now", "default", "input")
    for row in rows:
        table.add_row(row["name"], row["arch"], ", ".join(row["weights"]) or "none here (random init only)",
                      str(row["default_weights"]), str(row["input_size"]))
    console = Console()
    Console(width=max(console.width, 110)).print(table)  # piped output: keep names whole
    print("Any other timm model name works too (with --weights imagenet, a file, or none). Join names with + for "
          "an ensemble trained and served as one model, e.g. efficientnet_lite0+efficientnet_lite1+efficientnet_lite2.")
    return 0


def add_serve(commands) -> None:
    parser = commands.add_parser("serve", help="serve a run over HTTP: POST /predict, GET /health, /model, an upload page",
                                 description="Serve RUN over HTTP (uvicorn). Binds 127.0.0.1 unless --host says "
                                             "otherwise; the upload page is at /, the API docs at /docs.",
                                 epilog="example: xferlearn serve runs/ants --port 8000   (then open "
                                        "http://127.0.0.1:8000/)")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000; 0 picks a free one)")
    parser.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload in MB (default: 20)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="what computes the probabilities: auto (default; onnx-int8 where its checked export "
                             "exists for the current checkpoint, else on a machine without a GPU onnx, else torch; "
                             "the start-up line says which and why not int8), torch, onnx (ONNX Runtime fp32) or onnx-int8 "
                             "(its int8 quantisation, with its own validation threshold); ONNX engines export (and "
                             "quantise) RUN on first use, as predict does")
    parser.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from .deploy.guards import tame_allocator
    from .deploy.serve import serve

    tame_allocator()
    if not args.max_upload_mb > 0:
        raise XferlearnError(f"--max-upload-mb must be positive, not {args.max_upload_mb}.")
    serve(args.run, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 2**20),
          engine=args.engine)
    return 0


def add_explain(commands) -> None:
    parser = commands.add_parser("explain", help="Grad-CAM heatmaps: where the model looked, one PNG per image",
                                 description="Write NAME.gradcam.png into --out for each image: the image, its "
                                             "Grad-CAM overlay for the predicted class, and the prediction. "
                                             + UNREADABLE_RULE,
                                 epilog="example: xferlearn explain runs/ants photo.jpg --out heatmaps/")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("paths", nargs="+", help="image files and/or folders")
    parser.add_argument("--out", default=".", help="folder for the PNGs (default: the current folder)")
    parser.set_defaults(func=run_explain)


def run_explain(args) -> int:
    from .evaluation.explain import explain_files

    skipped = []

    def report_skip(path, reason):
        skipped.append(path)
        print(f"skipped {path}: {reason}", file=sys.stderr)

    for path in explain_files(args.run, args.paths, args.out, on_skip=report_skip):
        print(path)
    return 1 if skipped else 0


def add_export(commands) -> None:
    parser = commands.add_parser("export", help="export a run as ONNX or TorchScript, with a model.json sidecar",
                                 epilog="example: xferlearn export runs/ants --format onnx-int8")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                        help=f"one of {', '.join(EXPORT_FORMATS)}; onnx-int8: the ONNX export quantised to int8, "
                             "kept only if validation AUC holds (default: onnx)")
    parser.add_argument("--out", help="folder to write into (default: RUN/export)")
    parser.add_argument("--calibration", help="(onnx-int8) a folder of images to measure activation ranges on "
                                              "(default: a sample of the run's training images; never test images)")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    from .deploy.export import export

    written = export(args.run, args.format, args.out, args.calibration)
    for path in written.values():
        print(path)
    return 0


def add_calibrate(commands) -> None:
    parser = commands.add_parser(
        "calibrate", help="re-choose a run's threshold and temperature on a labelled sample from a new site",
        description="Re-fit the temperature and re-choose the decision threshold of RUN on SITE_DATA (a folder of "
                    "class folders, at least 20 images a class), without training the network, where the sample "
                    "shows that the operating point moved (the run's threshold outside the 95% interval of the "
                    "sample's; otherwise the run's is kept and the output says so); write the result as a new run "
                    "folder --out that predict, evaluate, export and serve use as is. Judge it with "
                    "`xferlearn evaluate` on OTHER images of the site: the figures printed here are on the "
                    "sample the threshold was chosen on.",
        epilog="example: xferlearn calibrate runs/cxr site_b_sample/ --out runs/cxr-site-b\n"
               "         xferlearn evaluate runs/cxr-site-b site_b_other_images/")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("site_data", help="a labelled sample from the site: one subfolder per class, as in training")
    parser.add_argument("--out", required=True, help="the new run folder to write (must not hold a model yet)")
    parser.add_argument("--prior", action=argparse.BooleanOptionalAction, default=False,
                        help="also make the probabilities refer to the sample's class balance (folded into the "
                             "classifier's bias; use only if the sample's balance is the site's) (default: off)")
    parser.add_argument("--threshold", choices=THRESHOLDS,
                        help=f"the rule that picks the threshold, one of {', '.join(THRESHOLDS)} "
                             "(default: the run's own rule)")
    parser.add_argument("--target-sensitivity", type=float,
                        help="with --threshold target_sensitivity: the sensitivity to reach, e.g. 0.95")
    parser.add_argument("--always-move", action=argparse.BooleanOptionalAction, default=False,
                        help="re-choose the threshold even when the run's own lies inside the 95%% interval of the "
                             "sample's (by default it is then kept: the sample does not show a move) (default: off)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the threshold's 95%% interval (default: 1000)")
    add_batch_size(parser)
    parser.set_defaults(func=run_calibrate)


def run_calibrate(args) -> int:
    from .training.site import calibrate_site

    if args.bootstrap < 1:
        raise XferlearnError(f"--bootstrap must be at least 1, not {args.bootstrap}.")
    record = calibrate_site(args.run, args.site_data, args.out, prior=args.prior, threshold=args.threshold,
                            target_sensitivity=args.target_sensitivity, n_boot=args.bootstrap,
                            batch_size=batch_size(args), always_move=args.always_move)
    after, before, sample = record["after"], record["before"], record["on_sample_after"]
    print(f"calibrated on {sum(record['counts'].values())} images {record['counts']} from {record['site_data']}")
    if record["overlap"]:
        print(f"WARNING: {record['overlap']}")
    print(record["decision"])
    print(f"temperature {before['temperature']:.3f} -> {after['temperature']:.3f}")
    if after["threshold"] is not None and record["unmoved_interval"] is None:
        low, high = after["operating_point"]["interval"]
        old = record["on_sample_before"]
        print(f"threshold {before['threshold']:.4f} -> {after['threshold']:.4f} "
              f"(bootstrap 95% interval {low:.4f} to {high:.4f})")
        print(f"on the sample (optimistic: chosen on it): sensitivity {old['sensitivity']:.4f} -> "
              f"{sample['sensitivity']:.4f}, specificity {old['specificity']:.4f} -> {sample['specificity']:.4f}")
    print(f"new run: {args.out} (evaluate it on other images of the site)")
    return 0



def add_stress(commands) -> None:
    parser = commands.add_parser(
        "stress", help="re-evaluate a run under acquisition-like shifts (exposure, blur, noise, JPEG, ...)",
        description="Re-evaluate RUN on labelled DATA (or --split val) under shifts like another site's images, at "
                    "severities 1-5, at the run's own threshold (never re-tuned). Writes stress.json, stress.md, "
                    "stress.png and examples.png into RUN/stress (or --out).",
        epilog="examples: xferlearn stress runs/cxr --split val\n"
               "          xferlearn stress runs/cxr other_site/ --shifts noise,jpeg,blur --severities 1,3,5 --limit 100")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("data", nargs="?", help="a folder of class folders (or a Kaggle root: its test/ is used)")
    parser.add_argument("--split", choices=STRESS_SPLITS,
                        help="val: the run's own validation images (split.json) instead of DATA; measures, tunes nothing")
    parser.add_argument("--out", help="where to write (default: RUN/stress)")
    parser.add_argument("--shifts", type=_csv(str), help=f"comma-separated subset of {','.join(STRESS_SHIFTS)} "
                                                         "(default: all)")
    parser.add_argument("--severities", type=_csv(int), help="comma-separated subset of 1,2,3,4,5 (default: all)")
    parser.add_argument("--limit", type=int, help="at most N images per class, drawn at random with seed 0 "
                                                  "(default: all)")
    add_batch_size(parser)
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto (default: onnx-int8 where its checked export exists, else onnx on a machine "
                             "without a GPU, else torch), torch, onnx or onnx-int8 (RUN/export, exported on first use)")
    parser.add_argument("--json", action=argparse.BooleanOptionalAction, default=False, help="print stress.json to stdout")
    parser.set_defaults(func=run_stress)


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, not {text!r}") from None
    return parse


def run_stress(args) -> int:
    from .api import stress
    from .evaluation.stress_report import summary_lines

    record = stress(args.run, args.data, args.out, split=args.split, shifts=args.shifts, severities=args.severities,
                    limit=args.limit, batch_size=batch_size(args), engine=args.engine)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(summary_lines(record))
        print(f"written to {args.out or RunDir.of(args.run).stress}")
    return 0
