"""Train -> checkpoint -> predict -> evaluate on tiny models and synthetic images, through API and CLI."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_folder

import xferlearn
from xferlearn.models.checkpoint import load_checkpoint, save_checkpoint
from xferlearn.cli import main
from xferlearn.config import COLOUR_LINEAR_BACKBONE, DEFAULT_BACKBONE, TrainConfig
from xferlearn.data.contrast import is_grayscale_folder
from xferlearn.data.layout import find_layout, training_files
from xferlearn.errors import XferlearnError


def test_run_folder_holds_everything(tiny_run):
    for name in ("model.pt", "config.json", "split.json", "validation_metrics.json", "logs/metrics.csv",
                 "lightning/last.ckpt"):
        assert (tiny_run / name).exists(), name
    config = TrainConfig.load(tiny_run / "config.json")
    assert config.backbone == TINY["backbone"] and config.epochs == TINY["epochs"]
    # Saved again once the images decided what was left out: the augmentation the run trained with.
    assert config.augment is not None and config.augment == load_checkpoint(tiny_run).config["augment"]


def test_checkpoint_describes_itself(tiny_run):
    ckpt = load_checkpoint(tiny_run)
    assert ckpt.arch == "resnet18" and ckpt.weights == "none"
    assert ckpt.classes == ["NORMAL", "PNEUMONIA"] and ckpt.positive_class == "PNEUMONIA"
    assert 0.0 <= ckpt.threshold <= 1.0 and "validation split" in ckpt.threshold_source
    assert ckpt.preprocessing.input_size == 64 and ckpt.temperature > 0
    assert {"auc", "accuracy", "sensitivity", "specificity"} <= set(ckpt.metrics)
    assert {"xferlearn", "torch", "timm"} <= set(ckpt.versions)
    assert ckpt.config["recipe"] == "linear"
    raw = torch.load(tiny_run / "model.pt", weights_only=True)  # plain data only: safe to open
    assert raw["format"] == "xferlearn-checkpoint"


def test_head_learns_the_synthetic_task(tiny_run):
    assert load_checkpoint(tiny_run).metrics["auc"] >= 0.9


def test_predict_api_matches_across_inputs(tiny_run, tiny_data):
    model = xferlearn.load(tiny_run)
    path = sorted((tiny_data / "PNEUMONIA").iterdir())[0]
    by_path = model.predict(str(path))
    by_bytes = model.predict([path.read_bytes()])[0]
    assert by_path["class"] in model.classes
    assert by_path["probabilities"] == pytest.approx(by_bytes["probabilities"], abs=1e-6)
    assert sum(by_path["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert by_path["threshold"] == model.threshold


def test_predict_cli_csv_goes_past_unreadable_files(tiny_run, tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not a jpeg")
    # the exit-code rule predict shares with explain: 1 when some files could not be read (cli.UNREADABLE_RULE)
    assert main(["predict", str(tiny_run), str(tiny_data / "NORMAL"), str(bad)]) == 1
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 17 and rows[-1]["file"] == str(bad) and rows[-1]["error"] and not rows[-1]["class"]
    good = rows[:-1]
    assert all(r["class"] in ("NORMAL", "PNEUMONIA") and r["threshold"] for r in good)
    assert sum(r["class"] == "NORMAL" for r in good) >= 14  # the synthetic task is easy


def test_predict_cli_says_where_its_threshold_came_from_and_refuses_no_images(tiny_run, tiny_data, tmp_path, capsys):
    assert main(["predict", str(tiny_run), str(tiny_data / "NORMAL")]) == 0
    threshold = load_checkpoint(tiny_run).threshold
    assert f"PNEUMONIA where its probability >= {threshold:.4g} (Youden's J" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tiny_run), str(tmp_path / "empty")]) == 2
    assert "No image files found" in capsys.readouterr().err


def test_predict_cli_json(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "p.json"
    assert main(["predict", str(tiny_run), str(tiny_data), "--format", "json", "-o", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 32 and set(rows[0]) == {"file", "class", "probabilities", "threshold", "error"}


def test_evaluate_writes_report(tiny_run, tiny_data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_run), str(tiny_data), "--out", str(out), "--json", "--bootstrap", "200"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "auc", "sensitivity", "specificity", "threshold", "threshold_source",
                "confusion_matrix", "n", "classes"):
        assert key in saved and key in printed
    assert saved["n"] == 32 and saved["threshold"] == load_checkpoint(tiny_run).threshold
    assert np.array(saved["confusion_matrix"]).sum() == 32
    for name in ("report.md", "roc.png", "confusion_matrix.png", "training_curves.png"):
        assert (out / name).exists(), name
    assert "validation split" in (out / "report.md").read_text()


def test_an_output_folder_inside_the_images_is_refused_before_anything_is_written(tiny_run, tiny_data, tmp_path):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    with pytest.raises(XferlearnError, match="lies inside the images"):
        xferlearn.train(data=str(data), out=str(data / "run"), **TINY)
    with pytest.raises(XferlearnError, match="lies inside the images"):
        xferlearn.evaluate(tiny_run, data, data / "report", n_boot=10, gallery=False)
    with pytest.raises(XferlearnError, match="lies inside the images"):
        xferlearn.stress(tiny_run, data, data / "stress", shifts=["blur"], severities=[1], progress=False)
    with pytest.raises(XferlearnError, match="lies inside the images"):
        xferlearn.calibrate(tiny_run, data, data / "cal", min_per_class=2)
    val_folder = json.loads((tiny_run / "split.json").read_text())["val"][0]["path"]  # its class folder's parent
    with pytest.raises(XferlearnError, match="lies inside the images"):
        xferlearn.stress(tiny_run, out=Path(val_folder).parent / "stress", split="val", shifts=["blur"],
                         severities=[1], progress=False)
    assert sorted(p.name for p in data.iterdir()) == ["NORMAL", "PNEUMONIA"]  # nothing left in the data


def test_the_python_api_gives_one_line_errors_for_values_of_a_wrong_type(tiny_run, tmp_path):
    for call, message in [
            (lambda: xferlearn.train(data="d", out=str(tmp_path / "r"), epochs="five"), "--epochs takes int, not 'five'"),
            (lambda: TrainConfig(data="d", backbone=["resnet18"]), "--backbone takes str or None"),
            (lambda: xferlearn.load(5), "a run is a folder or file path"),
            (lambda: xferlearn.train("d", epochz=3), "no option 'epochz'; did you mean 'epochs'"),
            (lambda: xferlearn.evaluate(tiny_run, None), "DATA is a folder or file path")]:
        with pytest.raises(XferlearnError, match=message):
            call()
    assert TrainConfig(data=tmp_path, out=tmp_path / "r").out == str(tmp_path / "r")  # a Path is a path
    swept = TrainConfig(data="d", epochs=np.int64(5), lr=np.float32(0.5))  # numpy's numbers, as Python's
    assert (type(swept.epochs), type(swept.lr), swept.lr) == (int, float, 0.5)
    arrays = [np.zeros((64, 64), np.uint8), np.random.default_rng(0).random((64, 64, 3)), np.zeros((3, 64, 64))]
    rows = xferlearn.load(tiny_run).predict(arrays)  # grayscale uint8, colour floats in [0, 1], channels first
    assert rows[0]["class"] and rows[1]["class"] and rows[2]["class"] is None
    assert "channels last" in rows[2]["error"]


def test_a_threshold_rule_on_three_classes_is_refused(tmp_path):
    data = make_folder(tmp_path / "d", classes=("cat", "dog", "fox"), per_class=2)
    with pytest.raises(XferlearnError, match="--threshold target_sensitivity applies to two classes; these data have 3"):
        xferlearn.train(data=str(data), out=str(tmp_path / "r"), target_sensitivity=0.9, **TINY)


def test_evaluate_refuses_other_classes(tiny_run, tmp_path):
    data = make_folder(tmp_path / "other", classes=("CAT", "DOG"), per_class=2)
    with pytest.raises(XferlearnError, match="missing"):
        xferlearn.evaluate(tiny_run, data)
    root = tmp_path / "tf"  # TensorFlow's layout: train/ and validation/, no test/
    for part in ("train", "validation"):
        make_folder(root / part, per_class=2)
    with pytest.raises(XferlearnError, match=r"holds train/, validation/ with the model's classes .* no test/: give "
                                             r"the folder to evaluate, e.g. .*tf/validation"):
        xferlearn.evaluate(tiny_run, root)


def test_existing_run_is_not_overwritten(tiny_run, tiny_data):
    with pytest.raises(XferlearnError, match="already holds a trained model"):
        xferlearn.train(data=str(tiny_data), out=str(tiny_run), **TINY)


def test_resume_continues_from_last_checkpoint(tmp_path, image_folder):
    run = tmp_path / "run"
    xferlearn.train(data=str(image_folder), out=str(run), **{**TINY, "epochs": 1})
    epochs_logged = lambda: len({row["epoch"] for row in csv.DictReader(open(run / "logs" / "metrics.csv"))})  # noqa
    assert epochs_logged() == 1
    xferlearn.train(data=str(image_folder), out=str(run), resume=True, **{**TINY, "epochs": 3})
    assert epochs_logged() == 3  # epochs 1 and 2 were added, epoch 0 was not redone


@pytest.mark.parametrize("imbalance", ["none", "weights", "sampler"])
def test_imbalance_options_train(tmp_path, imbalance):
    data = make_folder(tmp_path / "d", per_class=12)
    for extra in sorted((data / "NORMAL").iterdir())[:6]:  # make it imbalanced
        extra.unlink()
    result = xferlearn.train(data=str(data), out=str(tmp_path / "r"), imbalance=imbalance, **TINY)
    assert result.metrics["n"] > 0 and load_checkpoint(result.run_dir).config["imbalance"] == imbalance


def test_feature_cache_is_reused(tmp_path, image_folder, monkeypatch):
    import xferlearn.models.features as features

    xferlearn.train(data=str(image_folder), out=str(tmp_path / "a"), **{**TINY, "views": 1})
    calls = []
    original = features.FeatureExtractor.__call__
    monkeypatch.setattr(features.FeatureExtractor, "__call__", lambda self, b: calls.append(len(b)) or original(self, b))
    xferlearn.train(data=str(image_folder), out=str(tmp_path / "b"), **{**TINY, "views": 1})
    assert calls == []  # every (image, view) came from the cache
    xferlearn.train(data=str(image_folder), out=str(tmp_path / "c"), **{**TINY, "views": 1, "seed": 1})
    assert sum(calls) > 0  # another seed: other augmented views, computed afresh


def test_a_fractional_view_covers_a_share_of_the_training_images_and_reuses_the_cache(tmp_path, monkeypatch):
    import xferlearn.models.features as features
    from xferlearn.models import onnx_forward

    # One engine for every view, whatever this CPU: cross-fitting scores its training views, so
    # they take validation's engine, which a split run's training views need not (feature_engine).
    monkeypatch.setattr(onnx_forward, "cpu_supports_bf16", lambda: False)
    data = make_folder(tmp_path / "d", per_class=40)
    calls = []
    original = features.FeatureExtractor.__call__
    monkeypatch.setattr(features.FeatureExtractor, "__call__", lambda self, b: calls.append(len(b)) or original(self, b))
    full = xferlearn.train(data=str(data), out=str(tmp_path / "full"), **{**TINY, "views": 1})
    n_train, n_val = len(json.loads((full.run_dir / "split.json").read_text())["train"]), full.metrics["n"]
    assert sum(calls) == 2 * n_train + n_val  # the clean pass, one view of every training image, validation
    calls.clear()
    half = xferlearn.train(data=str(data), out=str(tmp_path / "half"), **{**TINY, "views": 0.5})
    assert calls == []  # the half's views are the full run's rows: the same images, the same draws
    assert load_checkpoint(half.run_dir).config["views"] == 0.5
    calls.clear()
    xferlearn.train(data=str(data), out=str(tmp_path / "more"), **{**TINY, "views": 1.5})
    assert 0.3 * n_train < sum(calls) < 0.7 * n_train  # only the second view's half is new
    calls.clear()
    oof = xferlearn.train(data=str(data), out=str(tmp_path / "cv"), **{**TINY, "views": 0.5, "cv": 3})
    assert oof.metrics["n"] == 80  # every image, out of fold
    assert 0 < sum(calls) < n_val  # new rows only for the former validation images' share of the view


def test_the_contrast_step_follows_the_images_and_every_path_applies_it(tmp_path, image_folder):
    """Gray images (X-rays) get CLAHE by default, colour ones not; the saved run then applies it in
    predict through PyTorch and ONNX Runtime exactly as training's validation did."""
    from PIL import Image

    gray = xferlearn.train(data=str(image_folder), out=str(tmp_path / "gray"), **TINY).run_dir
    assert load_checkpoint(gray).preprocessing.contrast == "clahe"
    with open(gray / "validation_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    recorded = np.array([float(row["p_PNEUMONIA"]) for row in rows])
    for engine in ("torch", "onnx"):  # fp32 by name: PyTorch's "auto" is bf16 on a CPU that has it
        predicted = [row["probabilities"]["PNEUMONIA"]
                     for row in xferlearn.predict(gray, [row["file"] for row in rows], engine=engine, precision="fp32")]
        np.testing.assert_allclose(predicted, recorded, atol=2e-4, err_msg=engine)
    sidecar = json.loads((gray / "export" / "model.json").read_text())
    assert "CLAHE" in sidecar["preprocessing"]["note"] and sidecar["preprocessing"]["contrast"] == "clahe"

    # --views left out: gray images get a sensor-noise view (with or without CLAHE), colour ones none.
    unset = {k: v for k, v in TINY.items() if k != "views"}
    off = xferlearn.train(data=str(image_folder), out=str(tmp_path / "off"), contrast="none", **unset).run_dir
    assert load_checkpoint(off).preprocessing.contrast == "none"
    assert (load_checkpoint(off).config["views"], load_checkpoint(off).config["augment"]) == (0.25, "noise")
    for path in image_folder.rglob("*.jpeg"):  # the same images, tinted: a colour set
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        Image.fromarray((rgb * [1.0, 0.8, 0.6]).astype(np.uint8)).save(path)
    colour = xferlearn.train(data=str(image_folder), out=str(tmp_path / "colour"), **unset).run_dir
    assert load_checkpoint(colour).preprocessing.contrast == "none"
    assert (load_checkpoint(colour).config["views"], load_checkpoint(colour).config["augment"]) == (0, "article")
    with pytest.raises(XferlearnError, match=r"--contrast must be one of \('auto', 'clahe', 'none'\)"):
        TrainConfig(data=str(image_folder), contrast="sharpen")


def test_colour_images_go_through_the_packaged_networks_at_320_px(tmp_path, image_folder):
    """The linear recipe on colour images with the packaged EfficientNet-Lites, --image-size left out:
    320 px (config.COLOUR_IMAGE_SIZE), saved with the run so predict uses it; grayscale images, other
    networks, the fine-tune and a size the user gave keep theirs. --backbone left out: Lite0 and
    Lite2 (config.COLOUR_LINEAR_BACKBONE) for colour images, the three Lites for grayscale ones."""
    from PIL import Image

    quick = dict(epochs=2, views=0, cv=0)  # --backbone left out below: Lite0+Lite2 for the colour images
    gray = xferlearn.train(data=str(image_folder), out=str(tmp_path / "gray"), backbone="efficientnet_lite0",
                           **quick).run_dir
    assert load_checkpoint(gray).image_size is None and load_checkpoint(gray).preprocessing.input_size == 224
    for path in image_folder.rglob("*.jpeg"):  # the same images, tinted: a colour set
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        Image.fromarray((rgb * [1.0, 0.8, 0.6]).astype(np.uint8)).save(path)
    assert not is_grayscale_folder(training_files(find_layout(image_folder)))
    colour = xferlearn.train(data=str(image_folder), out=str(tmp_path / "colour"), **quick).run_dir
    checkpoint = load_checkpoint(colour)
    assert checkpoint.image_size == 320 and checkpoint.preprocessing.input_size == 320
    assert checkpoint.backbone == COLOUR_LINEAR_BACKBONE == json.loads((colour / "config.json").read_text())["backbone"]
    assert json.loads((colour / "config.json").read_text())["image_size"] == 320
    model = xferlearn.load(colour, device="cpu")
    assert model.preprocessing.input_size == 320
    assert len(model.predict(sorted(image_folder.rglob("*.jpeg"))[:3])) == 3
    mine = xferlearn.train(data=str(image_folder), out=str(tmp_path / "mine"), image_size=256,
                           backbone="efficientnet_lite0", **quick).run_dir
    assert load_checkpoint(mine).image_size == 256
    other = {**TINY, "image_size": None}  # resnet18 without packaged weights: its own 224
    assert load_checkpoint(xferlearn.train(data=str(image_folder), out=str(tmp_path / "other"), **other).run_dir
                           ).preprocessing.input_size == 224
    finetune = TrainConfig(data="x", recipe="finetune")
    assert not finetune.resolve_image_size(grayscale=False, packaged=True) and finetune.image_size is None
    # The linear recipe's networks wait for the images too; the fine-tune's and the user's do not.
    gray_config, colour_config = TrainConfig(data="x"), TrainConfig(data="x")
    assert gray_config.backbone is None and not gray_config.resolve_backbone(grayscale=True)
    assert gray_config.backbone == DEFAULT_BACKBONE["linear"]
    assert colour_config.resolve_backbone(grayscale=False) and colour_config.backbone == COLOUR_LINEAR_BACKBONE
    assert not finetune.resolve_backbone(grayscale=False) and finetune.backbone == DEFAULT_BACKBONE["finetune"]
    assert not TrainConfig(data="x", backbone="resnet18").resolve_backbone(grayscale=False)


def test_both_feature_engines_train_the_same_run_and_a_wrong_one_is_refused(tmp_path, image_folder):
    # fp32 by name: PyTorch's "auto" features are bf16 on a CPU that has it (ONNX Runtime's are fp32).
    runs = {engine: xferlearn.train(data=str(image_folder), out=str(tmp_path / engine), feature_engine=engine,
                                    precision="fp32", cache_dir=str(tmp_path / "cache"), **TINY).run_dir
            for engine in ("torch", "onnx")}
    probs = {}
    for engine, run in runs.items():
        with open(run / "validation_predictions.csv", newline="") as handle:
            probs[engine] = np.array([[float(v) for k, v in row.items() if k.startswith("p_")]
                                      for row in csv.DictReader(handle)])
    np.testing.assert_allclose(probs["onnx"], probs["torch"], atol=1e-3)
    # Each engine keeps its own features: two stores under the one cache.
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2
    with pytest.raises(XferlearnError, match="--feature-engine must be one of"):
        TrainConfig(data=str(image_folder), feature_engine="gpu")


def test_training_views_may_take_the_faster_engine_but_validation_scores_as_prediction_does(
        tmp_path, image_folder, monkeypatch):
    """Where the CPU computes bf16 natively, a network of dense convolutions computes its training
    views on PyTorch (feature_engine); the validation images, whose scores choose the epoch and the
    threshold, stay on ONNX Runtime's fp32, which `predict` runs: the recorded validation
    probabilities are the ones prediction gives."""
    from xferlearn.models import onnx_forward

    monkeypatch.setattr(onnx_forward, "cpu_supports_bf16", lambda: True)
    run = xferlearn.train(data=str(image_folder), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                          **TINY).run_dir
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2  # the training views' store and validation's
    with open(run / "validation_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    predicted = xferlearn.predict(run, [row["file"] for row in rows], engine="onnx")
    recorded = np.array([float(row["p_PNEUMONIA"]) for row in rows])
    assert np.abs(np.array([row["probabilities"]["PNEUMONIA"] for row in predicted]) - recorded).max() < 2e-4


def test_training_builds_the_manifests_lists_a_bounded_number_of_times(tmp_path, monkeypatch):
    """Indexing `manifest.paths` per image rebuilt the whole list each time: quadratic, and hours
    at 100,000 images. The count must not grow with the folder."""
    from xferlearn.data.folders import Manifest

    data = make_folder(tmp_path / "d", per_class=30)
    calls = []
    for name in ("paths", "digests", "labels"):
        original = getattr(Manifest, name)
        monkeypatch.setattr(Manifest, name, property(lambda self, get=original.fget: calls.append(1) or get(self)))
    xferlearn.train(data=str(data), out=str(tmp_path / "r"), **TINY)
    assert 0 < len(calls) < 30


def test_multiclass_run(tmp_path):
    data = make_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=10, patients=False)
    result = xferlearn.train(data=str(data), out=str(tmp_path / "r"), **TINY)
    ckpt = load_checkpoint(result.run_dir)
    assert ckpt.threshold is None and ckpt.positive_index is None and "argmax" in ckpt.threshold_source
    rows = xferlearn.load(result.run_dir).predict([str(p) for p in sorted((data / "c").iterdir())[:2]])
    assert all(set(r["probabilities"]) == {"a", "b", "c"} for r in rows)


def test_foreign_checkpoints_are_refused(tmp_path, tiny_run):
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    torch.save({"format": "xferlearn-checkpoint", "fn": print}, tmp_path / "evil.pt")  # needs pickled code
    for name in ("text.pt", "plain.pt", "evil.pt", "missing.pt"):
        with pytest.raises(XferlearnError, match="not an xferlearn checkpoint|No checkpoint"):
            load_checkpoint(tmp_path / name)


def test_checkpoint_write_is_atomic_on_full_disk(tmp_path, tiny_run, monkeypatch):
    import errno

    import xferlearn._io as images

    target = tmp_path / "model.pt"
    shutil.copy(tiny_run / "model.pt", target)
    before = target.read_bytes()

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images.os, "write", full_disk)
    monkeypatch.setattr(images.os, "fdopen", lambda fd, mode: _FailingFile(fd))
    with pytest.raises(XferlearnError, match="Disk full"):
        save_checkpoint(load_checkpoint(tiny_run), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


class _FailingFile:
    def __init__(self, fd):
        import os
        os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("argv, message", [
    (["train", "{data}", "--backbone", "resnet5O"], "Unknown backbone|not a known|resnet50"),
    (["train", "{data}", "--recipe", "magic"], "--recipe must be one of"),
    (["train", "{data}", "--val-fraction", "0.9"], "--val-fraction"),
    (["train", "{data}", "--seed", "-1"], "--seed must be between 0 and"),
    (["train", "{data}", "--split-seed", "-1"], "--split-seed must be between 0 and"),
    (["train", "{empty}"], "no class folders"),
    (["train", "{data}", "--weights", "/no/such/file.pth", "--backbone", "resnet18"], "/no/such/file.pth"),
    (["predict", "{empty}", "x.jpeg"], "No checkpoint"),
    (["predict", "{empty}", "x.jpeg", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["evaluate", "{empty}", "{data}"], "No checkpoint"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, image_folder, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(data=image_folder, empty=tmp_path / "empty") for a in argv]
    assert main(argv + ["--out", str(tmp_path / "r")] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xferlearn: error:") and len(err.splitlines()) == 1
    import re
    assert re.search(message, err), err


def test_cli_and_package_import_lazily():
    """`xferlearn --help` must not wait for Lightning, timm, scikit-learn or torch; the public
    names stay functions even after their submodules are imported."""
    import subprocess
    import sys

    probe = ("import sys, xferlearn.cli; xferlearn.cli.build_parser(); "
             "print(sorted(m for m in ('lightning', 'timm', 'sklearn', 'torch') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    import xferlearn.deploy.export
    import xferlearn.evaluation.evaluate
    import xferlearn.evaluation.explain
    import xferlearn.training.pipeline

    for name in ("train", "evaluate", "load", "predict", "explain", "export", "serve"):
        assert callable(getattr(xferlearn, name)) and not isinstance(getattr(xferlearn, name), type(xferlearn)), name
    assert set(xferlearn.__all__) <= set(dir(xferlearn))
    with pytest.raises(AttributeError):
        xferlearn.no_such_thing


def test_split_seed_holds_the_validation_split_while_the_seed_varies(tmp_path):
    from xferlearn.data.layout import find_layout
    from xferlearn.data.images import DecodeCache
    from xferlearn.training.pipeline import split

    data = make_folder(tmp_path / "data", per_class=20)
    cache = DecodeCache(tmp_path / "cache", 48)

    def held_out(**options):
        config = TrainConfig(data=str(data), **TINY | options)
        manifest, _, val_idx, how, _ = split(config, find_layout(data), cache)
        return sorted(manifest.paths[i] for i in val_idx), how

    (seed0, _), (seed1, _) = held_out(seed=0), held_out(seed=1)
    assert seed0 != seed1  # the seed draws the split by default...
    (fixed, how), (same, _) = held_out(seed=1, split_seed=0), held_out(seed=2, split_seed=0)
    assert fixed == seed0 and same == seed0 and "seed 0" in how  # ...--split-seed alone, where given
