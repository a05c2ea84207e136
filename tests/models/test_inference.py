"""The fast inference path: same answers as fp32 eager, the caller's model left untouched."""

import pytest
import timm
import torch

from xferlearn.models.inference import COMPILE_MIN_IMAGES, FastForward, resolve_precision, should_compile


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=3).eval()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    return torch.randn(5, 3, 64, 64)


def test_fp32_matches_eager(model, batch):
    with torch.inference_mode():
        expected = model(batch)
    assert torch.allclose(FastForward(model, "fp32", "cpu")(batch), expected, atol=1e-4)


def test_bf16_is_close_and_leaves_the_callers_model_fp32(model, batch):
    with torch.inference_mode():
        expected = model(batch)
    fast = FastForward(model, "bf16", "cpu")
    out = fast(batch)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.1 * expected.abs().max()
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.8
    assert next(model.parameters()).dtype == torch.float32  # Grad-CAM and export still see fp32


def test_compiled_pads_short_batches_to_one_shape(model, batch):
    with torch.inference_mode():
        expected = model(batch)
    fast = FastForward(model, "fp32", "cpu", compile="on", batch_size=8)
    assert fast.compiled
    assert torch.allclose(fast(batch), expected, atol=1e-3)          # 5 rows padded to 8, 5 returned
    assert torch.allclose(fast(batch[:2]), expected[:2], atol=1e-3)  # the same compiled shape again


def test_compile_auto_waits_for_enough_images(monkeypatch):
    monkeypatch.delenv("XFERLEARN_COMPILE", raising=False)
    assert not should_compile("auto", 10) and should_compile("auto", COMPILE_MIN_IMAGES)
    assert not should_compile("auto", None) and should_compile("on", 1) and not should_compile("off", 10**6)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # only compared, never used: no GPU needed
    assert not should_compile("auto", 10**6, gpu) and should_compile("auto", 10**6, cpu) and should_compile("on", 1, gpu)
    monkeypatch.setenv("XFERLEARN_COMPILE", "off")
    assert not should_compile("auto", 10**6)
    with pytest.raises(ValueError):
        should_compile("sometimes", 1)


def test_precision_auto_follows_the_cpu(monkeypatch):
    import xferlearn.models.inference as inference

    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(inference, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
