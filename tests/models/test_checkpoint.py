"""The checkpoint's typed fields: operating point, preprocessing, and format-1 files."""

from __future__ import annotations

import pytest
import torch

from xferlearn.data.images import Preprocessing
from xferlearn.errors import XferlearnError
from xferlearn.models.checkpoint import Checkpoint, OperatingPoint, load_checkpoint, save_checkpoint

PRE = Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear")


def make(point: OperatingPoint) -> Checkpoint:
    return Checkpoint(arch="resnet18", backbone="resnet18", weights="none", preprocessing=PRE, classes=["a", "b"],
                      positive_index=1, operating_point=point, state_dict={"w": torch.zeros(2)})


def test_operating_point_is_stored_as_fields_and_rendered_only_as_text(tmp_path):
    point = OperatingPoint("target_sensitivity", 0.31, data="validation split", n=120, target=0.97, tta_views=5)
    save_checkpoint(make(point), tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path)
    assert loaded.operating_point == point and loaded.threshold == 0.31
    assert isinstance(loaded.preprocessing, Preprocessing) and loaded.preprocessing == PRE
    text = loaded.threshold_source
    assert "sensitivity >= 0.97" in text and "120 images" in text and "5 test-time-augmentation views" in text
    assert OperatingPoint("argmax").describe() == "argmax (multi-class)"


def test_format_one_checkpoint_keeps_its_threshold_and_source(tmp_path):
    record = make(OperatingPoint("youden", 0.4)).record() | {"format": "xferlearn-checkpoint", "format_version": 1}
    del record["operating_point"]
    record["threshold"], record["threshold_source"] = 0.42, "Youden's J on the validation split (10 images)"
    torch.save(record, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path)
    assert loaded.threshold == 0.42 and loaded.threshold_source == "Youden's J on the validation split (10 images)"


@pytest.mark.parametrize("field, value, message", [
    ("classes", ["only"], "classes"),
    ("preprocessing", PRE.to_dict() | {"input_size": 60000}, "input size"),
    ("operating_point", {"method": "youden", "value": 7.0}, "threshold"),
    ("temperature", -1.0, "temperature"),
])
def test_damaged_fields_are_one_line_errors(tmp_path, field, value, message):
    record = make(OperatingPoint("youden", 0.4)).record() | {"format": "xferlearn-checkpoint", "format_version": 2}
    record[field] = value
    torch.save(record, tmp_path / "model.pt")
    with pytest.raises(XferlearnError, match=message):
        load_checkpoint(tmp_path)
