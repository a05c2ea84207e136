"""Small data: cross-fitting chooses; validation folders are respected; --positive-class."""

import csv
import json

import numpy as np
import pytest
from conftest import TINY, make_folder, synthetic_image

import xferlearn
from xferlearn.errors import XferlearnError
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.training.crossfit import choose_epoch, crossfit_head


def _said(capsys) -> str:
    """What the run printed, with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def test_small_data_is_cross_fitted_then_refitted_on_every_image(tmp_path, capsys):
    data = make_folder(tmp_path / "d", classes=("ants", "bees"), per_class=12, patients=False)
    result = xferlearn.train(data=str(data), out=str(tmp_path / "r"), **{**TINY, "cv": None})
    log = _said(capsys)
    assert "5-fold cross-fitting" in log and "patient" not in log
    assert "threshold" in log and "for bees, the class sensitivity refers to" in log  # the second class, named
    assert "These cross-validated figures are in-distribution: 24 images" in log  # out of fold: every image
    checkpoint = load_checkpoint(result.run_dir)
    point = checkpoint.operating_point
    assert point.data == "out-of-fold predictions (5-fold cross-fitting)" and point.n == 24
    metrics = checkpoint.metrics
    assert metrics["n"] == 24 and set(metrics["intervals"]) >= {"auc", "accuracy"}
    assert 1 <= metrics["selection"]["chosen_epochs"] <= TINY["epochs"]
    split = json.loads((result.run_dir / "split.json").read_text())
    assert len(split["train"]) == 24 and split["val"] == [] and len(split["train"][0]["phash"]) == 64  # 256-bit hashes
    with open(result.run_dir / "validation_predictions.csv") as rows:
        assert len(list(csv.DictReader(rows))) == 24  # every image, out of fold
    assert (result.run_dir / "logs" / "cv" / "fold5" / "metrics.csv").exists()
    xferlearn.evaluate(result.run_dir, data, tmp_path / "eval", n_boot=10, gallery=False)
    report = " ".join((tmp_path / "eval" / "report.md").read_text().split())
    assert "come from the run's validation: out-of-fold predictions of the training images" in report
    assert "carved from the training folder" not in report


def test_a_cross_fitted_run_resumed_makes_the_same_choice(tmp_path, capsys):
    """--resume after the folds have run: each fold trains afresh (a fold resumed from its
    last.ckpt would add no epochs, and its out-of-fold logits would be missing), so the resumed
    run chooses the same epoch count and threshold."""
    data = make_folder(tmp_path / "d", classes=("ants", "bees"), per_class=12, patients=False)
    first = load_checkpoint(xferlearn.train(data=str(data), out=str(tmp_path / "r"), **{**TINY, "cv": None}).run_dir)
    again = load_checkpoint(xferlearn.train(data=str(data), out=str(tmp_path / "r"), resume=True,
                                            **{**TINY, "cv": None}).run_dir)
    assert again.metrics["selection"]["chosen_epochs"] == first.metrics["selection"]["chosen_epochs"]
    assert again.threshold == pytest.approx(first.threshold, abs=1e-4)


def test_an_ensembles_members_keep_their_last_epoch_when_cross_fitted(tmp_path, capsys):
    """Each member is cross-fitted for its out-of-fold logits and curves, but none chooses its own
    epoch count: all keep the full --epochs, as with a held-out split."""
    data = make_folder(tmp_path / "d", classes=("ants", "bees"), per_class=12, patients=False)
    result = xferlearn.train(data=str(data), out=str(tmp_path / "r"),
                             **{**TINY, "backbone": "resnet18+resnet10t", "epochs": 4, "cv": 3})
    assert "an ensemble's member keeps the last" in _said(capsys)
    members = load_checkpoint(result.run_dir).metrics["selection"]["members"]
    assert len(members) == 2
    for member in members:
        assert member["kept"] == "the last epoch" and member["chosen_epochs"] == 4
        assert round(member["last_epoch_val_auc"], 5) == member["out_of_fold_auc_by_epoch"][-1]
        assert "best_epoch_val_auc" not in member
    with pytest.raises(ValueError, match="keep must be 'best' or 'last'"):
        crossfit_head(None, None, None, "", "", None, tmp_path, 3, None, keep="first")


def test_cross_fitting_groups_by_patient_where_there_are_patients(tmp_path, capsys):
    data = make_folder(tmp_path / "d", per_class=12)
    xferlearn.train(data=str(data), out=str(tmp_path / "r"), **{**TINY, "cv": 3})
    assert "3 folds (grouped by patient (24 of 24 files carry a patient id))" in _said(capsys)


def test_no_cv_and_finetune_hold_a_split_out(tmp_path):
    data = make_folder(tmp_path / "d", per_class=12)
    result = xferlearn.train(data=str(data), out=str(tmp_path / "r"), **TINY)  # cv=0
    assert load_checkpoint(result.run_dir).operating_point.data == "validation split"
    with pytest.raises(XferlearnError, match="--cv works with --recipe linear"):
        xferlearn.train(data=str(data), out=str(tmp_path / "f"), **{**TINY, "cv": 5, "recipe": "finetune"})
    with pytest.raises(XferlearnError, match="--cv takes a number of folds"):
        xferlearn.train(data=str(data), out=str(tmp_path / "g"), **{**TINY, "cv": 1})


def test_epoch_is_chosen_on_out_of_fold_auc_then_loss():
    y = np.array([0, 0, 1, 1])
    bad = np.array([[0, 1], [1, 0], [1, 0], [0, 1]], float)   # AUC 0.5
    good = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], float)  # AUC 1, confident
    timid = good * 0.1                                        # AUC 1, higher log loss
    best, aucs = choose_epoch(np.stack([bad, timid, good]), y, positive=1)
    assert best == 2 and aucs == [0.5, 1.0, 1.0]


def _root_with_val(tmp_path, per_class_val: int):
    root = tmp_path / "root"
    make_folder(root / "train", classes=("ants", "bees"), per_class=12, patients=False)
    for label, name in enumerate(("ants", "bees")):
        (root / "val" / name).mkdir(parents=True)
        for i in range(per_class_val):
            synthetic_image(label, 200 + i).save(root / "val" / name / f"v{i}.png")
    return root


def test_a_large_enough_val_folder_is_the_validation_split(tmp_path, capsys):
    root = _root_with_val(tmp_path, 20)
    result = xferlearn.train(data=str(root), out=str(tmp_path / "r"), **{**TINY, "cv": None})
    assert "Validation: " in _said(capsys)
    checkpoint = load_checkpoint(result.run_dir)
    assert checkpoint.operating_point.n == 40 and checkpoint.metrics["n"] == 40
    assert checkpoint.operating_point.data == "validation folder"
    split = json.loads((result.run_dir / "split.json").read_text())
    assert len(split["train"]) == 24 and all("/val/" in s["path"] for s in split["val"])
    assert "validation folder" in split["how"]


def test_a_val_folder_sharing_patients_with_train_is_used_with_a_warning(tmp_path, capsys):
    root = tmp_path / "root"
    make_folder(root / "train", per_class=12)  # patients IM-0000..0005 and person0..5
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        (root / "val" / name).mkdir(parents=True)
        for i in range(20):  # patients 0..9: six of each class also in train
            file = f"IM-{i // 2:04d}-{i % 2 + 3:04d}.jpeg" if label == 0 else f"person{i // 2}_bacteria_{100 + i}.jpeg"
            synthetic_image(label, 300 + i).save(root / "val" / name / file)
    xferlearn.train(data=str(root), out=str(tmp_path / "r"), **{**TINY, "cv": None})
    assert "Warning: 12 patients have images on both sides (e.g. IM-0000)" in _said(capsys)


def test_re_encoded_copies_of_training_images_in_a_val_folder_are_named(tmp_path, capsys):
    from PIL import Image

    root = _root_with_val(tmp_path, 20)
    source = sorted((root / "train" / "ants").iterdir())[0]
    Image.open(source).save(root / "val" / "ants" / "copy.png")  # the same picture, other bytes
    xferlearn.train(data=str(root), out=str(tmp_path / "r"), **{**TINY, "cv": None})
    assert "Warning: 1 validation images are near copies of training images" in _said(capsys)


def test_a_small_val_folder_is_pooled_into_train(tmp_path, capsys):
    root = _root_with_val(tmp_path, 3)
    result = xferlearn.train(data=str(root), out=str(tmp_path / "r"), **TINY)
    assert "pooled into train: ants has 3 images there, fewer than the 20" in _said(capsys)
    split = json.loads((result.run_dir / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 30


def test_positive_class_is_saved_and_used(tmp_path):
    data = make_folder(tmp_path / "d", per_class=12)
    result = xferlearn.train(data=str(data), out=str(tmp_path / "r"), positive_class="normal", **TINY)
    checkpoint = load_checkpoint(result.run_dir)
    assert checkpoint.positive_class == "NORMAL" and checkpoint.metrics["positive_class"] == "NORMAL"
    metrics = xferlearn.evaluate(result.run_dir, data, out=tmp_path / "e", gallery=False, n_boot=20)
    assert metrics["positive_class"] == "NORMAL"
    assert metrics["sensitivity"] == pytest.approx(
        metrics["confusion_matrix"][0][0] / sum(metrics["confusion_matrix"][0]))
    with pytest.raises(XferlearnError, match="'cats' is not one of the classes: NORMAL, PNEUMONIA"):
        xferlearn.train(data=str(data), out=str(tmp_path / "x"), positive_class="cats", **TINY)
