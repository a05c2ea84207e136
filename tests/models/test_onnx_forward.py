"""Frozen features on ONNX Runtime: PyTorch's answers, at any batch length, and PyTorch
wherever ONNX Runtime cannot be trusted with the network."""

import numpy as np
import pytest
import timm
import torch

from xferlearn.data.images import Preprocessing
from xferlearn.models.features import FeatureExtractor, PooledFeatures, feature_key
from xferlearn.models.onnx_forward import OnnxForward, OnnxUnavailable, feature_engine

PRE = Preprocessing(input_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=3).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def torch_features(model, pixels):
    return FeatureExtractor(model, PRE, "fp32", "cpu", engine="torch")(pixels)


def test_onnx_features_match_pytorch_at_any_batch_length(model, pixels):
    extractor = FeatureExtractor(model, PRE, "fp32", "cpu", engine="onnx", threads=1, batch_size=4)
    assert extractor.engine == "onnx" and isinstance(extractor.forward, OnnxForward)
    expected = torch_features(model, pixels)
    for n in (1, 4, 7):  # shorter than, equal to and longer than the fixed batch
        got = extractor(pixels[:n])
        assert got.shape == expected[:n].shape
        np.testing.assert_allclose(got, expected[:n], atol=1e-4 * np.abs(expected).max())
    assert model.training is False and next(model.parameters()).dtype is torch.float32  # the caller's model as it was


def test_an_export_inside_bf16_autocast_is_still_an_fp32_graph(model, pixels):
    # A fine-tune's validation exports each epoch's weights from inside Lightning's bf16-mixed
    # context (on CPUs with native bf16); traced under autocast, ONNX Runtime refused the graph.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        forward = OnnxForward(model, PRE.mean, PRE.std, PRE.input_size, threads=1, batch_size=4)
        got = forward(pixels)
    mean, std = torch.tensor(PRE.mean).view(1, 3, 1, 1), torch.tensor(PRE.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((pixels.float() / 255 - mean) / std).numpy()
    assert got.dtype is torch.float32
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())


def test_a_network_onnx_cannot_take_falls_back_to_pytorch(model, pixels, monkeypatch, caplog):
    import xferlearn.models.onnx_forward as onnx_forward

    def refuse(*args, **kwargs):
        raise OnnxUnavailable("the ONNX export failed: unsupported operator")

    monkeypatch.setattr(onnx_forward, "OnnxForward", refuse)
    extractor = FeatureExtractor(model, PRE, "fp32", "cpu", engine="onnx")
    assert extractor.engine == "torch" and "unsupported operator" in caplog.text
    np.testing.assert_array_equal(extractor(pixels), torch_features(model, pixels))


def test_a_disagreeing_export_is_refused(model, monkeypatch):
    import onnxruntime

    class Wrong:  # a runtime whose answers are off by far more than fp32 rounding
        def __init__(self, *args, **kwargs):
            pass

        def get_inputs(self):
            return []

        def run(self, names, feeds):
            return [np.ones((len(next(iter(feeds.values()))), 512), np.float32) * 1e3]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Wrong)
    with pytest.raises(OnnxUnavailable, match="disagreed with PyTorch"):
        OnnxForward(PooledFeatures(model), PRE.mean, PRE.std, 64, threads=1)


def test_auto_is_onnx_runtime_on_a_cpu_unless_bf16_is_asked_for():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert feature_engine("auto", cpu, "auto") == "onnx"
    assert feature_engine("auto", cpu, "fp32") == "onnx"
    assert feature_engine("auto", cpu, "bf16") == "torch"
    assert feature_engine("auto", gpu, "fp32") == "torch"
    assert feature_engine("torch", cpu, "fp32") == "torch"


def test_auto_gives_networks_of_dense_convolutions_to_pytorchs_bf16_where_the_cpu_computes_it(model, monkeypatch):
    from xferlearn.models import onnx_forward

    separable = torch.nn.Sequential(  # an inverted residual: 1x1 up, 3x3 depthwise, 1x1 down
        torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 48, 1), torch.nn.Conv2d(48, 48, 3, padding=1, groups=48),
        torch.nn.BatchNorm2d(48), torch.nn.Conv2d(48, 8, 1)).train()
    # per pixel: 3x8 + 8x48 + 48x9 + 48x8 multiply-adds, the depthwise 48x9 of them
    assert onnx_forward.depthwise_share(separable, 16) == pytest.approx(432 / 1224)
    assert separable.training and separable[3].num_batches_tracked == 0  # counted without training it
    assert onnx_forward.depthwise_share(model, 64) == 0  # resnet18: dense convolutions only
    cpu = torch.device("cpu")
    for native, dense_engine in ((True, "torch"), (False, "onnx")):
        monkeypatch.setattr(onnx_forward, "cpu_supports_bf16", lambda: native)
        assert feature_engine("auto", cpu, "auto", model, 64) == dense_engine
        assert feature_engine("auto", cpu, "auto", separable, 16) == "onnx"
        assert feature_engine("auto", cpu, "fp32", model, 64) == "onnx"  # fp32 asked for: ONNX Runtime computes it


def test_each_engine_keeps_its_own_features_and_pytorchs_key_is_unchanged():
    torch_key = feature_key("resnet18", "none", PRE, "fp32")
    assert feature_key("resnet18", "none", PRE, "fp32", "torch") == torch_key
    assert feature_key("resnet18", "none", PRE, "fp32", "onnx") != torch_key


def test_a_predictor_on_onnx_runtime_gives_pytorchs_probabilities(tiny_run, pixels):
    """The fine-tune scores its validation views this way: the same TTA probabilities, faster."""
    from xferlearn.models.checkpoint import load_checkpoint
    from xferlearn.models.predictor import Predictor

    checkpoint = load_checkpoint(tiny_run)
    size = checkpoint.preprocessing.input_size
    batch = torch.nn.functional.interpolate(pixels.float(), size=(size, size)).round().to(torch.uint8)
    with pytest.warns(UserWarning, match="moves the operating point"):  # the tiny run was trained without TTA
        onnx = Predictor(checkpoint, engine="onnx", tta=True)
        torch_ = Predictor(checkpoint, engine="torch", tta=True)
    assert isinstance(onnx.fast, OnnxForward)
    np.testing.assert_allclose(onnx.view_logits(batch).numpy(), torch_.view_logits(batch).numpy(), atol=1e-4)
    np.testing.assert_allclose(onnx.probabilities(batch), torch_.probabilities(batch), atol=1e-5)
