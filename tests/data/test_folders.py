"""Scanning folders and carving a validation split that no patient or duplicate straddles."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_folder, synthetic_image

from xferlearn.data.folders import folder_split, patient_id, save_split, scan, split_validation
from xferlearn.data.layout import class_folder, count_images, find_layout, use_validation_folder
from xferlearn.errors import XferlearnError
from xferlearn.data.images import DecodeCache


@pytest.fixture
def cache(tmp_path):
    return DecodeCache(tmp_path / "cache", 32)


@pytest.mark.parametrize("name, patient", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1104-0001.jpeg", "NORMAL2-IM-1104"),
    ("scan_0001.png", None),
])
def test_patient_ids_from_kaggle_names(name, patient):
    assert patient_id(name) == patient


def test_scan_lists_classes_and_reports_unreadable_files(image_folder, cache):
    (image_folder / "NORMAL" / "notes.txt").write_text("not an image")
    (image_folder / "PNEUMONIA" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    manifest = scan(image_folder, cache)
    assert manifest.classes == ["NORMAL", "PNEUMONIA"]
    assert manifest.counts() == {"NORMAL": 14, "PNEUMONIA": 14}
    reasons = dict(manifest.unreadable)
    assert set(reasons) == {str(image_folder / "NORMAL" / "notes.txt"), str(image_folder / "PNEUMONIA" / "broken.jpeg")}
    assert all(reasons.values())


def test_duplicates_are_kept_once_and_conflicts_dropped(image_folder, cache):
    normal = sorted((image_folder / "NORMAL").iterdir())
    shutil.copy(normal[0], image_folder / "NORMAL" / "copy.jpeg")
    shutil.copy(normal[1], image_folder / "PNEUMONIA" / "mislabelled.jpeg")
    manifest = scan(image_folder, cache)
    assert [d for d, _ in manifest.duplicates] == [str(image_folder / "NORMAL" / "copy.jpeg"),
                                                   str(image_folder / "PNEUMONIA" / "mislabelled.jpeg")]
    assert manifest.counts() == {"NORMAL": 13, "PNEUMONIA": 14}  # the image under both classes is out
    assert any("another class" in reason for _, reason in manifest.unreadable)
    assert len(scan(image_folder, cache, dedupe=False).samples) == 30  # evaluation counts every file


def test_split_is_stratified_and_patient_disjoint(tmp_path, cache):
    data = make_folder(tmp_path / "d", per_class=40)
    manifest = scan(data, cache)
    train_idx, val_idx, how = split_validation(manifest, 0.25, seed=3)
    assert len(set(train_idx) & set(val_idx)) == 0 and len(train_idx) + len(val_idx) == 80
    patients = lambda idx: {manifest.samples[i].patient for i in idx}  # noqa: E731
    assert not patients(train_idx) & patients(val_idx)
    val_labels = manifest.labels[val_idx]
    assert 0.3 < val_labels.mean() < 0.7 and 15 <= len(val_idx) <= 25
    assert "patient" in how
    again = split_validation(manifest, 0.25, seed=3)
    assert np.array_equal(again[1], val_idx)  # seeded: the same split every time


def test_split_without_patient_names_is_plain_stratified(tmp_path, cache):
    manifest = scan(make_folder(tmp_path / "d", per_class=20, patients=False), cache)
    _, val_idx, how = split_validation(manifest, 0.2)
    assert np.bincount(manifest.labels[val_idx]).tolist() == [4, 4]
    assert "each image its own group" in how and "patient" not in how  # no patient talk without patients


def test_split_is_saved(tmp_path, image_folder, cache, monkeypatch):
    monkeypatch.chdir(image_folder.parent)  # DATA given relative to where train ran
    manifest = scan(Path(image_folder.name), cache)
    train_idx, val_idx, how = split_validation(manifest, 0.25)
    save_split(tmp_path / "split.json", manifest, train_idx, val_idx, how)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert len(saved["train"]) == len(train_idx) and len(saved["val"]) == len(val_idx)
    assert {"path", "label", "digest", "patient"} <= set(saved["val"][0])
    assert all(Path(entry["path"]).is_absolute() and Path(entry["path"]).is_file()  # readable from anywhere
               for entry in saved["train"] + saved["val"])


def test_kaggle_root_finds_val_and_checks_test(tmp_path):
    root = tmp_path / "kaggle"
    make_folder(root / "train")
    make_folder(root / "val", per_class=2)
    make_folder(root / "test", per_class=3)
    layout = find_layout(root)
    assert layout.train_roots == [root / "train"] and layout.val_root == root / "val"
    assert layout.test_root == root / "test"
    assert find_layout(root / "train", val=root / "test").val_root == root / "test"
    with pytest.raises(XferlearnError, match="--val .* is not a folder"):
        find_layout(root / "train", val=root / "nowhere")
    shutil.rmtree(root / "test" / "NORMAL")
    (root / "test" / "COVID").mkdir()
    with pytest.raises(XferlearnError, match="but .*train has .*missing: \\['NORMAL'\\].*unknown: \\['COVID'\\]"):
        find_layout(root)  # no model yet: the classes it lacks are train/'s


def test_valid_and_validation_folders_are_validation_folders_too(tmp_path):
    # TensorFlow's cats_and_dogs_filtered has train/ and validation/; Roboflow exports valid/.
    root = tmp_path / "tf"
    make_folder(root / "train")
    make_folder(root / "validation", per_class=2)
    assert find_layout(root).val_root == root / "validation"
    make_folder(root / "valid", per_class=2)
    with pytest.raises(XferlearnError, match="holds valid/ and validation/: name the validation folder with --val"):
        find_layout(root)
    assert find_layout(root, val=root / "valid").val_root == root / "valid"


def test_empty_and_single_class_folders_are_refused(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(XferlearnError, match="no class folders"):
        find_layout(tmp_path / "empty")
    make_folder(tmp_path / "one", classes=("NORMAL",))
    with pytest.raises(XferlearnError, match="single class"):
        find_layout(tmp_path / "one")
    with pytest.raises(XferlearnError, match="does not exist"):
        find_layout(tmp_path / "nowhere")


def test_class_without_readable_images_is_refused(image_folder, cache):
    (image_folder / "EXTRA").mkdir()
    (image_folder / "EXTRA" / "x.jpeg").write_bytes(b"nope")
    with pytest.raises(XferlearnError, match="No readable images for class.*EXTRA"):
        scan(image_folder, cache)


def test_too_few_images_to_split(tmp_path, cache):
    manifest = scan(make_folder(tmp_path / "d", per_class=3), cache)
    with pytest.raises(XferlearnError, match="Too few images"):
        split_validation(manifest, 0.2)


def test_validation_folder_is_used_only_when_large_enough():
    use, why = use_validation_folder({"ants": 70, "bees": 83}, 20)
    assert use and "smallest: ants, 70" in why
    use, why = use_validation_folder({"NORMAL": 8, "PNEUMONIA": 8}, 20)
    assert not use and "NORMAL has 8 images there, fewer than the 20" in why


def test_class_names_match_in_either_unicode_form(tmp_path, cache):
    """A model trained on 'dög café' (composed, NFC) evaluates a folder macOS wrote decomposed (NFD)."""
    import unicodedata

    composed = ["cat", unicodedata.normalize("NFC", "dög café")]
    root = make_folder(tmp_path / "nfd", classes=("cat", unicodedata.normalize("NFD", "dög café")), per_class=3,
                       patients=False)
    manifest = scan(root, cache, classes=composed, dedupe=False)
    assert manifest.classes == composed and np.bincount(manifest.labels).tolist() == [3, 3]
    assert count_images(root, composed) == {"cat": 3, composed[1]: 3}
    (root / composed[1]).mkdir()  # both forms as folders of their own: each name keeps its own
    assert class_folder(root, composed[1]) == composed[1]
    with pytest.raises(XferlearnError, match="missing"):
        scan(root, cache, classes=["cat", "dog cafe"])


def test_folder_split_and_counts(tmp_path, cache):
    make_folder(tmp_path / "train", per_class=6)
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):  # images unlike train's (other seeds)
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(4):
            synthetic_image(label, 100 + i).save(tmp_path / "val" / name / f"v{i}.png")
    assert count_images(tmp_path / "val", ["NORMAL", "PNEUMONIA"]) == {"NORMAL": 4, "PNEUMONIA": 4}
    # An image in both folders is kept once, on the training side: validation never repeats train.
    shutil.copy(tmp_path / "train" / "NORMAL" / "IM-0000-0001.jpeg", tmp_path / "val" / "NORMAL" / "copy.jpeg")
    manifest = scan([tmp_path / "train", tmp_path / "val"], cache)
    train_idx, val_idx = folder_split(manifest, tmp_path / "val", 4)
    assert len(train_idx) == 12 and len(val_idx) == 8
    assert all("/val/" in manifest.paths[i] for i in val_idx) and len(manifest.duplicates) == 1
    assert manifest.duplicates[0][0].endswith("val/NORMAL/copy.jpeg")
    # A validation folder that is mostly the training images leaves too little apart: refused.
    with pytest.raises(XferlearnError, match=r"leaves training .* and validation \{'NORMAL': 4, 'PNEUMONIA': 4\} "
                                             r".*\(1 of its files are copies of training images"):
        folder_split(manifest, tmp_path / "val", 5)
    (tmp_path / "val" / "NORMAL" / "copy.jpeg").unlink()  # smaller without copies of train: used as it is
    fewer = scan([tmp_path / "train", tmp_path / "val"], cache)
    assert len(folder_split(fewer, tmp_path / "val", 20)[1]) == 8
    itself = scan([tmp_path / "train", tmp_path / "train"], cache)  # --val pointing at the training folder
    with pytest.raises(XferlearnError, match="give a validation folder apart from the training images"):
        folder_split(itself, tmp_path / "train", 4)


def test_patients_are_mentioned_only_where_files_carry_them(tmp_path, cache):
    plain = scan(make_folder(tmp_path / "plain", classes=("ants", "bees"), per_class=10, patients=False), cache)
    *_, how = split_validation(plain, 0.2)
    assert "patient" not in how and "each image its own group" in how
    xrays = scan(make_folder(tmp_path / "xray", per_class=10), cache)
    *_, how = split_validation(xrays, 0.2)
    assert "grouped by patient (20 of 20 files carry a patient id)" in how
def test_symlink_loops_and_dangling_links_are_listed_as_unreadable(image_folder, cache):
    normal = image_folder / "NORMAL"
    (normal / "loop-a.jpeg").symlink_to(normal / "loop-b.jpeg")
    (normal / "loop-b.jpeg").symlink_to(normal / "loop-a.jpeg")
    (normal / "gone.jpeg").symlink_to(image_folder / "nowhere.jpeg")
    manifest = scan(image_folder, cache)
    reasons = {Path(path).name: reason for path, reason in manifest.unreadable}
    assert set(reasons) == {"loop-a.jpeg", "loop-b.jpeg", "gone.jpeg"}  # none silently dropped
    assert "symbolic links" in reasons["loop-a.jpeg"] and "No such file" in reasons["gone.jpeg"]
    assert len(manifest.samples) == 28
