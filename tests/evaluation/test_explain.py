"""Grad-CAM explanations: the layer per backbone family, the heatmap, the PNGs, the CLI and the
evaluation report's error gallery."""

import io
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import xferlearn
from xferlearn.cli import main
from xferlearn.errors import XferlearnError
from xferlearn.evaluation.explain import error_gallery, explain, explain_files, explanation_png, target_layer

SIZE = 128


def blob_image(index: int, with_blob: bool) -> tuple[Image.Image, np.ndarray]:
    """Noise, plus a bright disc for the positive class; returns the image and the disc's mask."""
    rng = np.random.default_rng(7000 + index + (500 if with_blob else 0))
    image = rng.normal(90, 20, (SIZE, SIZE)).clip(0, 255)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(SIZE // 6, SIZE - SIZE // 6, 2)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (SIZE // 8) ** 2
    if with_blob:
        image[mask] = 240
    return Image.fromarray(image.astype(np.uint8)), mask


@pytest.fixture(scope="module")
def blob_run(tmp_path_factory):
    """A resnet18 (random frozen features, trained head) that tells discs from plain noise."""
    base = tmp_path_factory.mktemp("blobs")
    masks = {}
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        (base / "data" / name).mkdir(parents=True)
        for i in range(16):
            image, mask = blob_image(i, bool(label))
            path = base / "data" / name / f"{name.lower()}_{i}.png"
            image.save(path)
            masks[path] = mask
    result = xferlearn.train(data=str(base / "data"), out=str(base / "run"), cache_dir=str(base / "cache"),
                             backbone="resnet18", weights="none", image_size=SIZE, epochs=30, views=0, lr=0.01)
    return result.run_dir, masks


def _tiny_vgg():
    from timm.models.vgg import VGG
    return VGG([8, "M", 16, "M", 16, "M", 32, "M", 32, "M"], num_classes=2)


@pytest.mark.parametrize("build, size, expected", [
    (lambda: timm.create_model("efficientnet_lite0", num_classes=2), 64, "bn2"),
    (lambda: timm.create_model("mobilenetv2_050", num_classes=2), 64, "bn2"),
    (lambda: timm.create_model("mobilenetv3_small_050", num_classes=2), 64, "blocks.5"),
    (lambda: timm.create_model("resnet18", num_classes=2), 64, "layer4.1"),
    (lambda: timm.create_model("resnetv2_18", num_classes=2), 64, "norm"),
    (_tiny_vgg, 64, "features.13"),
    (lambda: timm.create_model("inception_v3", num_classes=2), 160, "Mixed_7c"),
    (lambda: timm.create_model("legacy_xception", num_classes=2), 96, "act4"),
    (lambda: timm.create_model("convnext_atto", num_classes=2), 64, "stages.3"),  # timm's feature_info
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 8, 3),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2)), 32, "2"),
])
def test_target_layer_is_the_last_spatial_feature_map(build, size, expected):
    model = build().eval()
    name, layer = target_layer(model)
    assert name == expected
    shapes = []
    layer.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    assert len(shapes[-1]) == 4 and shapes[-1][-1] >= 2  # a feature map with space in it, not pooled


def test_heatmap_is_high_on_the_disc_that_makes_the_call(blob_run):
    run, masks = blob_run
    predictor = xferlearn.load(run)
    margins = []
    for path, mask in masks.items():
        if path.parent.name != "PNEUMONIA":
            continue
        result = explain(predictor, path)
        assert result.cam.shape == (SIZE, SIZE) and result.cam.dtype == np.float32
        assert 0.0 <= result.cam.min() and result.cam.max() <= 1.0
        if result.class_name == "PNEUMONIA":
            margins.append(result.cam[mask].mean() - result.cam[~mask].mean())
    assert len(margins) >= 12, "the model should call most discs PNEUMONIA"
    assert np.mean(np.array(margins) > 0) >= 0.8 and np.mean(margins) > 0.1, margins


def test_explanation_matches_prediction_and_takes_every_input_kind(blob_run):
    run, masks = blob_run
    predictor = xferlearn.load(run)
    path = next(p for p in masks if p.parent.name == "PNEUMONIA")
    result = explain(predictor, path)
    row = predictor.predict(str(path))
    assert result.class_name == row["class"] and result.class_name == predictor.classes[result.class_index]
    assert result.probabilities.tolist() == pytest.approx(list(row["probabilities"].values()), abs=1e-6)
    assert result.probability == pytest.approx(row["probabilities"][row["class"]], abs=1e-6)
    assert result.overlay.shape == (SIZE, SIZE, 3) and result.overlay.dtype == np.uint8
    assert np.abs(result.overlay.astype(int) - result.image.astype(int)).mean() > 10  # the heatmap shows
    decoded = predictor.decode(path)
    for item in (path.read_bytes(), decoded):  # what the server passes: bytes or a decoded array
        png = explanation_png(predictor, item)
        assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size[0] > SIZE
        assert np.allclose(explain(predictor, item).cam, result.cam, atol=1e-4)


