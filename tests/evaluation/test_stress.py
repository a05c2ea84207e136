"""The stress test: shifts, metrics at the stored threshold, files, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import xferlearn
from xferlearn.cli import main
from xferlearn.config import STRESS_SHIFTS
from xferlearn.errors import XferlearnError
from xferlearn.evaluation.corruptions import corrupt, corrupt_batch, seed_for
from xferlearn.evaluation.metrics import compute_metrics
from xferlearn.evaluation.stress import stress
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.models.predictor import Predictor


def _image(seed: int = 0, size: int = 64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(40, 200, (size, size), dtype=np.uint8)).expand(3, size, size).clone()


@pytest.mark.parametrize("shift", STRESS_SHIFTS)
def test_every_shift_changes_the_image_deterministically_and_keeps_its_shape(shift):
    image = _image()
    first = corrupt(image, shift, 3, seed_for("d", shift, 3))
    assert first.shape == image.shape and first.dtype == torch.uint8
    assert torch.equal(first, corrupt(image, shift, 3, seed_for("d", shift, 3)))
    assert not torch.equal(first, image)
    stronger = corrupt(image, shift, 5, seed_for("d", shift, 5))
    assert (stronger.float() - image.float()).abs().mean() > (first.float() - image.float()).abs().mean() * 0.8
    assert torch.equal(corrupt(image, shift, 0, 1), image)


def test_noise_is_seeded_per_image_and_leaves_the_global_generator_alone():
    images = torch.stack([_image(0), _image(0)])
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    out = corrupt_batch(images, ["a", "b"], "noise", 4)
    assert torch.equal(torch.rand(1), expected)
    assert not torch.equal(out[0], out[1])  # same pixels, different images: different noise
    assert torch.equal(out, corrupt_batch(images, ["a", "b"], "noise", 4))


class SharpnessModel(Predictor):
    """Calls an image positive when it is sharp: the kind of cue a strong blur takes away."""

    def probabilities(self, batch):
        x = batch.float().mean(dim=1)
        detail = (x[:, 1:, :] - x[:, :-1, :]).abs().mean(dim=(1, 2))
        p = torch.sigmoid((detail - 4.0) * 2).numpy()
        return np.stack([1 - p, p], axis=1)


def test_stress_binary_writes_files_and_severity_zero_is_the_clean_evaluation(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "stress"
    record = stress(tiny_run, tiny_data, out, shifts=["blur", "jpeg"], severities=[1, 5], progress=False)
    for name in ("stress.json", "stress.md", "stress.png", "examples.png"):
        assert (out / name).stat().st_size > 0
    assert [(r["shift"], r["severity"]) for r in record["results"]] == [
        ("blur", 1), ("blur", 5), ("jpeg", 1), ("jpeg", 5)]
    # The clean figures are evaluate's: same images, the stored threshold, nothing re-tuned.
    predictor = xferlearn.load(tiny_run)
    metrics = xferlearn.evaluate(tiny_run, tiny_data, tmp_path / "eval", n_boot=10, gallery=False)
    assert record["threshold"] == pytest.approx(predictor.threshold)
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        assert record["clean"][key] == pytest.approx(metrics[key], abs=1e-9)
    summary = record["summary"]
    errors = [1 - r["accuracy"] for r in record["results"]]
    assert summary["mean_error"] == pytest.approx(np.mean(errors))
    assert summary["added_error"] == pytest.approx(np.mean(errors) - (1 - metrics["accuracy"]))
    assert {w["shift"] for w in summary["worst_shifts"]} == {"blur", "jpeg"}
    text = (out / "stress.md").read_text()
    assert "Mean error" in text and "| blur | 5 |" in text and "never re-tuned" in text


def test_stress_decides_for_the_runs_positive_class(normal_positive_run, tiny_data, tmp_path):
    """With --positive-class NORMAL (the first class), stress's clean figures are evaluate's."""
    record = stress(normal_positive_run, tiny_data, tmp_path / "stress", shifts=["blur"], severities=[1],
                    progress=False)
    metrics = xferlearn.evaluate(normal_positive_run, tiny_data, tmp_path / "eval", n_boot=10, gallery=False)
    assert record["positive_class"] == metrics["positive_class"] == "NORMAL"
    for key in ("accuracy", "sensitivity", "specificity"):
        assert record["clean"][key] == pytest.approx(metrics[key], abs=1e-9)


def test_a_loaded_model_stresses_itself_with_its_own_options(tiny_run, tiny_data, tmp_path):
    """Model.stress uses the model as loaded (here with TTA, which the checkpoint did not choose),
    not a fresh engine from the run folder."""
    with pytest.warns(UserWarning, match="moves the operating point"):
        model = xferlearn.load(tiny_run, tta=True)
    record = model.stress(tiny_data, tmp_path / "s", shifts=["blur"], severities=[1], progress=False)
    assert record["tta"] is True and record["engine"] == "Model"
    assert xferlearn.stress(tiny_run, tiny_data, tmp_path / "t", shifts=["blur"], severities=[1],
                            progress=False)["tta"] is False


def test_strong_blur_moves_a_model_that_uses_sharpness(tiny_run, tiny_data, tmp_path):
    model = SharpnessModel(load_checkpoint(tiny_run))
    record = stress(tiny_run, tiny_data, tmp_path / "s", shifts=["blur", "gamma"], severities=[1, 5],
                    predictor=model, progress=False)
    rows = {(r["shift"], r["severity"]): r for r in record["results"]}
    assert record["clean"]["positive_rate"] > 0.9  # the synthetic images are noisy, so "sharp"
    assert rows[("blur", 5)]["positive_rate"] < 0.1
    assert rows[("blur", 5)]["delta_sensitivity"] < -0.8
    assert rows[("blur", 5)]["positive_rate"] < rows[("blur", 1)]["positive_rate"]
    assert record["summary"]["worst_shifts"][0]["shift"] == "blur"


def test_multiclass_run_reports_accuracy_and_macro_auc(tmp_path, capsys):
    from conftest import make_folder

    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=8, patients=False)
    run = xferlearn.train(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                          backbone="resnet18", weights="none", image_size=64, epochs=2, views=0).run_dir
    # Small, so cross-fitted: the summary names the decision rule in words and, with no images
    # held apart, points the stress test at other labelled images, as `--split val` refuses.
    summary = " ".join(capsys.readouterr().err.split())
    assert "at the most probable class (no threshold" in summary and "threshold None" not in summary
    assert f"xferlearn stress {run} DATA" in summary and "--split val" not in summary
    with pytest.raises(XferlearnError, match="cross-fitted: its final model trained on every image"):
        xferlearn.stress(run, split="val", progress=False)
    record = xferlearn.stress(run, data, shifts=["noise"], severities=[2], progress=False)
    assert record["threshold"] is None and record["positive_class"] is None
    row = record["results"][0]
    assert 0 <= row["accuracy"] <= 1 and row["auc"] is not None and "positive_rate" not in row
    assert "mean_sensitivity" not in record["summary"]
    assert (run / "stress" / "stress.md").read_text().count("| noise | 2 |") == 1


def test_split_val_limit_and_the_report_section(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    assert main(["stress", str(run), "--split", "val", "--shifts", "contrast,text", "--severities", "3",
                 "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Mean error under shift" in printed
    record = xferlearn.stress(run, split="val", shifts=["text"], severities=[3], limit=2, progress=False)
    assert record["n"] <= 4 and "validation split" in record["data"]
    metrics_dir = tmp_path / "eval"
    xferlearn.evaluate(run, tiny_run.parent / "data", metrics_dir, n_boot=10, gallery=False)
    report = (metrics_dir / "report.md").read_text()
    assert "## Stress test" in report and "in-distribution" in report


@pytest.mark.parametrize("argv, message", [
    (["stress", "{tmp}/nothing", "{data}"], "No checkpoint"),
    (["stress", "{run}", "{tmp}/empty"], "class"),
    (["stress", "{run}", "{tmp}/other"], "but the model knows"),
    (["stress", "{run}", "{data}", "--split", "val"], "not both"),
    (["stress", "{run}"], "either DATA"),
    (["stress", "{run}", "{data}", "--shifts", "blur,fog"], "fog"),
    (["stress", "{run}", "{data}", "--severities", "0,7"], "subset of 1,2,3,4,5"),
    (["stress", "{run}", "{data}", "--limit", "0"], "--limit"),
])
def test_bad_input_is_one_line(argv, message, tiny_run, tiny_data, tmp_path, capsys):
    from conftest import make_folder

    (tmp_path / "empty").mkdir()
    make_folder(tmp_path / "other", classes=("CAT", "DOG"), per_class=2)
    argv = [a.format(tmp=tmp_path, run=tiny_run, data=tiny_data) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_library_errors_are_xferlearn_errors(tiny_run, tiny_data):
    with pytest.raises(XferlearnError, match="--shifts"):
        stress(tiny_run, tiny_data, shifts=[], progress=False)
