"""int8 ONNX export: kept only where validation AUC holds, its own validation threshold, refused
cleanly otherwise; `predict --engine onnx-int8`; ONNX engines follow the export's TTA."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import link_real_slice

import xferlearn
from xferlearn.models.checkpoint import load_checkpoint, save_checkpoint
from xferlearn.cli import main
from xferlearn.errors import XferlearnError
from xferlearn.deploy import quantize
from xferlearn.deploy.export import export
from xferlearn.deploy.onnx_runtime import OnnxPredictor
from xferlearn.deploy.predict import load_engine, load_onnx


@pytest.fixture(scope="module")
def int8_run(tiny_run, tmp_path_factory):
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("int8") / "run")
    export(run, "onnx-int8")
    return run


def test_int8_export_records_its_validation_check_and_threshold(int8_run):
    card = json.loads((int8_run / "export" / "model.json").read_text())
    assert card["files"] == {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
    int8, split = card["int8"], json.loads((int8_run / "split.json").read_text())
    check = int8["validation"]
    assert check["images"] == len(split["val"])
    assert abs(check["auc_difference"]) <= check["auc_tolerance"] == 0.002
    assert check["auc_difference"] == pytest.approx(check["int8"]["auc"] - check["fp32"]["auc"])
    assert check["fp32"]["threshold"] == card["threshold"] == load_checkpoint(int8_run).threshold
    assert 0 <= int8["threshold"] <= 1 and "through the int8 model" in int8["threshold_source"]
    assert "training split" in int8["calibration"] and 0.5 <= check["same_decision"] <= 1
    # The tiny split holds too few images a class for a rank correlation: recorded as not measured.
    assert check["rank_agreement"] == {} and "not measured" in check["rank_note"] and check["rank_floor"] == quantize.RANK_FLOOR == 0.95


def test_int8_model_is_quantised_and_close_to_fp32(int8_run, tiny_data):
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8_run / "export" / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp32, int8 = load_onnx(int8_run), load_onnx(int8_run, int8=True)
    assert int8.threshold == json.loads((int8_run / "export" / "model.json").read_text())["int8"]["threshold"]
    files = sorted(tiny_data.rglob("*.jpeg"))
    batch = torch.from_numpy(np.stack([fp32.decode(f) for f in files])).permute(0, 3, 1, 2)
    p32, p8 = fp32.probabilities(batch), int8.probabilities(batch)
    assert np.allclose(p8.sum(axis=1), 1, atol=1e-5)
    assert np.corrcoef(p32[:, 1], p8[:, 1])[0, 1] > 0.9


def test_predict_engine_onnx_int8_quantises_on_first_use(tiny_run, tiny_data, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    assert main(["predict", str(run), str(tiny_data), "--engine", "onnx-int8", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    card = json.loads((run / "export" / "model.json").read_text())
    assert len(rows) == len(list(tiny_data.rglob("*.jpeg")))
    assert {row["threshold"] for row in rows} == {card["int8"]["threshold"]}
    assert all(row["error"] is None and row["class"] in ("NORMAL", "PNEUMONIA") for row in rows)


def test_default_engine_is_int8_once_its_export_exists(int8_run, tiny_data, tmp_path, capsys):
    from xferlearn.deploy.predict import load_engine

    assert main(["predict", str(int8_run), str(tiny_data), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    card = json.loads((int8_run / "export" / "model.json").read_text())
    assert {row["threshold"] for row in rows} == {card["int8"]["threshold"]}
    assert load_engine(int8_run).engine == "onnx-int8"
    # Asking for something only PyTorch does keeps PyTorch, and its threshold.
    assert load_engine(int8_run, precision="fp32").engine == "torch"
    assert load_engine(int8_run, prevalence=0.3).engine == "torch"
    # A checkpoint changed since the quantisation: the int8 model is stale, so not used.
    stale = shutil.copytree(int8_run, tmp_path / "stale")
    checkpoint = load_checkpoint(stale)
    checkpoint.temperature = 2.0
    save_checkpoint(checkpoint, stale / "model.pt")
    assert load_engine(stale, n_images=10).engine == "torch"
    # evaluate measures the fp32 model, and says that predict decides with int8 at another threshold
    capsys.readouterr()
    assert main(["evaluate", str(int8_run), str(tiny_data), "--out", str(tmp_path / "e"), "--bootstrap", "10",
                 "--no-gallery"]) == 0
    note = capsys.readouterr().err
    assert "these are the fp32 model's figures" in note and f"threshold {card['int8']['threshold']:.4f}" in note
    assert "PyTorch fp32, at the checkpoint's threshold" in (tmp_path / "e" / "report.md").read_text()


def test_stress_on_the_int8_engine_names_its_threshold(int8_run, tiny_data, tmp_path):
    record = xferlearn.stress(int8_run, tiny_data, tmp_path / "stress", engine="onnx-int8", shifts=["blur"],
                              severities=[1], progress=False)
    int8 = json.loads((int8_run / "export" / "model.json").read_text())["int8"]
    assert record["threshold"] == pytest.approx(int8["threshold"])
    assert record["threshold_source"] == int8["threshold_source"]


def test_a_site_calibrated_run_is_not_quantised(tiny_run, tiny_data, tmp_path):
    """Its threshold was chosen on the site sample; an int8 model would need its own, chosen there."""
    xferlearn.calibrate(tiny_run, tiny_data, tmp_path / "cal", n_boot=20, always_move=True, min_per_class=2)
    with pytest.raises(XferlearnError, match="site-calibrated run is not built"):
        export(tmp_path / "cal", "onnx-int8")
    from xferlearn.deploy.predict import why_not_int8

    assert "not built for a site-calibrated run" in why_not_int8(tmp_path / "cal")  # predict's engine line


def test_predict_on_pytorch_scores_in_fp32_on_a_cpu_as_the_threshold_was_chosen(tiny_run, monkeypatch):
    from xferlearn.models import inference

    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)  # a CPU where auto meant bf16
    assert load_engine(tiny_run, "torch").precision == "fp32"
    assert load_engine(tiny_run, "torch", precision="bf16").precision == "bf16"  # asked for


def test_rank_agreement_sees_reordering_within_a_class():
    """The second check: within each class, does int8 order the images as fp32 does? Scores far
    apart between classes (AUC 1 either way) cannot show a shuffle inside one; this can."""
    from xferlearn.deploy.quantize import rank_agreement

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    pos = np.where(y == 1, rng.uniform(0.9, 1.0, 80), rng.uniform(0.0, 0.1, 80))
    p32 = np.stack([1 - pos, pos], axis=1)
    assert rank_agreement(y, p32, p32.copy(), ["a", "b"]) == {"a": 1.0, "b": 1.0}
    shuffled = pos.copy()
    for k in (0, 1):  # the same scores, reordered inside each class: AUC stays 1
        rows = np.flatnonzero(y == k)
        shuffled[rows] = rng.permutation(pos[rows])
    agreement = rank_agreement(y, p32, np.stack([1 - shuffled, shuffled], axis=1), ["a", "b"])
    assert max(agreement.values()) < 0.5
    assert rank_agreement(y, p32, p32, ["a", "b"], min_images=41) == {}  # too few a class to say anything
    flat = np.full((80, 2), 0.5)  # a model that lost every order agrees with none; two that have none, agree
    assert rank_agreement(y, p32, flat, ["a", "b"]) == {"a": 0.0, "b": 0.0}
    assert rank_agreement(y, flat, flat.copy(), ["a", "b"]) == {"a": 1.0, "b": 1.0}
    # Three classes: each class's images, scored by the other classes' probability.
    y3 = np.repeat([0, 1, 2], 30)
    p3 = rng.dirichlet(np.ones(3), 90)
    noisy = p3 * rng.uniform(0.5, 1.5, p3.shape)
    agreement = rank_agreement(y3, p3, noisy / noisy.sum(axis=1, keepdims=True), ["a", "b", "c"])
    assert set(agreement) == {"a", "b", "c"} and all(0 < value < 1 for value in agreement.values())


def test_int8_refused_when_it_reorders_a_class(tiny_run, tiny_data, tmp_path, monkeypatch, capsys):
    """An int8 model whose validation AUC holds but whose order within a class does not (here
    forced by a floor no model can reach) is not kept: nothing written, one line."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    monkeypatch.setattr(quantize, "RANK_MIN_IMAGES", 2)  # the tiny split has a handful a class
    monkeypatch.setattr(quantize, "RANK_FLOOR", 1.01)
    assert main(["export", str(run), "--format", "onnx-int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reorders the validation images within a class" in err[0] and "not kept" in err[0]
    assert not (run / "export" / "model.int8.onnx").exists()
    card = json.loads((run / "export" / "model.json").read_text())
    assert "int8" not in card and not list((run / "export").glob(".int8-*"))
    # Why int8 is not the default is kept with the export, and `predict` says it in one line.
    assert card["int8_refused"]["checkpoint_sha256"] == card["checkpoint_sha256"]
    assert main(["predict", str(run), str(tiny_data / "NORMAL")]) == 0
    err = capsys.readouterr().err.strip().splitlines()  # the engine, then the threshold and its source
    assert len(err) == 2 and err[0].startswith("xferlearn: engine onnx (auto; int8 refused by its check for this "
                                               "model: it reorders the validation images within a class")
    assert "at training time" in err[1]
    # Once the check passes, the refusal is gone with it.
    monkeypatch.setattr(quantize, "RANK_FLOOR", 0.0)
    assert main(["export", str(run), "--format", "onnx-int8"]) == 0
    assert "int8_refused" not in json.loads((run / "export" / "model.json").read_text())
    capsys.readouterr()
    assert main(["predict", str(run), str(tiny_data / "NORMAL")]) == 0
    engine, threshold = capsys.readouterr().err.strip().splitlines()
    int8 = json.loads((run / "export" / "model.json").read_text())["int8"]
    assert engine == "xferlearn: engine onnx-int8 (auto)" and f"{int8['threshold']:.4g} (" in threshold
    assert f"({int8['threshold_source']})" in threshold  # int8's own threshold, chosen at export


def test_an_int8_model_checked_on_auc_alone_is_not_used_by_default(int8_run, tmp_path):
    """int8 models made before the rank check passed a check a saturated split cannot fail:
    `auto` leaves them, and asking for int8 makes the model again under the current check."""
    from xferlearn.deploy.predict import int8_ready, load_engine

    old = shutil.copytree(int8_run, tmp_path / "old")
    card_path = old / "export" / "model.json"
    card = json.loads(card_path.read_text())
    assert int8_ready(old) and "rank_agreement" in card["int8"]["validation"]
    del card["int8"]["validation"]["rank_agreement"]
    card_path.write_text(json.dumps(card))
    assert not int8_ready(old) and not int8_ready(old / "export")
    assert load_engine(old, n_images=10).engine == "onnx"
    assert load_engine(old, engine="onnx-int8").engine == "onnx-int8"
    assert "rank_agreement" in json.loads(card_path.read_text())["int8"]["validation"]


def test_default_engine_without_int8_follows_the_hardware_and_the_count(int8_run, tmp_path, monkeypatch):
    import xferlearn.deploy.predict as engines

    def plain(name):
        return shutil.copytree(int8_run, tmp_path / name, ignore=shutil.ignore_patterns("export"))

    monkeypatch.setattr(engines, "gpu_present", lambda: False)
    run = plain("cpu")
    # A few images: the 20 s export would not pay, so PyTorch, and nothing written.
    assert engines.load_engine(run, n_images=10).engine == "torch"
    assert engines.why_not_int8(run).startswith("int8 not made for this model (`xferlearn export RUN --format onnx-int8`")
    assert not (run / "export").exists()
    # Many, or a service (no count): the fp32 export, made once; never int8 unasked.
    many = engines.load_engine(run, n_images=engines.ONNX_EXPORT_PAYS)
    assert many.engine == "onnx" and many.batch_size == 32  # bulk: one fixed batch shape
    card = json.loads((run / "export" / "model.json").read_text())
    assert card["files"] == {"onnx": "model.onnx"} and "int8" not in card
    service = engines.load_engine(run)
    assert service.engine == "onnx" and service.batch_size is None  # a service's batches vary
    assert engines.load_engine(run, n_images=10).engine == "onnx"  # an export there is used at any count
    assert many.threshold == load_checkpoint(run).threshold
    # An export that cannot be written (a read-only run, a full disk) keeps PyTorch, with a warning.
    def refuse(*args, **kwargs):
        raise XferlearnError("no space left on device")

    monkeypatch.setattr("xferlearn.deploy.export.ensure_onnx", refuse)
    assert engines.load_engine(plain("full")).engine == "torch"
    # A GPU: PyTorch's own fast path.
    monkeypatch.setattr(engines, "gpu_present", lambda: True)
    assert engines.load_engine(plain("gpu")).engine == "torch"


def test_onnx_at_a_fixed_batch_size_gives_the_free_axis_answers(int8_run, tiny_data):
    paths = sorted(tiny_data.rglob("*.jpeg"))[:7]  # not a multiple of the batch: the last one is padded
    free = load_onnx(int8_run).predict(paths)
    fixed = load_onnx(int8_run, batch_size=4).predict(paths)
    for a, b in zip(free, fixed):
        assert a["class"] == b["class"]
        for name in a["probabilities"]:
            assert a["probabilities"][name] == pytest.approx(b["probabilities"][name], abs=1e-5)


def test_predict_on_a_current_onnx_export_never_imports_torch(int8_run, tiny_data, tmp_path):
    """torch's import is about 2 s of a 5000-image int8 prediction's 10-20 s: the ONNX path must not pay it."""
    import subprocess
    import sys

    script = ("import sys; from xferlearn.cli import main; "
              f"code = main(['predict', {str(int8_run)!r}, {str(tiny_data)!r}, '--output', {str(tmp_path / 'p.csv')!r}]); "
              "print('torch' in sys.modules, 'onnxruntime' in sys.modules, code)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True", "0"], done.stderr[-2000:]
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 1 + len(list(tiny_data.rglob("*.jpeg")))


def test_int8_needs_the_runs_split(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "split.json").unlink()
    assert main(["export", str(run), "--format", "onnx-int8"]) == 2
    assert "split.json" in capsys.readouterr().err


def test_retraining_drops_a_stale_int8_model(int8_run, tmp_path):
    run = shutil.copytree(int8_run, tmp_path / "run")
    checkpoint = load_checkpoint(run)
    checkpoint.temperature = 2.0
    save_checkpoint(checkpoint, run / "model.pt")
    export(run, "onnx")
    assert not (run / "export" / "model.int8.onnx").exists()
    assert "int8" not in json.loads((run / "export" / "model.json").read_text())


def test_onnx_applies_tta_when_the_threshold_was_chosen_with_it(tiny_run, tiny_data, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    checkpoint = load_checkpoint(run)
    checkpoint.tta = True
    save_checkpoint(checkpoint, run / "model.pt")
    onnx_model, torch_model = load_onnx(run), xferlearn.load(run, device="cpu")
    card = json.loads((run / "export" / "model.json").read_text())
    assert onnx_model.tta and card["tta"]["on"] and len(card["tta"]["views"]) == 5
    files = sorted(tiny_data.rglob("*.jpeg"))[:6]
    batch = torch.from_numpy(np.stack([onnx_model.decode(f) for f in files])).permute(0, 3, 1, 2)
    with_tta = onnx_model.probabilities(batch)
    assert np.abs(with_tta - torch_model.probabilities(batch)).max() < 1e-4
    onnx_model.tta = False
    plain = onnx_model.probabilities(batch)  # the tiny model is saturated: compare the small side in logs
    assert np.abs(np.log(with_tta.min(axis=1) + 1e-30) - np.log(plain.min(axis=1) + 1e-30)).max() > 0.1


@pytest.mark.data
def test_int8_refused_when_calibration_ranges_are_wrong(shared_data, tmp_path):
    """Activation ranges measured on black images clip real X-rays: the validation check must
    catch it and keep nothing. (On the tiny synthetic runs even that keeps the ranking.)"""
    data = link_real_slice(shared_data, tmp_path / "data", 60)
    # The X-rays as decoded (no contrast step): ranges from black images then clip them for certain.
    run = xferlearn.train(data=str(data), out=str(tmp_path / "run"), backbone="efficientnet_lite0", contrast="none",
                          epochs=3, views=0, cv=0, cache_dir=str(tmp_path / "cache")).run_dir  # a split to check on
    black = tmp_path / "black"
    black.mkdir()
    for i in range(8):
        Image.new("RGB", (224, 224)).save(black / f"{i}.png")
    with pytest.raises(XferlearnError, match="not kept: it moved validation AUC by "):
        export(run, "onnx-int8", calibration=black)
    assert not (run / "export" / "model.int8.onnx").exists()
    card = json.loads((run / "export" / "model.json").read_text())
    assert "int8" not in card and "moved validation AUC by" in card["int8_refused"]["reason"]
    assert not list((run / "export").glob(".int8-*"))  # no staging left behind
    with pytest.raises(XferlearnError, match="needs model.int8.onnx"):
        OnnxPredictor(run / "export", int8=True)


def test_int8_refuses_a_split_that_is_not_the_models(tiny_run, tmp_path, capsys):
    """Another split of the same images (here train and validation swapped) would check the int8
    model on images it was trained on: refused, by the split's hash recorded at training time."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    split = json.loads((run / "split.json").read_text())
    split["train"], split["val"] = split["val"], split["train"]
    (run / "split.json").write_text(json.dumps(split))
    assert load_checkpoint(run).split_sha256  # recorded at training time
    assert main(["export", str(run), "--format", "onnx-int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not the split this model was trained with" in err
    assert not (run / "export" / "model.int8.onnx").exists()
