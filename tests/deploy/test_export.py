"""ONNX and TorchScript export: outputs equal PyTorch's, any batch size, a complete sidecar, and
`predict --engine onnx`."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import link_real_slice

import xferlearn
from xferlearn.models.checkpoint import load_checkpoint, save_checkpoint
from xferlearn.cli import main
from xferlearn.errors import XferlearnError
from xferlearn.deploy.export import export
from xferlearn.deploy.onnx_runtime import OnnxPredictor
from xferlearn.deploy.predict import load_onnx

# Largest |p_onnx - p_torch| accepted here. Both compute in fp32; measured on this project's
# tiny runs and EfficientNet-Lite0: at most 3e-6.
TOLERANCE = 1e-4


def assert_same_calls(rows, expected, positive_class: str | None) -> int:
    """Same files, errors and classes, except for an image whose positive probability sits within
    TOLERANCE of the threshold: the threshold is one of the validation scores (1.0 where the
    validation split separates perfectly), so images may sit exactly on it, and a last-bit
    difference between engines may call them either way. Returns how many classes were compared."""
    assert [r["file"] for r in rows] == [r["file"] for r in expected]
    compared = 0
    for row, reference in zip(rows, expected, strict=True):
        threshold, probs = reference["threshold"], reference["probabilities"]
        assert row["threshold"] == threshold and (row["error"] is None) == (reference["error"] is None)
        if probs is not None and (positive_class is None or abs(probs[positive_class] - threshold) > TOLERANCE):
            assert row["class"] == reference["class"], (row, reference)
            compared += 1
    return compared


def uint8_batch(predictor, items) -> torch.Tensor:
    return torch.from_numpy(np.stack([predictor.decode(i) for i in items])).permute(0, 3, 1, 2)


def noise_batch(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def onnx_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return export(tiny_run, "onnx", out)


def test_onnx_matches_pytorch_at_batch_sizes_1_and_5(tiny_run, tiny_data, onnx_export):
    torch_model = xferlearn.load(tiny_run, device="cpu")
    onnx_model = OnnxPredictor(onnx_export["model"].parent)
    size = torch_model.preprocessing.input_size
    images = sorted((tiny_data / "NORMAL").iterdir())[:2] + sorted((tiny_data / "PNEUMONIA").iterdir())[:3]
    for batch in (uint8_batch(torch_model, images[:1]), uint8_batch(torch_model, images), noise_batch(5, size, 1)):
        expected, got = torch_model.probabilities(batch), onnx_model.probabilities(batch)
        assert got.shape == expected.shape == (len(batch), 2)
        assert np.abs(got - expected).max() < TOLERANCE
    assert onnx_model.probabilities(noise_batch(1, size, 2).numpy()).shape == (1, 2)  # arrays too
    with pytest.raises(ValueError, match="uint8"):
        onnx_model.probabilities(noise_batch(1, size, 2).float())


def test_onnx_predictor_behaves_like_predictor(tiny_run, tiny_data, onnx_export):
    torch_model, onnx_model = xferlearn.load(tiny_run, device="cpu"), OnnxPredictor(onnx_export["model"])
    assert (onnx_model.classes, onnx_model.threshold, onnx_model.positive_index) == \
        (torch_model.classes, torch_model.threshold, torch_model.positive_index)
    files = sorted(tiny_data.rglob("*.jpeg"))[::4] + [tiny_data / "missing.jpeg"]
    by_onnx, by_torch = onnx_model.predict(files, batch_size=3), torch_model.predict(files, batch_size=3)
    assert assert_same_calls(by_onnx, by_torch, torch_model.checkpoint.positive_class) > 0
    for a, b in zip(by_onnx, by_torch, strict=True):
        if a["probabilities"]:
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=TOLERANCE)
    assert onnx_model.predict(files[-1])["error"].startswith("cannot read file")


def test_sidecar_says_how_to_feed_the_model(tiny_run, onnx_export):
    card = json.loads(onnx_export["sidecar"].read_text())
    checkpoint = load_checkpoint(tiny_run)
    size = checkpoint.preprocessing.input_size
    assert card["files"] == {"onnx": "model.onnx"}
    assert card["input"]["dtype"] == "uint8" and card["input"]["layout"] == "NCHW"
    assert card["input"]["shape"] == ["batch", 3, size, size] and card["input"]["range"] == "0..255"
    assert card["normalisation_in_graph"] is True and card["temperature_softmax_in_graph"] is True
    assert card["output"]["shape"] == ["batch", 2]
    for key in ("classes", "positive_class", "positive_index", "threshold", "threshold_source", "temperature",
                "backbone", "arch", "weights"):
        assert card[key] == getattr(checkpoint, key), key
    assert {k: v for k, v in card["preprocessing"].items() if k != "note"} == checkpoint.preprocessing.to_dict()
    assert card["xferlearn_version"] == xferlearn.__version__
    assert card["verification"]["onnx"]["max_abs_probability_difference_vs_pytorch"] < TOLERANCE
    assert "opset" in card["exporters"]["onnx"]


def test_onnx_graph_is_valid_with_a_dynamic_batch(onnx_export):
    import onnx

    model = onnx.load(str(onnx_export["model"]))
    onnx.checker.check_model(model)
    (graph_input,) = model.graph.input
    assert graph_input.name == "pixels" and graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed number


def test_torchscript_round_trip_beside_an_onnx_export(tiny_run, onnx_export, tmp_path):
    for name in ("model.onnx", "model.json"):  # an ONNX export of the same checkpoint is already there
        shutil.copy(onnx_export["model"].parent / name, tmp_path / name)
    written = export(tiny_run, "torchscript", tmp_path)
    assert written["model"].name == "model.torchscript.pt"
    loaded = torch.jit.load(str(written["model"]))
    torch_model = xferlearn.load(tiny_run, device="cpu")
    for n in (1, 5):
        batch = noise_batch(n, torch_model.preprocessing.input_size, n)
        with torch.no_grad():
            got = loaded(batch).numpy()
        assert np.abs(got - torch_model.probabilities(batch)).max() < TOLERANCE
    card = json.loads(written["sidecar"].read_text())
    assert card["files"] == {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}  # one sidecar, both
    assert set(card["verification"]) == set(card["exporters"]) == {"onnx", "torchscript"}

    card["checkpoint_sha256"] = "0" * 64  # as if the ONNX file came from another checkpoint
    (tmp_path / "model.json").write_text(json.dumps(card))
    export(tiny_run, "torchscript", tmp_path)
    assert not (tmp_path / "model.onnx").exists()  # a stale model is removed, not left to mislead
    assert json.loads((tmp_path / "model.json").read_text())["files"] == {"torchscript": "model.torchscript.pt"}


def test_export_errors_are_clean(tmp_path, tiny_run, capsys):
    with pytest.raises(XferlearnError, match="No checkpoint"):
        export(tmp_path / "no-run", "onnx")
    with pytest.raises(XferlearnError, match="format"):
        export(tiny_run, "tflite", tmp_path / "out")
    assert main(["export", str(tmp_path / "no-run")]) == 2
    assert main(["predict", str(tmp_path / "no-run"), str(tmp_path), "--engine", "onnx"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("xferlearn: error: No checkpoint") for e in errors)
    with pytest.raises(XferlearnError, match="No ONNX export"):
        OnnxPredictor(tmp_path)
    assert not list(tmp_path.glob("**/model.onnx"))


def test_predict_engine_onnx_exports_on_first_use_and_after_retraining(tiny_run, tiny_data, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")  # the shared run stays untouched
    arguments = ["predict", str(run), str(tiny_data), "--format", "json"]
    assert main(arguments) == 0
    by_torch = json.loads(capsys.readouterr().out)
    assert main(arguments + ["--engine", "onnx"]) == 0
    by_onnx = json.loads(capsys.readouterr().out)
    assert assert_same_calls(by_onnx, by_torch, load_checkpoint(run).positive_class) > 0
    assert (run / "export" / "model.onnx").is_file() and (run / "export" / "model.json").is_file()
    first = (run / "export" / "model.onnx").stat().st_mtime_ns

    assert load_onnx(run).threshold == by_torch[0]["threshold"]  # reused as it is
    assert (run / "export" / "model.onnx").stat().st_mtime_ns == first
    checkpoint = load_checkpoint(run)  # a new checkpoint in the run: the export follows it
    checkpoint.operating_point = dataclasses.replace(checkpoint.operating_point, value=0.25)
    save_checkpoint(checkpoint, run / "model.pt")
    assert load_onnx(run).threshold == 0.25
    assert json.loads((run / "export" / "model.json").read_text())["threshold"] == 0.25
    assert load_onnx(run / "export").threshold == 0.25  # an export folder works on its own
    assert main(arguments + ["--engine", "onnx", "--precision", "bf16"]) == 2
    assert "--precision" in capsys.readouterr().err


@pytest.mark.data
def test_onnx_matches_pytorch_on_real_xrays(shared_data, tmp_path):
    """EfficientNet-Lite0 with its packaged ImageNet weights and a head trained on a few real X-rays."""
    data = link_real_slice(shared_data, tmp_path / "data", 14)
    result = xferlearn.train(data=str(data), out=str(tmp_path / "run"), backbone="efficientnet_lite0",
                             epochs=3, views=0, cache_dir=str(tmp_path / "cache"))
    torch_model = xferlearn.load(result.run_dir, device="cpu")
    onnx_model = load_onnx(result.run_dir)
    originals = sorted((shared_data / "samples_original").rglob("*.jpeg"))[:4]  # full size, grayscale
    files = sorted(data.rglob("*.jpeg"))[::7] + originals
    for n in (1, 5):
        batch = uint8_batch(torch_model, files[:n] if n == 1 else files[-n:])
        assert np.abs(onnx_model.probabilities(batch) - torch_model.probabilities(batch)).max() < TOLERANCE
    assert assert_same_calls(onnx_model.predict(files), torch_model.predict(files), "PNEUMONIA") > 0
