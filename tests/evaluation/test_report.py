"""The report folder: every file is written, metrics.json round-trips, report.md explains."""

import json

import numpy as np
import pytest

from xferlearn.errors import XferlearnError
from xferlearn.evaluation.metrics import bootstrap_intervals, compute_metrics
from xferlearn.evaluation.report import load_history, write_report

BINARY = ["NORMAL", "PNEUMONIA"]
DESIGN_KEYS = {"accuracy", "auc", "sensitivity", "specificity", "threshold", "threshold_source",
               "confusion_matrix", "n", "classes"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A Lightning CSVLogger file: step-level train_loss rows, then one epoch-level validation row.
METRICS_CSV = """epoch,step,train_loss,val_loss,val_auc,val_acc
0,0,0.90,,,
0,1,0.70,,,
0,1,,0.65,0.80,0.71
1,2,0.50,,,
1,3,0.30,,,
1,3,,0.45,0.90,0.82
2,5,,0.40,0.93,
"""


@pytest.fixture
def binary_case():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    p_pos = 1 / (1 + np.exp(-(rng.normal(size=120) + 2 * (2 * y - 1))))
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    return y, probs


def test_load_history_reads_sparse_rows_per_epoch(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(METRICS_CSV)
    history = load_history(csv_path)
    assert set(history) == {"train_loss", "val_loss", "val_auc", "val_acc"}
    assert history["train_loss"] == [(0, pytest.approx(0.8)), (1, pytest.approx(0.4))]
    assert history["val_auc"] == [(0, 0.80), (1, 0.90), (2, 0.93)]
    assert history["val_acc"] == [(0, 0.71), (1, 0.82)]
    (tmp_path / "bad.csv").write_text("step,loss\n0,1.0\n")
    with pytest.raises(XferlearnError, match="epoch"):
        load_history(tmp_path / "bad.csv")


def test_write_report_binary_writes_everything(tmp_path, binary_case):
    y, probs = binary_case
    source = "Youden's J on the validation split at training time"
    metrics = compute_metrics(y, probs, BINARY, 0.42, source)
    metrics["unreadable"] = [{"file": "NORMAL/broken.jpeg", "reason": "truncated JPEG"}]
    intervals = bootstrap_intervals(y, probs, BINARY, 0.42, n_boot=100)
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(METRICS_CSV)
    out = tmp_path / "nested" / "eval"
    gallery = "## Errors\n\nThe gallery goes here."
    paths = write_report(out, metrics, y, probs, BINARY, title="CXR test split",
                         run_info={"run_dir": "runs/cxr", "data_dir": "chest_xray/test",
                                   "backbone": "efficientnet_lite0", "weights": "imagenet",
                                   "checkpoint": "runs/cxr/model.ckpt"},
                         history_csv=csv_path, intervals=intervals, extra_sections=[gallery])

    assert set(paths) == {"metrics", "report", "roc", "confusion_matrix", "reliability",
                          "training_curves"}
    for stem in ("roc", "confusion_matrix", "reliability", "training_curves"):
        assert paths[stem] == out / f"{stem}.png"
        assert paths[stem].read_bytes().startswith(PNG_MAGIC)
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind

    saved = json.loads(paths["metrics"].read_text())
    assert DESIGN_KEYS <= set(saved)
    assert {k: saved[k] for k in metrics} == json.loads(json.dumps(metrics))
    assert saved["intervals"]["auc"] == intervals["auc"]
    assert 0 <= saved["ece"] <= 1

    report = paths["report"].read_text()
    assert report.startswith("# CXR test split")
    assert source in report and "0.42" in report
    assert "chest_xray/test" in report and "efficientnet_lite0" in report
    assert "NORMAL/broken.jpeg`: truncated JPEG" in report  # skipped files are shown, not hidden
    assert "| **NORMAL** |" in report and "| **PNEUMONIA** |" in report
    assert "At a threshold of 0.5 instead" in report
    assert "Expected calibration error" in report
    for name in ("roc.png", "confusion_matrix.png", "reliability.png", "training_curves.png"):
        assert f"]({name})" in report
    assert report.rstrip().endswith("The gallery goes here.")


def test_write_report_without_history_or_intervals(tmp_path, binary_case):
    y, probs = binary_case
    metrics = compute_metrics(y, probs, BINARY, 0.5, "default 0.5")
    paths = write_report(tmp_path, metrics, y, probs, BINARY,
                         history_csv=tmp_path / "missing.csv")
    assert "training_curves" not in paths and not (tmp_path / "training_curves.png").exists()
    assert "intervals" not in json.loads(paths["metrics"].read_text())
    report = paths["report"].read_text()
    assert "default 0.5" in report and "interval" not in report.lower()


def test_write_report_multiclass(tmp_path):
    rng = np.random.default_rng(1)
    classes = ["bacterial", "normal", "viral"]
    y = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3)) + 2 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = compute_metrics(y, probs, classes, None, "")
    paths = write_report(tmp_path, metrics, y, probs, classes)
    saved = json.loads(paths["metrics"].read_text())
    assert saved["threshold"] is None and saved["classes"] == classes
    report = paths["report"].read_text()
    assert "argmax (multi-class)" in report
    assert "| viral |" in report  # the per-class table
    assert paths["roc"].read_bytes().startswith(PNG_MAGIC)


def test_write_report_survives_a_broken_history(tmp_path, binary_case):
    y, probs = binary_case
    bad = tmp_path / "metrics.csv"
    bad.write_text("step,loss\n0,1.0\n")
    metrics = compute_metrics(y, probs, BINARY, 0.5, "x")
    paths = write_report(tmp_path / "out", metrics, y, probs, BINARY, history_csv=bad)
    assert "training_curves" not in paths
    assert "Training curves were not plotted" in paths["report"].read_text()
