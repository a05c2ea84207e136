"""The leak guard: evaluating on the run's own images is said, and refused with --strict."""

import pytest
from conftest import synthetic_image

import xferlearn
from xferlearn.cli import main
from xferlearn.errors import XferlearnError
from xferlearn.evaluation.leaks import describe_overlap, find_overlap


def _split():
    return {"how": "stratified by class, 1/5 held out",
            "train": [{"digest": "a", "phash": "0000000000000000"}, {"digest": "b", "phash": "ffffffffffffffff"}],
            "val": [{"digest": "c", "phash": "00000000ffffffff"}]}


def test_exact_and_near_copies_are_counted_per_side():
    # a: identical to a training image; x: 2 bits from one (a re-encoded copy); c: a validation
    # image; z: unrelated (32 bits from every known hash).
    overlap = find_overlap(_split(), ["a", "x", "c", "z"],
                           ["0000000000000000", "ffffffffffffff3f", "00000000ffffffff", "0f0f0f0f0f0f0f0f"])
    assert overlap["train"] == {"exact": 1, "near": 1, "perceptual_checked": True}
    assert overlap["val"]["exact"] == 1 and overlap["val"]["near"] == 0 and overlap["total"] == 3
    text = describe_overlap(overlap)
    assert "3 of 4 images are not held out" in text and "the run chose its epoch, temperature and any threshold on" in text
    clean = find_overlap(_split(), ["z"], ["0f0f0f0f0f0f0f0f"])
    assert clean["total"] == 0 and describe_overlap(clean).startswith("no overlap")
    assert not find_overlap(None, ["a"], ["0"])["checked"]


def test_evaluate_on_the_runs_own_images_says_so_and_strict_refuses(tiny_run, tiny_data, tmp_path, capsys):
    metrics = xferlearn.evaluate(tiny_run, tiny_data, out=tmp_path / "e", gallery=False, n_boot=20)
    overlap = metrics["overlap"]
    assert overlap["total"] == metrics["n"] and overlap["val"]["exact"] > 0 and overlap["train"]["exact"] > 0
    assert "the run chose its epoch, temperature and any threshold on" in overlap["summary"]
    assert "not held out" in (tmp_path / "e" / "report.md").read_text()
    with pytest.raises(XferlearnError, match="--strict"):
        xferlearn.evaluate(tiny_run, tiny_data, out=tmp_path / "s", gallery=False, n_boot=20, strict=True)
    assert main(["evaluate", str(tiny_run), str(tiny_data), "--out", str(tmp_path / "c"), "--strict",
                 "--no-gallery", "--bootstrap", "20"]) == 2
    assert "--strict" in capsys.readouterr().err


def test_resized_copies_are_caught_and_new_images_pass(tiny_run, tiny_data, tmp_path):
    fresh = tmp_path / "fresh"
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        (fresh / name).mkdir(parents=True)
        for i in range(3):
            synthetic_image(label, 500 + i).save(fresh / name / f"new{i}.png")
    metrics = xferlearn.evaluate(tiny_run, fresh, out=tmp_path / "e1", gallery=False, n_boot=20, strict=True)
    assert metrics["overlap"]["total"] == 0
    from PIL import Image
    source = sorted((tiny_data / "NORMAL").iterdir())[0]
    # Shrunk by a quarter: the 256-bit hash at this 64 px model size (4-pixel cells) loses a 40 px
    # copy's detail; at 224 px X-rays, half-size JPEG copies stayed within 7 bits (data/phash.py).
    Image.open(source).resize((48, 48)).save(fresh / "NORMAL" / "resized_copy.png")
    metrics = xferlearn.evaluate(tiny_run, fresh, out=tmp_path / "e2", gallery=False, n_boot=20)
    side = metrics["overlap"]["train"]["near"] + metrics["overlap"]["val"]["near"]
    assert metrics["overlap"]["total"] == 1 and side == 1
