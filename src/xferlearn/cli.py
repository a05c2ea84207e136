"""The `xferlearn` command: parses arguments, calls the library, prints.

Every command is a few lines over a library function. A user-fixable problem
(XferlearnError) prints one line and exits 2; an interrupted run says how to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields

from .config import COMPILE_MODES, ENGINES, ONNX_EXPORT_PAYS, PRECISIONS, TrainConfig
from .cli_run import (UNREADABLE_RULE, add_backbones, add_batch_size, add_calibrate, add_explain, add_export,
                      add_serve, add_stress, batch_size)
from ._io import atomic_stream, os_error
from .errors import XferlearnError

# TrainConfig fields the CLI does not expose as flags (data is positional).
_HIDDEN = {"data"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_TRAIN_EXAMPLES = """examples:
  xferlearn train data/chest_xray --out runs/xray
      a root with train/ (and a 16-image val/, pooled: too small to choose on)
  xferlearn train hymenoptera_data --out runs/ants --positive-class bees
      a root with train/ and val/: val/ is the validation split (>= {minimum} images a class)
  xferlearn train hymenoptera_data/train --out runs/ants-cv
      a small folder of class folders: chosen by {folds}-fold cross-fitting, trained on every image
  xferlearn train photos --recipe finetune --stages 4,9,all --no-cv
"""


def add_train(commands) -> None:
    from .config import CV_FOLDS, MIN_VAL_PER_CLASS

    parser = commands.add_parser(
        "train", help="train a classifier on a folder of class folders",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_TRAIN_EXAMPLES.format(minimum=MIN_VAL_PER_CLASS, folds=CV_FOLDS),
        description="Train on DATA: one subfolder per class, or a root with train/ [val/] [test/]. A val/ "
                    f"folder (or valid/, validation/, or --val) with at least {MIN_VAL_PER_CLASS} images a class "
                    "is the validation split; "
                    "a smaller one is pooled into train. Otherwise validation is held out from train (grouped by "
                    "patient where file names carry one) or, on small data, replaced by cross-fitting.")
    for f in fields(TrainConfig):
        meta = f.metadata
        if f.name in _HIDDEN:
            parser.add_argument(f.name, help=meta["help"])
            continue
        text = meta["help"]
        if f.name == "cv":
            parser.add_argument("--cv", type=int, metavar="K", help=f"{text} (default: automatic)")
            parser.add_argument("--no-cv", dest="cv", action="store_const", const=0,
                                help="never cross-fit: choose on a held-out split (or the validation folder)")
            continue
        if str(f.type).startswith("bool"):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                                help=text if f.default is None else f"{text} (default: %(default)s)")
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        choices = meta.get("choices")
        allowed = f"; one of: {', '.join(choices)}" if choices else ""
        default = "%(default)s" if f.default is not None else "see above" if "default:" in text else "none"
        # The allowed values are named in the help and metavar, and checked by TrainConfig, so a
        # wrong one gets its one-line error rather than argparse's usage block.
        metavar = "{" + ",".join(choices) + "}" if choices else meta.get("metavar")
        parser.add_argument(_flag(f.name), type=kind, default=f.default, metavar=metavar,
                            help=f"{text}{allowed} (default: {default})" if "(default:" not in text and
                            "default:" not in text else f"{text}{allowed}")
    parser.set_defaults(func=run_train)


def run_train(args) -> int:
    from .training.pipeline import train

    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    train(TrainConfig(**options))
    return 0


def add_evaluate(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="metrics.json, report.md and plots for a run on labelled data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate RUN's model on DATA at the operating point chosen in training. The images are "
                    "matched against the run's training and validation images (identical files and "
                    "re-encoded or resized copies); the count is printed and reported.",
        epilog="examples:\n  xferlearn evaluate runs/ants hymenoptera_data/val\n"
               "  xferlearn evaluate runs/xray data/chest_xray --strict     (its test/; exit 2 on any overlap)\n")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("data", help="a folder of class folders (or a Kaggle root: its test/ is used)")
    parser.add_argument("--out", help="where to write the report (default: the run folder)")
    parser.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                        help="print metrics.json to stdout (default: %(default)s)")
    add_batch_size(parser)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals "
                                                                    "(default: %(default)s)")
    parser.add_argument("--gallery", action=argparse.BooleanOptionalAction, default=True,
                        help="the error gallery: the most confident mistakes with Grad-CAM heatmaps "
                             "(default: %(default)s)")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                        help="refuse (exit 2) when any image is among the run's training or validation images "
                             "(default: %(default)s: report the overlap)")
    add_operating_point_flags(parser)
    parser.set_defaults(func=run_evaluate)


def add_operating_point_flags(parser) -> None:
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over test-time-augmented views (default: as the threshold was chosen)")
    parser.add_argument("--prevalence", type=float,
                        help="correct probabilities (and map the threshold) to this share of the positive class, "
                             "in (0, 1) (default: the training prior)")


def run_evaluate(args) -> int:
    from .evaluation.evaluate import evaluate
    from .evaluation.metrics import decision_rule

    metrics = evaluate(args.run, args.data, args.out, batch_size=batch_size(args), n_boot=args.bootstrap,
                       gallery=args.gallery, tta=args.tta, prevalence=args.prevalence, strict=args.strict)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(metrics["overlap"]["summary"], file=sys.stderr if not metrics["overlap"].get("total") else sys.stdout)
        line = f"accuracy {metrics['accuracy']:.4f}  AUC {metrics['auc']:.4f}  " \
               f"sensitivity {metrics['sensitivity']:.4f}  specificity {metrics['specificity']:.4f}  n {metrics['n']}"
        print(line)
        print(decision_rule(metrics["threshold"], metrics["threshold_source"], metrics.get("positive_class")))
    int8_note(args.run, metrics)
    return 0


def int8_note(run: str, metrics: dict) -> None:
    """Where `predict` and `serve` would decide with another model than the one evaluated: the
    run's checked int8 export, at the threshold chosen for it."""
    from .deploy.onnx_runtime import INT8_FILE, SIDECAR, read_sidecar
    from .deploy.predict import int8_ready
    from .rundir import RunDir

    folder = RunDir.of(run).export
    if metrics.get("threshold") is None or not int8_ready(run):
        return
    int8 = read_sidecar(folder / SIDECAR)["int8"]
    print(f"Note: these are the fp32 model's figures; predict and serve (engine auto) run {folder / INT8_FILE} at "
          f"its own threshold {int8['threshold']:.4f} ({int8['threshold_source']}); --engine onnx decides as "
          "evaluated.", file=sys.stderr)