def test_explain_leaves_the_model_as_it_was(blob_run):
    run, masks = blob_run
    predictor = xferlearn.load(run)
    path = next(iter(masks))
    before = predictor.predict(str(path))
    with torch.inference_mode():  # a caller in inference mode (a server) still gets its heatmap
        explain(predictor, path)
    assert all(p.requires_grad and p.grad is None for p in predictor.model.parameters())
    assert not any(m._forward_hooks for m in predictor.model.modules())  # Grad-CAM's hooks are gone
    after = predictor.predict(str(path))
    assert after["class"] == before["class"]
    assert after["probabilities"] == pytest.approx(before["probabilities"], abs=1e-6)


def test_explain_files_writes_a_png_per_image_and_skips_unreadable(blob_run, tmp_path):
    run, masks = blob_run
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    source = next(iter(masks))
    shutil.copy(source, inputs / "a" / "x.png")
    shutil.copy(source, inputs / "b" / "x.png")  # same name in two folders: both kept
    (inputs / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    skipped = []
    written = explain_files(run, [inputs, tmp_path / "missing.jpeg"], tmp_path / "out",
                            on_skip=lambda path, reason: skipped.append((path.name, reason)))
    assert [p.name for p in written] == ["x.gradcam.png", "x-2.gradcam.png"]
    assert all(Image.open(p).format == "PNG" for p in written)
    assert dict(skipped).keys() == {"broken.png", "missing.jpeg"}
    assert "corrupt" in dict(skipped)["broken.png"] and "cannot read" in dict(skipped)["missing.jpeg"]


def test_explain_cli_exit_codes(blob_run, tmp_path, capsys):
    run, masks = blob_run
    good = next(iter(masks))
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    assert main(["explain", str(run), str(good), "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / f"{good.stem}.gradcam.png").is_file()
    assert main(["explain", str(run), str(good), str(bad), "--out", str(tmp_path / "some")]) == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "bad.jpeg" in captured.err and "not an image" in captured.err
    assert (tmp_path / "some" / f"{good.stem}.gradcam.png").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["explain", str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert main(["explain", str(tmp_path / "no-run"), str(good)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("xferlearn: error:") for line in errors)


def test_evaluate_report_shows_the_most_confident_mistakes(blob_run, tmp_path, capsys):
    run, masks = blob_run
    data = tmp_path / "test"
    for name in ("NORMAL", "PNEUMONIA"):
        (data / name).mkdir(parents=True)
    discs = [p for p in masks if p.parent.name == "PNEUMONIA"]
    plain = [p for p in masks if p.parent.name == "NORMAL"]
    for p in discs[:6] + plain[6:8]:  # discs filed as NORMAL: false positives to show
        shutil.copy(p, data / "NORMAL" / f"{p.parent.name}-{p.name}")
    for p in plain[:6] + discs[6:8]:  # plain noise filed as PNEUMONIA: false negatives
        shutil.copy(p, data / "PNEUMONIA" / f"{p.parent.name}-{p.name}")
    assert main(["evaluate", str(run), str(data), "--out", str(tmp_path / "report"), "--bootstrap", "50"]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Error gallery" in report and "### False positives" in report and "### False negatives" in report
    links = [line.split("](")[1].rstrip(")") for line in report.splitlines() if "](gallery/" in line]
    assert 2 <= len(links) <= 8
    for link in links:
        assert Image.open(tmp_path / "report" / link).format == "PNG"
    fp_probs = [float(line.rsplit("= ", 1)[1]) for line in report.split("### False positives")[1]
                .split("### False negatives")[0].splitlines() if line[:2] in {f"{k}." for k in range(1, 5)}]
    assert fp_probs == sorted(fp_probs, reverse=True)  # most confident first

    assert main(["evaluate", str(run), str(data), "--out", str(tmp_path / "plain"), "--bootstrap", "50",
                 "--no-gallery"]) == 0
    assert "Error gallery" not in (tmp_path / "plain" / "report.md").read_text()
    assert not (tmp_path / "plain" / "gallery").exists()
    capsys.readouterr()


def test_multiclass_explanations_use_the_argmax_class(tmp_path):
    from conftest import make_folder

    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=12, patients=False)
    run = xferlearn.train(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                          backbone="resnet18", weights="none", image_size=64, epochs=2, views=0).run_dir
    predictor = xferlearn.load(run)
    result = explain(predictor, sorted((data / "c").iterdir())[0])
    assert result.class_index == int(result.probabilities.argmax()) and len(result.probabilities) == 3
    assert result.cam.shape == (64, 64) and result.overlay.shape == (64, 64, 3)
    assert error_gallery(predictor, [], np.zeros(0), np.zeros((0, 3)), tmp_path) is None


def test_gallery_is_for_two_classes_only(blob_run, tmp_path):
    run, _ = blob_run
    predictor = xferlearn.load(run)
    predictor.positive_index = None  # what a multi-class checkpoint holds
    assert error_gallery(predictor, [], np.zeros(0), np.zeros((0, 2)), tmp_path) is None


def test_explain_needs_the_pytorch_model(blob_run):
    from xferlearn.models.predictor import BasePredictor

    class OtherEngine(BasePredictor):
        def probabilities(self, batch):
            return np.full((len(batch), len(self.classes)), 1 / len(self.classes))

    run, masks = blob_run
    torch_predictor = xferlearn.load(run)
    other_engine = OtherEngine(torch_predictor.classes, torch_predictor.threshold, torch_predictor.positive_index,
                                 torch_predictor.temperature, torch_predictor.preprocessing)
    with pytest.raises(XferlearnError, match="PyTorch"):
        explain(other_engine, next(iter(masks)))
