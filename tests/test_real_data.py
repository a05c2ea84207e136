"""Real chest X-rays (slices of ../shared/data): a broken pipeline fails these bars."""

import random

import pytest

import xferlearn
from xferlearn.data.folders import patient_id

pytestmark = pytest.mark.data


def link_slice(source, target, names):
    for name in names:
        (target / name.parent.name).mkdir(parents=True, exist_ok=True)
        (target / name.parent.name / name.name).symlink_to(name)


@pytest.fixture(scope="module")
def real_slices(shared_data, tmp_path_factory):
    """A few hundred training images and a held-out slice whose patients never appear in training."""
    root = tmp_path_factory.mktemp("real")
    rng = random.Random(0)
    train_files, held_out = [], []
    for name, n_train, n_test in (("NORMAL", 120, 60), ("PNEUMONIA", 120, 60)):
        files = sorted((shared_data / "chest_xray_224" / "train" / name).iterdir())
        patients = sorted({patient_id(f.name) for f in files})
        rng.shuffle(patients)
        test_patients = set(patients[: len(patients) // 3])
        pool_train = [f for f in files if patient_id(f.name) not in test_patients]
        pool_test = [f for f in files if patient_id(f.name) in test_patients]
        train_files += rng.sample(pool_train, n_train)
        held_out += rng.sample(pool_test, n_test)
    link_slice(shared_data, root / "train", train_files)
    link_slice(shared_data, root / "test", held_out)
    assert not {patient_id(f.name) for f in train_files} & {patient_id(f.name) for f in held_out}
    return root


def test_linear_recipe_on_real_xrays_reaches_auc_085(real_slices, tmp_path):
    result = xferlearn.train(data=str(real_slices / "train"), out=str(tmp_path / "run"), recipe="linear",
                             views=0, epochs=20)
    metrics = xferlearn.evaluate(result.run_dir, real_slices / "test", n_boot=200)
    assert metrics["n"] == 120
    assert metrics["auc"] >= 0.85, metrics
    assert metrics["threshold"] == result.metrics["threshold"]  # chosen on validation, not on this slice


def test_original_size_grayscale_xrays_predict(shared_data, real_slices, tmp_path):
    result = xferlearn.train(data=str(real_slices / "train"), out=str(tmp_path / "run"), views=0, epochs=5,
                             backbone="efficientnet_lite0")  # the original-size decode is under test, not the model
    rows = xferlearn.load(result.run_dir).predict(
        [str(p) for p in sorted((shared_data / "samples_original").rglob("*.jpeg"))])
    assert len(rows) == 12 and all(r["error"] is None and r["class"] in ("NORMAL", "PNEUMONIA") for r in rows)