def add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="classify image files and folders (CSV or JSON on stdout)",
                                 description="Classify image files and folders. " + UNREADABLE_RULE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n  xferlearn predict runs/ants photo.jpg more_photos/\n"
                                        "  xferlearn predict runs/ants folder/ --engine onnx-int8 --format json "
                                        "-o out.json\n")
    parser.add_argument("run", help="a run folder made by `xferlearn train`")
    parser.add_argument("paths", nargs="+", help="image files and/or folders")
    parser.add_argument("--format", choices=("csv", "json"), default="csv", help="csv or json (default: csv)")
    parser.add_argument("--output", "-o", help="write to this file instead of stdout (default: stdout; written "
                                               "whole at the end, atomically: an interrupted run leaves no partial file)")
    add_batch_size(parser)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help=f"(--engine torch) one of {', '.join(PRECISIONS)}; auto: bf16 on a GPU that computes "
                             "it natively, fp32 on a CPU, as the threshold was chosen (default: auto)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                        help=f"(--engine torch) one of {', '.join(COMPILE_MODES)}: torch.compile the network; auto: "
                             "when there are enough images to repay it (default: auto)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help=f"one of {', '.join(ENGINES)}; auto (default): onnx-int8 where `xferlearn export RUN "
                             "--format onnx-int8` has made it for the current checkpoint, else on a CPU onnx (for "
                             f"{ONNX_EXPORT_PAYS} images or more, or once the export exists), else torch; the line "
                             "it prints says which and why not int8; onnx: ONNX Runtime on RUN/export/model.onnx, "
                             "exported there on first use; onnx-int8: its int8 quantisation (fastest on CPU, its own "
                             "validation threshold), kept only if validation AUC holds within 0.002 and each class's "
                             "order with it")
    add_operating_point_flags(parser)
    parser.set_defaults(func=run_predict)


def run_predict(args) -> int:
    from .data.layout import expand_paths
    from .deploy.predict import load_engine, why_not_int8, write_rows

    paths = expand_paths(args.paths)
    size = batch_size(args)
    predictor = load_engine(args.run, args.engine, precision=args.precision, compile=args.compile,
                            n_images=len(paths), batch_size=size, tta=args.tta,
                            prevalence=args.prevalence)
    if not paths:  # as explain says: an empty CSV and exit 0 would pass for a clean result
        raise XferlearnError("No image files found in the paths given.")
    if args.engine == "auto":
        why = why_not_int8(args.run, getattr(predictor, "checkpoint", None)) if predictor.engine != "onnx-int8" else ""
        print(f"xferlearn: engine {predictor.engine} (auto{'; ' + why if why else ''})", file=sys.stderr)
    if predictor.threshold is not None:  # the rows give the threshold; where it came from is said once
        mapped = f"; mapped for a prevalence of {args.prevalence:g}" if args.prevalence is not None else ""
        print(f"xferlearn: {predictor.classes[predictor.positive_index]} where its probability >= "
              f"{predictor.threshold:.4g} ({predictor.threshold_source}{mapped})", file=sys.stderr)
    unreadable = []

    def counted(rows):
        for row in rows:
            if row.get("error"):
                unreadable.append(row["file"])
            yield row

    rows = counted(predictor.iter_predict(paths, batch_size=size))
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


def add_demo(commands) -> None:
    parser = commands.add_parser("demo", help="the whole job on a chest X-ray sample that ships with xferlearn: "
                                              "train, evaluate, explain (no data of your own needed)",
                                 description="Train the default recipe on the packaged sample's train/ part (140 "
                                             "X-rays), evaluate on its test/ part (60, other patients), explain one "
                                             "image, and print the commands to try next. Runs offline, "
                                             "with nothing of your own.",
                                 epilog="example: xferlearn demo --out xferlearn-demo")
    parser.add_argument("--out", default="xferlearn-demo",
                        help="the run folder to write (default: xferlearn-demo in the current folder)")
    parser.add_argument("--force", action=argparse.BooleanOptionalAction, default=False,
                        help="replace an earlier run in --out (default: refuse where --out holds a model)")
    parser.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .quickstart import demo

    demo(args.out, force=args.force)
    return 0


COMMANDS = [add_demo, add_train, add_evaluate, add_predict, add_backbones, add_serve, add_explain, add_export,
            add_stress, add_calibrate]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="xferlearn", description="Transfer learning on any folder of images: "
                                     "one subfolder per class.",
                                     epilog="Run `xferlearn COMMAND --help` for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"xferlearn {__version__}")
    parser.add_argument("-v", "--verbose", action=argparse.BooleanOptionalAction, default=False,
                        help="show library logs (default: %(default)s)")
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
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
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
