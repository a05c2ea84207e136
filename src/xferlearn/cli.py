"""The `xferlearn` command: parses arguments, calls the library, prints.

Every command is a few lines over a library function. A user-fixable problem
(XferlearnError) prints one line and exits 2; an interrupted run says how to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields

from ._io import atomic_stream, os_error
from .config import COMPILE_MODES, ENGINES, EXPORT_FORMATS, PRECISIONS, TrainConfig
from .errors import XferlearnError

# predict and explain share one rule for files they cannot read (said in both --help texts).
UNREADABLE_RULE = ("Exit status: 0 when every file was read, 1 when some could not be (each is reported, the "
                   "rest are done), 2 for an error that stops the command (one line saying what to do).")

# TrainConfig fields the CLI does not expose as flags (data is positional).
_HIDDEN = {"data"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train(commands) -> None:
    parser = commands.add_parser("train", help="train a classifier on a folder of class folders",
                                 description="Train on DATA: one subfolder per class, or a Kaggle-style root "
                                             "with train/ [val/] [test/]. Validation is carved from train by patient.")
    parser.add_argument("data")
    defaults = TrainConfig.__dataclass_fields__
    for f in fields(TrainConfig):
        if f.name in _HIDDEN:
            continue
        default = defaults[f.name].default
        if f.type in ("bool",) or isinstance(default, bool):
            parser.add_argument(_flag(f.name), action="store_true", help=f"(default: {default})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            parser.add_argument(_flag(f.name), type=kind, default=default, help=f"(default: {default})")
    parser.set_defaults(func=run_train)


def run_train(args) -> int:
    from .training.pipeline import train

    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    train(TrainConfig(**options))
    return 0


def add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="metrics.json, report.md and plots for a run on labelled data")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("data", help="a folder of class folders (or a Kaggle root: its test/ is used)")
    parser.add_argument("--out", help="where to write the report (default: the run folder)")
    parser.add_argument("--json", action="store_true", help="print metrics.json to stdout")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default: 32, the fastest on 2 cores here)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--no-gallery", dest="gallery", action="store_false",
                        help="leave out the error gallery (the most confident mistakes with Grad-CAM heatmaps)")
    add_operating_point_flags(parser)
    parser.set_defaults(func=run_evaluate)


def add_operating_point_flags(parser) -> None:
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over test-time-augmented views (default: as the threshold was chosen)")
    parser.add_argument("--prevalence", type=float,
                        help="correct probabilities (and map the threshold) to this share of the positive class")


def run_evaluate(args) -> int:
    from .evaluation.evaluate import evaluate

    metrics = evaluate(args.run, args.data, args.out, batch_size=args.batch_size, n_boot=args.bootstrap,
                       gallery=args.gallery, tta=args.tta, prevalence=args.prevalence)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        line = f"accuracy {metrics['accuracy']:.4f}  AUC {metrics['auc']:.4f}  " \
               f"sensitivity {metrics['sensitivity']:.4f}  specificity {metrics['specificity']:.4f}  n {metrics['n']}"
        print(line)
        print(f"threshold {metrics['threshold']} ({metrics['threshold_source']})")
    return 0


def add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="classify image files and folders (CSV or JSON on stdout)",
                                 description="Classify image files and folders. " + UNREADABLE_RULE)
    parser.add_argument("run")
    parser.add_argument("paths", nargs="+", help="image files and/or folders")
    parser.add_argument("--format", choices=("csv", "json"), default="csv")
    parser.add_argument("--output", "-o", help="write to this file instead of stdout (written whole at the end, "
                                               "atomically: an interrupted run leaves no partial file)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default: 32, the fastest on 2 cores here)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="(--engine torch) auto: bf16 where the hardware computes it natively")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                        help="(--engine torch) torch.compile the network; auto: when there are enough images to repay it")
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="onnx: ONNX Runtime on RUN/export/model.onnx, exported there on first use; onnx-int8: "
                             "its int8 quantisation (fastest on CPU), kept only if validation AUC holds within 0.002")
    add_operating_point_flags(parser)
    parser.set_defaults(func=run_predict)


def run_predict(args) -> int:
    from .data.folders import expand_paths
    from .deploy.predict import load_engine, write_rows

    paths = expand_paths(args.paths)
    predictor = load_engine(args.run, args.engine, precision=args.precision, compile=args.compile,
                            n_images=len(paths), batch_size=args.batch_size, tta=args.tta,
                            prevalence=args.prevalence)
    unreadable = []

    def counted(rows):
        for row in rows:
            if row.get("error"):
                unreadable.append(row["file"])
            yield row

    rows = counted(predictor.iter_predict(paths, batch_size=args.batch_size))
    if args.output:
        with atomic_stream(args.output, newline="") as out:
            count = write_rows(rows, predictor.classes, args.format, out)
        print(f"{count} predictions written to {args.output}", file=sys.stderr)
    else:
        write_rows(rows, predictor.classes, args.format, sys.stdout)
    if unreadable:
        print(f"xferlearn: {len(unreadable)} of {len(paths)} files could not be read (their rows say why).",
              file=sys.stderr)
    return 1 if unreadable else 0


def add_backbones(commands) -> None:
    parser = commands.add_parser("backbones", help="the backbones and which weights each can get right now")
    parser.add_argument("--json", action="store_true")
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
    print("Any other timm model name works too (with --weights imagenet, a file, or none).")
    return 0


def add_serve(commands) -> None:
    parser = commands.add_parser("serve", help="serve a run over HTTP: POST /predict, GET /health, /model, an upload page",
                                 description="Serve RUN over HTTP (uvicorn). Binds 127.0.0.1 unless --host says "
                                             "otherwise; the upload page is at /, the API docs at /docs.")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000; 0 picks a free one)")
    parser.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload in MB (default: 20)")
    parser.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from .deploy.guards import tame_allocator
    from .deploy.serve import serve

    tame_allocator()
    if not args.max_upload_mb > 0:
        raise XferlearnError(f"--max-upload-mb must be positive, not {args.max_upload_mb}.")
    serve(args.run, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 2**20))
    return 0


def add_explain(commands) -> None:
    parser = commands.add_parser("explain", help="Grad-CAM heatmaps: where the model looked, one PNG per image",
                                 description="Write NAME.gradcam.png into --out for each image: the image, its "
                                             "Grad-CAM overlay for the predicted class, and the prediction. "
                                             + UNREADABLE_RULE)
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
    parser = commands.add_parser("export", help="export a run as ONNX or TorchScript, with a model.json sidecar")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                        help="onnx-int8: the ONNX export quantised to int8, kept only if validation AUC holds")
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


COMMANDS = [add_train, add_evaluate, add_predict, add_backbones, add_serve, add_explain, add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xferlearn", description="Transfer learning on a folder of images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except XferlearnError as error:
        print(f"xferlearn: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a write the library did not route through _io (a bug), still one line
        print(f"xferlearn: error: {os_error(error.filename or '(unnamed file)', error, 'read or write')}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xferlearn: interrupted; completed work is kept (train again with --resume to continue).",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
