"""Holding out whole acquisition groups (--group-by, --groups, --val-groups)."""

import pytest
from conftest import synthetic_image

from xferlearn.config import TrainConfig
from xferlearn.data.folders import scan, split_validation
from xferlearn.data.groups import group_of, compile_group_pattern
from xferlearn.data.images import DecodeCache
from xferlearn.errors import XferlearnError


@pytest.fixture
def cache(tmp_path):
    return DecodeCache(tmp_path / "cache", 32)


def site_folder(root, sites=("siteA", "siteB", "siteC", "siteD"), per_site=6):
    """Both classes at every site; names like siteB_NORMAL_3.jpeg (no patient ids)."""
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        (root / name).mkdir(parents=True)
        for s, site in enumerate(sites):
            for i in range(per_site):
                synthetic_image(label, 100 * s + i).save(root / name / f"{site}_{name}_{i}.jpeg")
    return root


def site(manifest, idx):
    return {manifest.samples[i].path.rsplit("/", 1)[1].split("_")[0] for i in idx}


def test_group_is_first_capture_or_whole_match():
    assert group_of("NORMAL2-IM-1104-0001.jpeg", compile_group_pattern(r"^(NORMAL2|IM|person)")) == "NORMAL2"
    assert group_of("IM-0115-0001.jpeg", compile_group_pattern(r"^(NORMAL2|IM|person)")) == "IM"
    assert group_of("scan_site7_01.png", compile_group_pattern(r"site\d+")) == "site7"
    assert group_of("scan.png", compile_group_pattern(r"site\d+")) is None


def test_named_validation_groups_are_held_out_whole(tmp_path, cache):
    manifest = scan(site_folder(tmp_path / "d"), cache)
    train_idx, val_idx, how = split_validation(manifest, group_by=r"^(site\w)_", val_groups=["siteB", "siteD"])
    assert site(manifest, val_idx) == {"siteB", "siteD"} and site(manifest, train_idx) == {"siteA", "siteC"}
    assert len(train_idx) + len(val_idx) == 48 and "siteB" in how


def test_drawn_group_fold_never_splits_a_group(tmp_path, cache):
    manifest = scan(site_folder(tmp_path / "d"), cache)
    train_idx, val_idx, _ = split_validation(manifest, 0.25, seed=1, group_by=r"^(site\w)_")
    assert site(manifest, val_idx) and not site(manifest, train_idx) & site(manifest, val_idx)
    assert set(manifest.labels[val_idx]) == {0, 1}


def test_groups_from_a_csv(tmp_path, cache):
    data = site_folder(tmp_path / "d")
    rows = ["file,group"] + [f"{p.relative_to(data)},{'north' if p.name[4] in 'AB' else 'south'}"
                             for p in sorted(data.rglob("*.jpeg"))]
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    manifest = scan(data, cache)
    train_idx, val_idx, _ = split_validation(manifest, groups_csv=str(tmp_path / "groups.csv"), val_groups=["south"])
    assert site(manifest, val_idx) == {"siteC", "siteD"} and site(manifest, train_idx) == {"siteA", "siteB"}


def test_patients_never_straddle_a_group_split(tmp_path, cache):
    """A patient imaged at two sites: its image at the training site is left out."""
    data = site_folder(tmp_path / "d", sites=("siteA", "siteB"))
    synthetic_image(1, 999).save(data / "PNEUMONIA" / "person7_bacteria_1.jpeg")  # taken at site A
    synthetic_image(1, 998).save(data / "PNEUMONIA" / "person7_bacteria_2.jpeg")  # taken at site B
    where = {"person7_bacteria_1.jpeg": "siteA", "person7_bacteria_2.jpeg": "siteB"}
    rows = ["file,group"] + [f"{p.name},{where.get(p.name, p.name.split('_')[0])}" for p in sorted(data.rglob("*.jpeg"))]
    (tmp_path / "g.csv").write_text("\n".join(rows) + "\n")
    manifest = scan(data, cache)
    train_idx, val_idx, how = split_validation(manifest, groups_csv=str(tmp_path / "g.csv"), val_groups=["siteB"])
    patients = lambda idx: {manifest.samples[i].patient for i in idx} - {None}  # noqa: E731
    assert patients(val_idx) == {"person7"} and not patients(train_idx)
    assert len(train_idx) == 12 and "1 training images left out" in how


@pytest.mark.parametrize("options, message", [
    (dict(group_by=r"^(site\w)_", val_groups=["siteZ"]), "no image belongs to"),
    (dict(group_by=r"^nomatch"), "have no group"),
    (dict(group_by=r"^(site)"), "one group"),
    (dict(group_by=r"(["), "not a regular expression"),
    (dict(val_groups=["siteA"]), "--group-by"),
])
def test_bad_group_options_are_one_line_errors(tmp_path, cache, options, message):
    manifest = scan(site_folder(tmp_path / "d"), cache)
    with pytest.raises(XferlearnError, match=message):
        split_validation(manifest, **options)


def test_config_checks_group_flags(tmp_path):
    assert TrainConfig(data="d", group_by="^(x)", val_groups="a, b").val_group_list() == ["a", "b"]
    with pytest.raises(XferlearnError, match="either"):
        TrainConfig(data="d", group_by="x", groups="g.csv")
    with pytest.raises(XferlearnError, match="--val-groups"):
        TrainConfig(data="d", val_groups="a")
    with pytest.raises(XferlearnError, match="--cv folds are grouped by patient"):  # folds would split the groups
        TrainConfig(data="d", group_by="x", cv=5)
    assert TrainConfig(data="d", group_by="x", cv=0).cv == 0  # --no-cv with groups: the group hold-out
