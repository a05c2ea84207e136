"""Same answer at any scale: 2 CPU processes (DDP over gloo, launched by Lightning as
`xferlearn train --devices 2 --strategy ddp --accelerator cpu` does) against 1, on a small
synthetic set. CI runs this on every submission, so the distributed path stays exercised.

Tolerances, and why they are not zero: the global batch is split across the processes, so
each optimiser step is the same mean gradient up to float rounding and to the class weights
being normalised per process's half-batch; features computed in a different batch grouping
differ by float rounding. Validation probabilities must agree within 0.02, the threshold
within 0.02, AUC/accuracy/sensitivity/specificity within 0.05 (one of ~10 validation images),
the features to 1e-4.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_folder
from torch.utils.data.distributed import DistributedSampler

import xferlearn
from xferlearn.models.base import cpu_supports_bf16
from xferlearn.models.feature_store import FeatureStore
from xferlearn.training.distributed import gather_rows, unpad_gathered

# Few epochs at a modest rate: probabilities away from 0 and 1, so a difference would show.
# The synthetic images as drawn (no contrast step): equalised, their two classes sit close enough
# that the head's two epochs end up to 0.07 apart between one and two processes. The sharded
# features are what DDP must get right; the ensemble test below runs with the contrast step.
OPTIONS = {**TINY, "epochs": 2, "lr": 0.002, "contrast": "none"}


def test_gathered_validation_has_each_image_once():
    n, world = 11, 2  # DistributedSampler pads to 12: the first image would count twice
    per_rank = [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    assert sum(map(len, per_rank)) == 12
    assert unpad_gathered(torch.tensor(per_rank), n).tolist() == list(range(n))


def test_gather_rows_is_the_identity_in_one_process():
    rows = np.arange(12.0).reshape(1, 6, 2)
    assert gather_rows(rows, 6, axis=1) is rows


def cli_flags(options: dict) -> list[str]:
    return [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def store_rows(cache: Path) -> dict[str, np.ndarray]:
    """Every (key, view, image) row of a feature cache (two keys where the training views took
    another engine than the validation images: `feature_engine`)."""
    rows = {}
    for key in (cache / "features").iterdir():
        for view in key.iterdir():
            digests = sorted({d for listing in view.glob("*.digests") for d in listing.read_text().split()})
            table = FeatureStore(key.name, cache).rows(view.name, digests).read(np.arange(len(digests)))
            rows.update({(key.name, view.name, d): row for d, row in zip(digests, table)})
    return rows


def predictions(run: Path) -> dict[str, float]:
    with open(run / "validation_predictions.csv") as handle:
        return {row["file"]: float(row["p_PNEUMONIA"]) for row in csv.DictReader(handle)}


def train_in_two_processes(data: Path, tmp_path: Path, options: dict) -> Path:
    """`xferlearn train DATA --devices 2 --strategy ddp --accelerator cpu` into tmp_path/two (cache2)."""
    src = str(Path(xferlearn.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "xferlearn.cli", "train", str(data), "--out", str(tmp_path / "two"),
                           "--cache-dir", str(tmp_path / "cache2"), "--devices", "2", "--strategy", "ddp",
                           "--accelerator", "cpu", *cli_flags(options)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "two"


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_give_the_one_process_answer(tmp_path):
    data = make_folder(tmp_path / "data", per_class=21)  # 9 validation images: the sampler pads them to 10
    one = xferlearn.train(data=str(data), out=str(tmp_path / "one"), cache_dir=str(tmp_path / "cache1"), **OPTIONS)
    two = train_in_two_processes(data, tmp_path, OPTIONS)

    # The sharded feature cache is whole: every row of the one-process cache, equal.
    rows1, rows2 = store_rows(tmp_path / "cache1"), store_rows(tmp_path / "cache2")
    assert rows1.keys() == rows2.keys()
    assert max(np.abs(rows1[k] - rows2[k]).max() for k in rows1) < 1e-4

    m1, m2 = one.metrics, json.loads((two / "validation_metrics.json").read_text())
    assert m2["n"] == m1["n"] and m1["n"] % 2 == 1  # each validation image once, padding cut
    assert 0.05 < np.mean(list(predictions(one.run_dir).values())) < 0.95
    p1, p2 = predictions(one.run_dir), predictions(two)
    assert p1.keys() == p2.keys()
    assert max(abs(p1[f] - p2[f]) for f in p1) < 0.02
    assert abs(m1["threshold"] - m2["threshold"]) < 0.02
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        assert abs(m1[key] - m2[key]) <= 0.05, key
    assert xferlearn.load(two).classes == xferlearn.load(one.run_dir).classes
    # Only rank 0 wrote the run: one metrics log, the files of one run.
    assert (two / "split.json").exists() and (two / "config.json").exists() and (two / "model.pt").exists()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_an_ensemble_fits_member_by_member_in_two_processes(tmp_path):
    """Each member's features are sharded and its head fitted under DDP in turn: the same
    validation probabilities as one process."""
    options = {**OPTIONS, "backbone": "resnet18+resnet10t", "contrast": "auto"}  # gray images: CLAHE on
    data = make_folder(tmp_path / "data", per_class=15)
    one = xferlearn.train(data=str(data), out=str(tmp_path / "one"), cache_dir=str(tmp_path / "cache1"), **options)
    two = train_in_two_processes(data, tmp_path, options)
    # One feature table per member; two where the CPU computes bf16 natively, as the training
    # views of these dense networks then go through PyTorch's bf16 (feature_engine).
    tables = 4 if cpu_supports_bf16() else 2
    assert len(list((tmp_path / "cache2" / "features").iterdir())) == tables
    p1, p2 = predictions(one.run_dir), predictions(two)
    assert p1.keys() == p2.keys() and 0.05 < np.mean(list(p1.values())) < 0.95
    assert max(abs(p1[f] - p2[f]) for f in p1) < 0.02
