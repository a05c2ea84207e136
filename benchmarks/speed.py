"""Speed, side by side on one machine and one data folder: the article's Keras pipeline and xferlearn.

    pip install -e '.[bench]'        # tensorflow-cpu, for the Keras reference
    python benchmarks/speed.py [--data DIR] [--limit N] [--skip-keras] [--out results.md]

In one run, each step a subprocess of its own (TensorFlow and PyTorch never share a process,
and every xferlearn figure is a user's command timed end to end, start-up included):
1. the Keras reference (benchmarks/keras_reference.py): the article's VGG16 pipeline, timed over
   a few `model.fit` steps after a warm-up and projected to 5 epochs of the folder's images;
2. xferlearn's equivalent of the article's recipe, `xferlearn train DATA --backbone vgg16
   --weights none --recipe linear --augment article --views 1 --epochs 5`, with a fresh cache,
   then once more on the now warm cache (what a second experiment on the same data costs);
3. xferlearn's default recipe (`xferlearn train DATA --out RUN`), fresh cache;
4. `xferlearn predict` on the whole folder with the default run, per engine: PyTorch fp32, PyTorch
   bf16, and ONNX Runtime fp32 and int8 where `xferlearn predict --help` offers them (exported and
   quantised first, timed apart), and `xferlearn predict RUN DATA` with no flags (the engine a user
   gets by default, named in the report); then the AUC of each against fp32, from the CSVs and the
   folder labels, on the run's validation split and on all images. They must agree within 0.002
   (exit 1 otherwise);
5. the upper bound of prediction: each ONNX model alone (fp32, and int8 where its check kept it;
   ONNX Runtime as `predict` sets it up, in predict's batches on a CPU) on random pixels already in
   memory, no files, no decoding, no start-up; each end-to-end ONNX figure is reported as a share of it;
6. unless --no-finetune, the fine-tune recipe (`xferlearn train DATA --recipe finetune`), timed
   end to end on the default recipe's warm cache.

It prints a markdown table of the times and ratios (Keras's projection / xferlearn's time), the
machine, the versions and the command that made them, and writes it to --out if given.

Augmentation is not drawn the same way. Keras draws a fresh random shear/zoom/flip of every image
in every epoch: 5 epochs are 5 augmented passes of VGG16 over every image. xferlearn's linear
recipe computes frozen features once per image and view and caches them: `--views K` gives K
augmented views per training image (the same preset: shear 0.2 degrees, zoom 0.8-1.2, flip),
beside the clean image, fixed per (image, view, seed) and reused by every epoch and every later
run. The default, K = 1 (as in xferlearn's default recipe), is 0.8 x 2 + 0.2 = 1.8 passes of
VGG16 per image where Keras's 5 epochs make 5; `--views 5` makes as many passes as Keras. In
both cases xferlearn's epochs recycle the cached draws where Keras's see new ones. The report
spells this out, with the preset's two small departures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_TRAIN = HERE.parents[0].parent / "shared" / "data" / "chest_xray_224" / "train"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
XFERLEARN = [sys.executable, "-m", "xferlearn.cli"]
AGREEMENT = 0.002  # largest AUC difference between an engine and PyTorch fp32 that passes


# --- data and machine -------------------------------------------------------------------------
def class_files(data: Path) -> dict[str, list[Path]]:
    folders = sorted(d for d in data.iterdir() if d.is_dir())
    files = {d.name: sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
             for d in folders}
    if len(files) < 2 or not all(files.values()):
        sys.exit(f"speed: {data} needs at least two class folders with images in them")
    return files


def subset_folder(data: Path, limit: int, dest: Path) -> Path:
    """A folder of symlinks to `limit` images of `data`, classes in their proportions, spread evenly
    over each class's sorted files (so over many patients, not the first few)."""
    files = class_files(data)
    total = sum(len(v) for v in files.values())
    if limit < 12 * len(files):
        sys.exit(f"speed: --limit {limit} is too small for a validation split; use at least {12 * len(files)}")
    for name, paths in files.items():
        take = max(6, round(limit * len(paths) / total))
        step = len(paths) / take
        (dest / name).mkdir(parents=True)
        for k in range(min(take, len(paths))):
            source = paths[int(k * step)]
            (dest / name / source.name).symlink_to(source.resolve())
    return dest


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores,
            "flags": {f: f in flags for f in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")}}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("xferlearn", "torch", "torchvision", "timm", "lightning", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


# --- running the steps ------------------------------------------------------------------------
def timed(command: list[str], env: dict | None = None, may_fail: bool = False) -> float | None:
    """Run a command as a user would, its output passing through; seconds from start to exit.
    A failure ends the benchmark, or, with `may_fail` (an int8 export its check may refuse), is None."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        if may_fail:
            return None
        sys.exit(f"speed: this command failed with exit status {done.returncode}:\n  {shlex.join(command)}")
    return seconds


def keras_reference(data: Path, images: int, steps: int, warmup: int, work: Path) -> dict:
    result_file = work / "keras.json"
    # KERAS_PYTHON: a Python with tensorflow-cpu, where TensorFlow must not share an environment with torch.
    command = [os.environ.get("KERAS_PYTHON", sys.executable), str(HERE / "keras_reference.py"), str(data), "--steps", str(steps),
               "--warmup", str(warmup), "--images", str(images), "--json", str(result_file)]
    seconds = timed(command)
    result = json.loads(result_file.read_text())
    result["wall_s"] = seconds
    return result


def train_run(name: str, data: Path, options: list[str], work: Path, cache: Path) -> dict:
    run = work / "runs" / name
    command = [*XFERLEARN, "train", str(data), "--out", str(run), *options, "--cache-dir", str(cache)]
    seconds = timed(command, {"XFERLEARN_CACHE": str(cache)})
    metrics = json.loads((run / "validation_metrics.json").read_text())
    return {"name": name, "command": shlex.join(command), "seconds": seconds, "run": run,
            "val_auc": metrics.get("auc")}


DEFAULT_LABEL = "default (no flags)"


def native_bf16() -> bool:
    try:
        from xferlearn.models.base import cpu_supports_bf16
    except ImportError:
        return True
    return cpu_supports_bf16()


def predict_engines() -> list[tuple[str, list[str]]]:
    """The predict variants this xferlearn offers, read from its own --help; PyTorch fp32 first
    (the reference of the agreement table), the flag-less default last."""
    help_text = subprocess.run([*XFERLEARN, "predict", "--help"], capture_output=True, text=True).stdout
    engines = [("PyTorch fp32", ["--precision", "fp32"] + (["--engine", "torch"] if "auto" in help_text else []))]
    if "bf16" in help_text and native_bf16():  # emulated bf16 is many times slower than fp32: no figure worth having
        engines.append(("PyTorch bf16", ["--precision", "bf16"] + (["--engine", "torch"] if "auto" in help_text else [])))
    if "--engine" in help_text and "onnx" in help_text:
        engines.append(("ONNX Runtime", ["--engine", "onnx"]))
    if "onnx-int8" in help_text:
        engines.append(("ONNX Runtime int8", ["--engine", "onnx-int8"]))
    engines.append((DEFAULT_LABEL, []))
    return engines


UPPER_BOUND = """
import json, sys, time
import numpy as np
from xferlearn.deploy.onnx_runtime import OnnxPredictor
predictor = OnnxPredictor(sys.argv[1], int8=sys.argv[4] == "int8")
size, batch, seconds = predictor.preprocessing.input_size, int(sys.argv[2]), float(sys.argv[3])
pixels = np.random.default_rng(0).integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
for _ in range(3):
    predictor.probabilities(pixels)
done, started = 0, time.perf_counter()
while time.perf_counter() - started < seconds:
    predictor.probabilities(pixels)
    done += batch
print(json.dumps({"images_per_s": done / (time.perf_counter() - started), "batch": batch, "images": done}))
"""


def upper_bound(run: Path, precision: str, seconds: float = 20.0) -> dict:
    """The ONNX model alone (`precision` fp32 or int8), as `predict --engine onnx|onnx-int8` sets it
    up (threads, and predict's batch size on a CPU), on random pixels in memory: what prediction
    would reach with free decoding, files and start-up."""
    try:
        from xferlearn.cli_run import CPU_BATCH as batch
    except ImportError:  # before session 19, predict's batches were 32 everywhere
        batch = 32
    command = [sys.executable, "-c", UPPER_BOUND, str(run / "export"), str(batch), str(seconds), precision]
    print(f"\n$ python -c UPPER_BOUND {run / 'export'} {batch} {seconds} {precision}  (benchmarks/speed.py)",
          flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"speed: the upper-bound measurement failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "precision": precision}


def default_engine(run: Path) -> str:
    """The engine `xferlearn predict RUN` picks with no flags (None where it has no --engine auto)."""
    try:
        from xferlearn.deploy.predict import resolve_engine
    except ImportError:
        return "torch"
    return resolve_engine(run, "auto")


def predict_run(label: str, flags: list[str], run: Path, data: Path, work: Path) -> dict:
    output = work / f"predict-{label.lower().replace(' ', '-')}.csv"
    command = [*XFERLEARN, "predict", str(run), str(data), *flags, "--output", str(output)]
    seconds = timed(command, {"XFERLEARN_CACHE": str(work / "cache-default")})
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {"label": label, "command": shlex.join(command), "seconds": seconds, "rows": rows,
            "images_per_s": len(rows) / seconds}


# --- agreement between engines ----------------------------------------------------------------
def scores(rows: list[dict], positive: str) -> dict[tuple[str, str], tuple[int, float, str]]:
    """(class folder, file name) -> (is positive, probability of the positive class, decided class)."""
    out = {}
    for row in rows:
        if row["error"]:
            continue
        path = Path(row["file"])
        out[(path.parent.name, path.name)] = (int(path.parent.name == positive), float(row[f"p_{positive}"]),
                                              row["class"])
    return out


def auc(scored: dict, keys) -> float:
    from sklearn.metrics import roc_auc_score

    keys = [k for k in keys if k in scored]
    truth = [scored[k][0] for k in keys]
    if len(set(truth)) < 2:  # a tiny --limit split can miss a class: no AUC, and no agreement claimed
        return float("nan")
    return float(roc_auc_score(truth, [scored[k][1] for k in keys]))


def auc_step(scored: dict, keys) -> float:
    """The smallest change in AUC one swapped (positive, negative) pair makes: below it, two AUCs
    cannot be told apart, so a tolerance smaller than this step cannot be judged on these images."""
    truth = [scored[k][0] for k in keys if k in scored]
    pairs = sum(truth) * (len(truth) - sum(truth))
    return 1.0 / pairs if pairs else float("inf")


def agreement(predictions: list[dict], run: Path) -> list[dict]:
    """Each engine against the first (PyTorch fp32): AUC on the run's validation split and on all
    images, the largest probability difference, and how often the decided class is the same."""
    from xferlearn.models.checkpoint import load_checkpoint

    positive = load_checkpoint(run).positive_class
    split = json.loads((run / "split.json").read_text())
    val_keys = [(Path(s["path"]).parent.name, Path(s["path"]).name) for s in split["val"]]
    reference = scores(predictions[0]["rows"], positive)
    rows = []
    for prediction in predictions:
        scored = scores(prediction["rows"], positive)
        common = [k for k in reference if k in scored]
        row = {"label": prediction["label"], "n": len(scored), "n_val": sum(k in scored for k in val_keys),
               "max_dp": max(abs(scored[k][1] - reference[k][1]) for k in common),
               "same_class": sum(scored[k][2] == reference[k][2] for k in common) / len(common),
               "unjudged": []}
        verdicts = []
        for name, keys in (("val", val_keys), ("all", list(scored))):
            row[f"auc_{name}"] = auc(scored, keys)
            row[f"d_auc_{name}"] = row[f"auc_{name}"] - auc(reference, keys)
            # A set where one swapped pair moves the AUC by more than the tolerance (the validation
            # split of a small --limit run) can neither pass nor fail: it is named, not judged.
            step = auc_step(scored, keys)
            if step > AGREEMENT:
                label = "validation" if name == "val" else "all images"
                row["unjudged"].append(f"{label} (one pair = {step:.4f})" if step < float("inf")
                                       else f"{label} (one class only)")
            else:
                verdicts.append(abs(row[f"d_auc_{name}"]) <= AGREEMENT)
        row["agrees"] = all(verdicts) if verdicts else None
        rows.append(row)
    return rows


# --- the report -------------------------------------------------------------------------------
def targets(keras: dict | None, trains: list[dict], predictions: list[dict], agree: list[dict],
            finetune: dict | None = None, default_val_auc_before: float | None = None, refused=(), bounds=()):
    """(statement, met) for each figure issue 13 asks of this benchmark (the service's are serve_load.py's)."""
    default = next(t for t in trains if t["name"] == "default")
    auc_note = f", validation AUC {default['val_auc']:.4f}" if default["val_auc"] is not None else ""
    if keras:
        ratio = keras["projected_s"] / default["seconds"]
        yield (f"default recipe from a cold data cache in at most 60 s ({default['seconds']:.0f} s{auc_note}) and at "
               f"least 40x faster than the Keras pipeline's 5-epoch projection ({ratio:.1f}x)",
               default["seconds"] <= 60 and ratio >= 40)
    else:
        yield (f"default recipe from a cold data cache in at most 60 s ({default['seconds']:.0f} s{auc_note}; "
               "the Keras ratio not measured: --skip-keras)", default["seconds"] <= 60)
    holds = {a["label"]: a["agrees"] for a in agree}
    by_label = {p["label"]: p for p in predictions}
    if DEFAULT_LABEL in by_label:
        chosen = by_label[DEFAULT_LABEL]
        alone = {"onnx": "fp32", "onnx-int8": "int8"}.get(chosen.get("engine"))
        bound = next((b for b in bounds if b["precision"] == alone), None)
        yield (f"the default `predict` engine ({chosen.get('engine', '?')}) at least 300 img/s end to end "
               f"({chosen['images_per_s']:.0f} img/s" + (f"; the model alone, no files or decoding: "
                                                        f"{bound['images_per_s']:.0f} img/s" if bound else "") + ")",
               chosen["images_per_s"] >= 300)
    int8 = by_label.get("ONNX Runtime int8")
    if int8:
        yield (f"`predict --engine onnx-int8` at least 500 img/s end to end ({int8['images_per_s']:.0f} img/s) with "
               f"AUC within {AGREEMENT} of fp32 ({'yes' if holds.get(int8['label']) else 'NO'})",
               int8["images_per_s"] >= 500 and bool(holds.get(int8["label"])))
    if "onnx-int8" in refused:
        yield ("`predict --engine onnx-int8` at least 500 img/s within 0.002 AUC of fp32 (the int8 model was refused "
               "by its validation check on this machine: not measurable)", False)
    if finetune:
        yield (f"the fine-tune recipe in at most 10 minutes ({minutes(finetune['seconds'])}, validation AUC "
               f"{finetune['val_auc']:.4f})", finetune["seconds"] <= 600)


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def markdown(args, data: Path, images: int, machine: dict, keras: dict | None, trains: list[dict],
             predictions: list[dict], export_s: dict[str, float], agree: list[dict], loads: tuple[str, str],
             bounds: list[dict] = (), finetune: dict | None = None, refused: dict[str, str] | None = None) -> str:
    refused = refused or {}
    command = shlex.join([sys.executable, *sys.argv])
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["flags"].items())
    soft = ", ".join(f"{k} {v}" for k, v in versions().items())
    if keras:
        soft += f", TensorFlow {keras['versions']['tensorflow']}, {keras['versions']['keras']}"
    lines = [
        "# Speed: the article's Keras pipeline vs xferlearn, same machine, same data",
        "",
        f"- command: `{command}`",
        f"- machine: {machine['cpu']}, {machine['cores']} usable cores; {flags}",
        f"- load average (1, 5, 15 min) at start: {loads[0]}; at end: {loads[1]}",
        f"- versions: {soft}",
        f"- data: {data} ({images} images" + (f", a --limit {args.limit} subset of {args.data}" if args.limit else "")
        + ")",
        "",
        "## Training",
        "",
        "| what | time | Keras projected / this | validation AUC |",
        "|---|---|---|---|",
    ]
    reference_s = keras["projected_s"] if keras else None
    if keras:
        lines.append(f"| Keras reference: article pipeline, VGG16, 5 epochs x {images} images (projected from "
                     f"{keras['images_per_s']:.2f} img/s over {keras['timed_steps']} steps of "
                     f"{keras['batch_size']}) | {minutes(keras['projected_s'])} | 1.00 | not measured |")
    for train in trains:
        ratio = f"{reference_s / train['seconds']:.2f}" if reference_s else "n/a (--skip-keras)"
        val_auc = "n/a" if train["val_auc"] is None else f"{train['val_auc']:.4f}"
        lines.append(f"| {train['what']} | {minutes(train['seconds'])} | {ratio} | {val_auc} |")
    lines += ["", "Commands:", ""]
    if keras:
        lines.append(f"- Keras reference: `{keras['command']}` (pipeline: {keras['pipeline']})")
    lines += [f"- {train['what']}: `{train['command']}`" for train in trains]
    lines += ["", f"## Prediction: `xferlearn predict` on all {images} images, end to end "
                  "(start-up, model load, JPEG decoding, CSV)", "",
              "| engine | time | images/s |", "|---|---|---|"]
    lines += [f"| {p['label']}{' = ' + p['engine'] if p.get('engine') else ''} | {p['seconds']:.1f} s | "
              f"{p['images_per_s']:.1f} |" for p in predictions]
    for bound in bounds:
        label, engine = {"fp32": ("ONNX Runtime", "onnx"), "int8": ("ONNX Runtime int8", "onnx-int8")}[bound["precision"]]
        measured = next((p for p in predictions if p["label"] == label), None)
        share = f"; end to end, `predict --engine {engine}` runs at " \
                f"{100 * measured['images_per_s'] / bound['images_per_s']:.0f}% of it" if measured else ""
        lines.append(f"\nUpper bound: the {bound['precision']} ONNX model alone (ONNX Runtime as `predict` sets it up, "
                     f"batches of {bound['batch']}) on random pixels in memory, no files, decoding or start-up: "
                     f"{bound['images_per_s']:.1f} images/s over {bound['images']} images{share}.")
    for fmt, seconds in export_s.items():
        lines.append(f"\n`xferlearn export RUN --format {fmt}` took {seconds:.1f} s, before and apart from the "
                     "prediction times above" + (" (calibration on 256 training images, then the check on the "
                                                 "validation split)" if fmt == "onnx-int8" else "") + ".")
    for fmt, reason in refused.items():
        lines.append(f"\n`xferlearn export RUN --format {fmt}` was refused by its validation check ({reason}): no "
                     "prediction figure for it on this machine.")
    lines += ["", "Commands:", ""] + [f"- {p['label']}: `{p['command']}`" for p in predictions]
    lines += ["", f"## Agreement with PyTorch fp32 (AUC from the CSVs against the folder labels; must be within "
                  f"{AGREEMENT})", "",
              "| engine | AUC validation split (n) | diff | AUC all images (n) | diff | max abs prob diff | "
              "same class | within 0.002 |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {a['label']} | {a['auc_val']:.5f} ({a['n_val']}) | {a['d_auc_val']:+.5f} | {a['auc_all']:.5f} "
              f"({a['n']}) | {a['d_auc_all']:+.5f} | {a['max_dp']:.6f} | {100 * a['same_class']:.2f}% | "
              f"{ {True: 'yes', False: 'NO', None: 'cannot tell'}[a['agrees']]}"
              f"{'; too few images to judge ' + ', '.join(a['unjudged']) if a['unjudged'] else ''} |" for a in agree]
    # The article-recipe rows' bullets only where those rows were run (--no-article leaves them out).
    article_notes = [
        f"- Augmentation: Keras draws a fresh random shear/zoom/flip of every image in each of its 5 epochs "
        f"and never shows the clean image. xferlearn's linear recipe computes the frozen features once per "
        f"image and view and caches them: `--views {args.views}` gives {args.views} augmented views per "
        "training image beside the clean one, fixed per (image, view, seed); its 5 epochs recycle those "
        f"{args.views} draws where Keras's see new ones. The preset follows the article (shear 0.2 degrees, "
        "zoom 0.8-1.2, horizontal flip) with two small differences: Keras zooms each axis independently and "
        "fills the edges with the nearest pixel, xferlearn (torchvision RandomAffine) zooms both axes together "
        "and fills with black.",
        f"- The VGG16 work: Keras runs 5 passes over all N images (5N; the article trains on "
        f"all of train and validates on the test set); xferlearn holds out 20% for validation and runs "
        f"{args.views} augmented + 1 clean pass over the other 80% and one over the validation 20%: "
        f"N x (0.8 x {args.views + 1} + 0.2) = {0.8 * (args.views + 1) + 0.2:.1f}N.",
        "- The warm-cache run is the same command again on the same cache: features are read back, only the "
        "head trains (what a second experiment on the same data costs). The Keras pipeline has no such cache: "
        "each run costs the full projection again.",
    ] if args.article else []
    lines += ["", "## How to read this", "",
              "- Keras's time is projected from a few timed `model.fit` steps (training steps only: its start-up and "
              "the article's per-epoch pass over the test set are left out, in its favour). Every xferlearn time is "
              "the whole command, start-up, scan, decoding, features, fit and checkpoint included.",
              "- VGG16 starts from random weights on both sides (ImageNet weights cannot be fetched offline); the "
              "computation per image is the same. xferlearn's `--precision auto` computes in bf16 where the CPU "
              "does so natively (avx512_bf16/AMX), Keras in fp32 (its default).",
              *article_notes,
              "- The int8 engine decides at its own threshold, chosen on the validation split through the int8 model "
              "(recorded in the export's model.json), so its 'same class' share compares two validation operating "
              "points, not one.",
              ]
    if args.limit:
        lines += ["- This is a --limit smoke run: start-up dominates every time above, and the ratios say "
                  "nothing about the full-size figures."]
    if finetune:
        lines += ["", "## Fine-tune", "", f"- `{finetune['command']}`: {minutes(finetune['seconds'])}, validation "
                  f"AUC {finetune['val_auc']:.4f} (on the default recipe's warm data cache: decoding is not in it)"]
    lines += ["", "## Targets (issue 13; the service's are benchmarks/serve_load.py's)", ""] + \
        [f"- {'met' if ok else 'NOT met'}: {what}" for what, ok in targets(keras, trains, predictions, agree, finetune,
                                                                                    refused=refused, bounds=bounds)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED_TRAIN), help="a folder of class folders "
                        "(default: ../shared/data/chest_xray_224/train)")
    parser.add_argument("--limit", type=int, help="use N images of DATA (symlinks, classes in proportion): smoke runs")
    parser.add_argument("--skip-keras", action="store_true", help="leave out the Keras reference")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--views", type=int, default=1, help="augmented views in the article-recipe run (default: 1; the default recipe has none)")
    parser.add_argument("--keras-steps", type=int, default=10, help="timed Keras steps (default: 10)")
    parser.add_argument("--keras-warmup", type=int, default=2, help="untimed Keras steps first (default: 2)")
    parser.add_argument("--no-warm-run", dest="warm_run", action="store_false",
                        help="leave out the second, warm-cache run of the article recipe")
    parser.add_argument("--workdir", help="keep runs, caches and CSVs here (default: a temporary folder, removed)")
    parser.add_argument("--no-article", dest="article", action="store_false",
                        help="leave out the article recipe's runs (VGG16 in fp32 on a small CPU takes 20 minutes or more)")
    parser.add_argument("--no-finetune", dest="finetune", action="store_false",
                        help="leave out the fine-tune recipe's timing (about 10 minutes)")
    args = parser.parse_args(argv)

    source = Path(args.data)
    if not source.is_dir():
        sys.exit(f"speed: no such data folder: {source} (the shared data is absent here? pass --data DIR)")
    if args.workdir:
        work = Path(args.workdir)
        if work.exists() and any(work.iterdir()):
            sys.exit(f"speed: --workdir {work} is not empty; the caches must start fresh")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="xferlearn-speed-"))
    try:
        return benchmark(args, source, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def benchmark(args, source: Path, work: Path) -> int:
    data = subset_folder(source, args.limit, work / "data") if args.limit else source
    images = sum(len(v) for v in class_files(data).values())
    machine, start_load = cpu_info(), load_average()
    print(f"speed: {images} images in {data}; work folder {work}; load average {start_load}", flush=True)

    keras = None
    if not args.skip_keras:
        keras = keras_reference(data, images, args.keras_steps, args.keras_warmup, work)

    article = ["--backbone", "vgg16", "--weights", "none", "--recipe", "linear", "--augment", "article",
               "--views", str(args.views), "--epochs", "5"]
    trains = []
    if args.article:
        cold = train_run("article-vgg16", data, article, work, work / "cache-article")
        cold["what"] = f"xferlearn, article recipe (VGG16, linear, --views {args.views}, 5 epochs), fresh cache"
        trains.append(cold)
    if args.article and args.warm_run:
        warm = train_run("article-vgg16-warm", data, article, work, work / "cache-article")
        warm["what"] = "the same again, warm cache"
        trains.append(warm)
    default = train_run("default", data, [], work, work / "cache-default")
    default["what"] = "xferlearn default recipe (`xferlearn train DATA --out RUN`), fresh cache"
    trains.append(default)

    engines = predict_engines()
    export_s, refused = {}, {}
    for fmt in [flags[flags.index("--engine") + 1] for _, flags in engines if "--engine" in flags]:
        if fmt == "torch":
            continue
        # Export apart, so the ONNX Runtime figures are prediction alone (predict would export on first use).
        seconds = timed([*XFERLEARN, "export", str(default["run"]), "--format", fmt],
                        {"XFERLEARN_CACHE": str(work / "cache-default")}, may_fail=fmt == "onnx-int8")
        if seconds is None:  # int8 failed its validation check: it is not an engine of this run
            card = json.loads((default["run"] / "export" / "model.json").read_text())
            refused[fmt] = card.get("int8_refused", {}).get("reason", "its message is in the log above")
            engines = [(label, flags) for label, flags in engines if fmt not in flags]
        else:
            export_s[fmt] = seconds
    predictions = [predict_run(label, flags, default["run"], data, work) for label, flags in engines]
    for prediction in predictions:
        if prediction["label"] == DEFAULT_LABEL:
            prediction["engine"] = default_engine(default["run"])
    agree = agreement(predictions, default["run"])
    bounds = [upper_bound(default["run"], precision) for precision, fmt in (("fp32", "onnx"), ("int8", "onnx-int8"))
              if fmt in export_s]
    finetune = None
    if args.finetune:
        finetune = train_run("finetune", data, ["--recipe", "finetune"], work, work / "cache-default")

    report = markdown(args, data, images, machine, keras, trains, predictions, export_s, agree,
                      (start_load, load_average()), bounds, finetune, refused)
    print("\n" + report, flush=True)
    if args.out:
        from xferlearn._io import atomic_write
        atomic_write(Path(args.out), report)
        print(f"speed: written to {args.out}")
    if args.workdir:
        print(f"speed: runs, caches and CSVs kept in {work}")
    return 1 if any(a["agrees"] is False for a in agree) else 0


if __name__ == "__main__":
    sys.exit(main())
