"""Site calibration: a new operating point from a small labelled sample, as a new run."""

import json

import numpy as np
import pytest
import torch
from conftest import make_folder, synthetic_image

import xferlearn
from xferlearn.cli import main
from xferlearn.data.images import decode_file
from xferlearn.errors import XferlearnError
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.models.predictor import Predictor, prior_shift
from xferlearn.rundir import RunDir


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A 'site' sample: 24 NORMAL and 40 PNEUMONIA synthetic images."""
    root = tmp_path_factory.mktemp("site") / "sample"
    make_folder(root, per_class=40)
    for path in sorted((root / "NORMAL").iterdir())[24:]:
        path.unlink()
    return root


def test_calibrate_writes_a_new_run_that_every_command_uses(tiny_run, site, tmp_path):
    before = load_checkpoint(tiny_run)
    record = xferlearn.calibrate(tiny_run, site, tmp_path / "cal", n_boot=200, always_move=True)
    after = load_checkpoint(tmp_path / "cal")
    point = after.operating_point
    assert point.when == "calibrate" and point.n == 64 and str(site) in point.data
    low, high = point.interval
    assert low <= point.value <= high
    assert record["counts"] == {"NORMAL": 24, "PNEUMONIA": 40} and record["source_run"] == str(tiny_run.resolve())
    assert json.loads(RunDir(tmp_path / "cal").calibration.read_text())["after"]["threshold"] == point.value
    assert load_checkpoint(tiny_run).operating_point == before.operating_point  # the source run is untouched
    assert all(torch.equal(after.state_dict[k], v) for k, v in before.state_dict.items())  # no retraining
    rows = xferlearn.predict(tmp_path / "cal", [next((site / "NORMAL").iterdir())])
    assert rows[0]["threshold"] == point.value
    metrics = xferlearn.evaluate(tmp_path / "cal", site, tmp_path / "report", n_boot=20, gallery=False)
    assert "site sample" in metrics["threshold_source"] and metrics["threshold"] == point.value
    report = " ".join((tmp_path / "report" / "report.md").read_text().split())
    assert "The threshold does not: it was re-chosen by Youden's J" in report and "site sample" in report


def test_a_sample_that_does_not_show_a_move_keeps_the_runs_operating_point(tiny_run, site, tmp_path, monkeypatch):
    import xferlearn.training.site as site_module

    before = load_checkpoint(tiny_run)
    monkeypatch.setattr(site_module, "threshold_interval", lambda *args, **kwargs: (0.0, 1.0))  # any threshold fits
    record = xferlearn.calibrate(tiny_run, site, tmp_path / "kept", n_boot=20)
    kept = load_checkpoint(tmp_path / "kept")
    assert kept.operating_point == before.operating_point and kept.temperature == before.temperature
    assert record["decision"].startswith("kept the run's threshold") and record["unmoved_interval"] == (0.0, 1.0)
    assert kept.metrics["site_calibration"]["decision"] == record["decision"]
    report = (tmp_path / "report").joinpath
    xferlearn.evaluate(tmp_path / "kept", site, tmp_path / "report", n_boot=20, gallery=False)
    assert "Site calibration on 64 images" in report("report.md").read_text()  # every report says where it came from

    monkeypatch.setattr(site_module, "threshold_interval", lambda *args, **kwargs: (1.0, 1.0))  # excludes it
    record = xferlearn.calibrate(tiny_run, site, tmp_path / "moved", n_boot=20)
    moved = load_checkpoint(tmp_path / "moved")
    assert moved.operating_point.when == "calibrate" and record["unmoved_interval"] is None
    assert "excludes the run's" in record["decision"]


def test_the_figures_on_the_sample_are_for_the_runs_positive_class(normal_positive_run, site, tmp_path):
    record = xferlearn.calibrate(normal_positive_run, site, tmp_path / "cal", n_boot=50, always_move=True)
    metrics = xferlearn.evaluate(tmp_path / "cal", site, tmp_path / "eval", n_boot=10, gallery=False)
    after = record["on_sample_after"]
    assert after["positive_class"] == metrics["positive_class"] == "NORMAL"
    for key in ("accuracy", "sensitivity", "specificity"):
        assert after[key] == pytest.approx(metrics[key], abs=1e-9)


def test_the_sample_is_checked_against_the_run_and_kept_for_the_leak_guard(tiny_run, tmp_path):
    fresh = tmp_path / "fresh"  # images the run never saw (other seeds than its data's)
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        (fresh / name).mkdir(parents=True)
        for i in range(20):
            synthetic_image(label, 500 + i).save(fresh / name / f"s{i}.png")
    record = xferlearn.calibrate(tiny_run, fresh, tmp_path / "cal", n_boot=20, always_move=True)
    assert record["overlap"] is None and len(record["sample"]) == 40
    with pytest.raises(XferlearnError, match="40 are the site sample `calibrate` re-chose the operating point on"):
        xferlearn.evaluate(tmp_path / "cal", fresh, tmp_path / "e", n_boot=10, gallery=False, strict=True)
    own = xferlearn.calibrate(tiny_run, tiny_run.parent / "data", tmp_path / "own", n_boot=20, always_move=True,
                              min_per_class=2)
    assert "were trained on" in own["overlap"] and "is not the site's" in own["overlap"]


def test_prior_is_folded_into_the_bias(tiny_run, site, tmp_path):
    xferlearn.calibrate(tiny_run, site, tmp_path / "cal", prior=True, n_boot=20)
    old, new = load_checkpoint(tiny_run), load_checkpoint(tmp_path / "cal")
    assert np.allclose(new.class_prior, [24 / 64, 40 / 64])
    batch = torch.from_numpy(np.stack([decode_file(p, 64, old.preprocessing.interpolation)
                                       for p in sorted((site / "PNEUMONIA").iterdir())[:4]])).permute(0, 3, 1, 2)
    old.temperature = new.temperature  # same temperature: the only difference is the prior
    expected = prior_shift(Predictor(old).probabilities(batch), old.class_prior, new.class_prior)
    assert np.allclose(Predictor(new).probabilities(batch), expected, atol=1e-4)


def test_too_small_a_sample_is_refused(tiny_run, tiny_data, tmp_path):
    with pytest.raises(XferlearnError, match="too small to calibrate on.*at least 20"):
        xferlearn.calibrate(tiny_run, tiny_data, tmp_path / "cal")  # 16 images a class
    assert not (tmp_path / "cal").exists()


def test_cli_prints_the_interval_and_refuses_to_overwrite(tiny_run, site, tmp_path, capsys):
    assert main(["calibrate", str(tiny_run), str(site), "--out", str(tmp_path / "cal"), "--bootstrap", "50",
                 "--always-move"]) == 0
    out = capsys.readouterr().out
    assert "re-chosen on the sample" in out and "bootstrap 95% interval" in out and "specificity" in out
    assert main(["calibrate", str(tiny_run), str(site), "--out", str(tmp_path / "cal")]) == 2
    assert "already holds a model" in capsys.readouterr().err
