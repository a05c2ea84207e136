"""The staged fine-tune, test-time augmentation and the prevalence correction, on tiny models."""

import json
import warnings

import lightning as L
import numpy as np
import pytest
import timm
import torch
from conftest import TINY, make_folder

import xferlearn
from xferlearn.training import finetune as ft
from xferlearn.models.backbones import Preprocessing
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.cli import main
from xferlearn.config import TrainConfig
from xferlearn.errors import XferlearnError
from xferlearn.models.predictor import prior_shift_threshold
from xferlearn.evaluation.metrics import auc_standard_error, compute_metrics

FINETUNE = {**TINY, "recipe": "finetune", "stages": "2,all", "finetune_epochs": 2, "finetune_batch_size": 8,
            "lr_backbone": 1e-3}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One small staged fine-tune of EfficientNet-Lite0 (packaged ImageNet weights, offline) at
    64 px, with the threshold chosen under TTA (the recipe's default): pretrained features respond
    smoothly to the mild TTA views, as a trained model's do (a random network's need not)."""
    base = tmp_path_factory.mktemp("finetuned")
    data = make_folder(base / "data", per_class=16)
    result = xferlearn.train(data=str(data), out=str(base / "run"), cache_dir=str(base / "cache"),
                             **{**FINETUNE, "backbone": "efficientnet_lite0", "weights": "default"})
    return result


def stage_weights(run, name):
    return torch.load(run / "stages" / f"{name}.pt", weights_only=True)["state_dict"]


def test_finetune_learns_and_records_its_stages(finetuned):
    metrics = finetuned.metrics
    assert metrics["auc"] >= 0.9  # the synthetic task is easy; chance is 0.5
    stages = metrics["selection"]["stages"]
    assert [s["stage"] for s in stages] == ["head", "stage1", "stage2"]
    assert all(s["val_auc"] is not None and s["val_auc"] >= 0.9 for s in stages)  # each stage kept learning
    chosen = metrics["selection"]["chosen_stage"]
    counts = list(metrics["n_per_class"].values())  # the validation split's classes
    assert chosen == stages[ft.choose_stage(stages, counts)]["stage"]  # the rule below, on this run's records
    ckpt = load_checkpoint(finetuned.run_dir)
    assert ckpt.config["recipe"] == "finetune" and ckpt.config["augment"] == "erase"  # grayscale images
    assert ckpt.tta and "test-time-augmentation" in ckpt.threshold_source
    assert "without_tta" in metrics and 0 <= metrics["without_tta"]["auc"] <= 1
    history = (finetuned.run_dir / "logs" / "metrics.csv").read_text().splitlines()
    assert len({row.split(",")[0] for row in history[1:]}) > 1  # the stages' epochs, end to end


def test_stages_train_only_their_layers(finetuned):
    """Stage 1 (2 layer groups below the head) leaves the rest bit-identical; stage 2 moves the stem."""
    run = finetuned.run_dir
    head, first, second = (stage_weights(run, n) for n in ("head", "stage1", "stage2"))
    model = timm.create_model(load_checkpoint(run).arch, num_classes=2)
    ids = ft.layer_ids(model)
    top = max(ids.values())
    changed = {name for name, _ in model.named_parameters() if not torch.equal(head[name], first[name])}
    assert changed and all(ids[name] >= top - 2 for name in changed)
    assert "conv_head.weight" in changed and "blocks.5.3.conv_pw.weight" in changed
    assert "blocks.5.2.conv_pw.weight" not in changed and "conv_stem.weight" not in changed
    assert not torch.equal(first["conv_stem.weight"], second["conv_stem.weight"])


def test_frozen_batchnorm_keeps_its_statistics(finetuned):
    head, second = stage_weights(finetuned.run_dir, "head"), stage_weights(finetuned.run_dir, "stage2")
    stats = [k for k in head if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(head[k], second[k]) for k in stats)
    assert not torch.equal(head["bn1.weight"], second["bn1.weight"])  # the stem's scale still trains


@pytest.mark.parametrize("update_bn", [False, True])
def test_bn_policy_in_train_mode(update_bn):
    """What Lightning's model.train() leaves in training mode: trained layers only, BatchNorm by policy."""
    model = timm.create_model("resnet18", num_classes=2)
    ft.unfreeze(model, 2)
    module = ft.FinetuneModule(model, ["NORMAL", "PNEUMONIA"], Preprocessing(64, (0.5,) * 3, (0.5,) * 3, "bilinear"),
                               TrainConfig(data="x", recipe="finetune"), update_bn=update_bn)
    module.train()
    assert not model.bn1.training and not model.layer1[0].training  # frozen layers compute as in the head stage
    assert model.layer4[1].conv2.training
    assert model.layer4[1].bn2.training == update_bn
    before = model.layer4[1].bn2.running_mean.clone(), model.bn1.running_mean.clone()
    module(torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8))
    assert torch.equal(before[1], model.bn1.running_mean)
    assert torch.equal(before[0], model.layer4[1].bn2.running_mean) != update_bn


@pytest.mark.parametrize("update_bn", [False, True])
def test_bn_policy_through_lightning(update_bn, tmp_path):
    """A stage run by Lightning, starting from eval mode as the head stage leaves the network:
    BatchNorm statistics move only where the policy lets them, never in frozen layers."""
    model = timm.create_model("resnet18", num_classes=2).eval()
    ft.unfreeze(model, 2)
    config = TrainConfig(data="x", recipe="finetune", finetune_epochs=1)
    module = ft.FinetuneModule(model, ["NORMAL", "PNEUMONIA"], Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear"),
                               config, update_bn=update_bn)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
    images = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(16) % 2), batch_size=8)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    after = model.state_dict()
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # a frozen layer
    assert torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"]) != update_bn


@pytest.mark.parametrize("engine", ["onnx", "torch"])
def test_each_epochs_validation_scores_the_current_weights_on_the_cpu_engine(engine, tmp_path):
    """The fine-tune validates every epoch through ONNX Runtime on a CPU (`--feature-engine auto`):
    the same AUC as PyTorch's, from that epoch's weights (a fresh export each epoch)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2).eval()
    ft.unfreeze(model, 2)
    config = TrainConfig(data="x", recipe="finetune", finetune_epochs=2, feature_engine=engine)
    module = ft.FinetuneModule(model, ["NORMAL", "PNEUMONIA"], Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear"),
                               config, update_bn=False)
    seen = []
    import xferlearn.models.frozen_prefix as frozen_prefix
    import xferlearn.models.onnx_forward as onnx_forward

    original = onnx_forward.OnnxForward

    def recording(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    images = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.arange(16) % 2), batch_size=8)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_forward, "OnnxForward", recording)
        patch.setattr(frozen_prefix, "OnnxForward", recording)
        trainer.fit(module, data, data)
    # One export of the epoch's weights per epoch on ONNX Runtime, none on PyTorch; none of the
    # frozen layers: --frozen-engine torch is the default.
    assert len(seen) == (2 if engine == "onnx" else 0)
    module.eval()
    with torch.no_grad():
        expected = module(images).softmax(1)[:, 1]
    auc = compute_metrics(np.arange(16) % 2, torch.stack([1 - expected, expected], 1).numpy(),
                          ["NORMAL", "PNEUMONIA"], 0.5, "test")["auc"]
    assert trainer.callback_metrics["val_auc"].item() == pytest.approx(auc, abs=1e-6)  # the last epoch's weights


def test_a_finetune_with_its_frozen_layers_on_onnx_runtime_trains_only_the_layers_above(tmp_path, capsys):
    """`--frozen-engine onnx` end to end through Lightning: it says so, the frozen layers keep the
    head stage's weights and the layers above them learn."""
    data = make_folder(tmp_path / "data", per_class=8)
    xferlearn.train(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                    **{**FINETUNE, "stages": "2", "finetune_epochs": 1, "frozen_engine": "onnx"})
    said = capsys.readouterr()
    assert "run on ONNX Runtime" in " ".join((said.out + said.err).split())  # rich wraps lines
    head, stage1 = stage_weights(tmp_path / "run", "head"), stage_weights(tmp_path / "run", "stage1")
    changed = {name for name in head if not torch.equal(head[name], stage1[name])}
    # Only the two layer groups above the split and the classifier moved (timm's ResNet starts each
    # block's last BatchNorm at zero, so its convolutions get no gradient on the first steps).
    assert "layer4.1.bn2.weight" in changed and "fc.weight" in changed
    assert all(name.startswith(("layer4.", "fc.")) for name in changed)


@pytest.mark.parametrize("feature_engine,frozen_engine,split", [("auto", "onnx", True), ("torch", "onnx", False),
                                                               ("auto", "torch", False)])
def test_training_steps_run_the_frozen_layers_on_the_cpu_engine(feature_engine, frozen_engine, split):
    """With --frozen-engine onnx, on a CPU a stage's frozen lower layers run through ONNX Runtime
    while it trains (models/frozen_prefix.py): the same logits as the whole network in PyTorch."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=2)
    ft.unfreeze(model, 2)
    config = TrainConfig(data="x", recipe="finetune", feature_engine=feature_engine, frozen_engine=frozen_engine,
                         finetune_batch_size=4)
    module = ft.FinetuneModule(model, ["NORMAL", "PNEUMONIA"], Preprocessing(32, (0.5,) * 3, (0.5,) * 3, "bilinear"),
                               config, update_bn=False)
    module.on_train_epoch_start()
    assert (module._frozen is not None) == split
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    logits = module(images)
    assert logits.requires_grad  # the layers above the split still train
    expected = module.net(((images.float() - 127.5) / 127.5).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    module.on_train_end()
    assert module._frozen is None


def test_unfreeze_grows_with_depth():
    model = timm.create_model("resnet18", num_classes=2)
    two = set(ft.unfreeze(model, 2))
    four = set(ft.unfreeze(model, 4))
    everything = set(ft.unfreeze(model, None))
    assert {"fc.weight", "layer4.1.conv1.weight"} <= two < four < everything
    assert "conv1.weight" not in four and everything == {n for n, _ in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())


def test_layer_wise_rates_fall_towards_the_input():
    model = timm.create_model("resnet18", num_classes=2)
    ft.unfreeze(model, None)
    config = TrainConfig(data="x", recipe="finetune", lr_backbone=1e-3, layer_decay=0.5)
    rate = {id(p): group["lr"] for group in ft.optimizer_groups(model, config) for p in group["params"]}
    by_name = {name: rate[id(p)] for name, p in model.named_parameters()}
    assert by_name["fc.weight"] == pytest.approx(1e-3)
    assert by_name["layer4.1.conv2.weight"] == pytest.approx(5e-4)
    ids = ft.layer_ids(model)
    ordered = [by_name[n] for n in sorted(by_name, key=ids.get)]
    assert ordered == sorted(ordered) and by_name["conv1.weight"] < by_name["layer1.0.conv1.weight"]
    decays = {group["weight_decay"] for group in ft.optimizer_groups(model, config) if group["params"][0].ndim == 1}
    assert decays == {0.0}  # no weight decay on norms and biases


class Interrupt(L.Callback):
    """Kills the run at the first batch of stage 1's second epoch (after its first last.ckpt)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


class FirstEpoch(L.Callback):
    seen: list = []

    def on_train_epoch_start(self, trainer, pl_module):
        FirstEpoch.seen.append(trainer.current_epoch)


def test_resume_continues_an_interrupted_finetune(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=14)
    options = dict(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                   **{**FINETUNE, "stages": "2", "finetune_epochs": 3, "patience": 5})
    original = ft.stage_callbacks
    monkeypatch.setattr(ft, "stage_callbacks", lambda config: original(config) + [Interrupt()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        xferlearn.train(**options)
    run = tmp_path / "run"
    assert (run / "stages" / "head.pt").exists() and (run / "lightning" / "stage1" / "last.ckpt").exists()
    assert not (run / "model.pt").exists()

    def no_head(*args, **kwargs):
        raise AssertionError("the head stage was trained again")

    monkeypatch.setattr(ft, "fit_head", no_head)
    monkeypatch.setattr(ft, "stage_callbacks", lambda config: original(config) + [FirstEpoch()])
    FirstEpoch.seen = []
    result = xferlearn.train(**options, resume=True)
    assert FirstEpoch.seen and FirstEpoch.seen[0] == 1  # continued from epoch 1, not from scratch
    assert result.checkpoint.exists()
    epochs = [line.split(",")[0] for line in (run / "logs" / "stage1" / "metrics.csv").read_text().splitlines()[1:]]
    assert "0" in epochs and "2" in epochs  # the interrupted epoch 0 is kept in the history


def test_tta_changes_probabilities_slightly(finetuned):
    """On a model trained with the xray augmentation (mild zooms and shifts, like the TTA views)."""
    augmented = xferlearn.load(finetuned.run_dir)
    assert augmented.tta  # its threshold was chosen with TTA
    with pytest.warns(UserWarning, match="with test-time augmentation; predicting without"):
        plain = xferlearn.load(finetuned.run_dir, tta=False)
    paths = sorted(str(p) for p in (finetuned.run_dir.parent / "data").rglob("*.jpeg"))
    images = torch.from_numpy(np.stack([plain.decode(p) for p in paths])).permute(0, 3, 1, 2)
    views = augmented.view_logits(images)
    assert views.shape == (5, len(paths), 2)
    assert torch.allclose(views[0], plain.logits(images), atol=1e-4)  # the first view is the clean image
    p0, p1 = plain.probabilities(images), augmented.probabilities(images)
    assert p1.shape == p0.shape and np.allclose(p1.sum(1), 1, atol=1e-5)
    assert np.allclose(p1, (views / augmented.temperature).softmax(-1).mean(0).numpy(), atol=1e-6)
    change = np.abs(p1 - p0)[:, 1]
    # A different, mostly nearby, probability (the synthetic images, contrast-equalised, are noisy
    # enough that a 6% zoom moves the tiny model's median probability by about 0.1).
    assert change.max() > 0 and np.median(change) < 0.15
    assert (plain.decide(p0) == augmented.decide(p1)).mean() >= 0.8


def test_tta_follows_the_checkpoint(finetuned):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mismatch warning: TTA is on because the threshold used it
        model = xferlearn.load(finetuned.run_dir)
    assert model.tta


def test_prevalence_shifts_probabilities_and_keeps_decisions(tiny_run, tiny_data):
    as_trained = xferlearn.load(tiny_run)
    assert load_checkpoint(tiny_run).class_prior == [0.5, 0.5]  # class-weighted loss: as if balanced
    paths = sorted(str(p) for p in tiny_data.rglob("*.jpeg"))
    images = torch.from_numpy(np.stack([as_trained.decode(p) for p in paths])).permute(0, 3, 1, 2)
    p = as_trained.probabilities(images)[:, 1]
    for prevalence, direction in ((0.2, -1), (0.9, 1)):
        shifted = xferlearn.load(tiny_run, prevalence=prevalence)
        q = shifted.probabilities(images)
        inside = (p > 1e-4) & (p < 1 - 1e-4)  # saturated probabilities cannot move visibly
        assert np.all(np.sign(q[inside, 1] - p[inside]) == direction)
        assert np.sign(shifted.threshold - as_trained.threshold) == direction
        assert np.array_equal(shifted.decide(q), as_trained.decide(as_trained.probabilities(images)))


def test_prior_shift_threshold_round_trip():
    t = prior_shift_threshold(0.7, 1, [0.26, 0.74], [0.38, 0.62])
    assert t < 0.7
    assert prior_shift_threshold(t, 1, [0.38, 0.62], [0.26, 0.74]) == pytest.approx(0.7)
    assert prior_shift_threshold(0.3, 0, [0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.3)


def test_prevalence_errors(tiny_run):
    with pytest.raises(XferlearnError, match="strictly between 0 and 1"):
        xferlearn.load(tiny_run, prevalence=1.5)


def test_evaluate_reports_tta_and_prevalence(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "eval"
    with pytest.warns(UserWarning):
        code = main(["evaluate", str(tiny_run), str(tiny_data), "--out", str(out), "--bootstrap", "50",
                     "--no-gallery", "--tta", "--prevalence", "0.62"])
    assert code == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["tta"] is True and saved["prevalence"] == 0.62
    assert saved["threshold"] != load_checkpoint(tiny_run).threshold
    report = (out / "report.md").read_text()
    assert "Test-time augmentation: on" in report and "Saerens" in report and "0.620" in report


def test_predict_cli_applies_prevalence(tiny_run, tiny_data, capsys):
    assert main(["predict", str(tiny_run), str(tiny_data / "NORMAL"), "--prevalence", "0.3"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    expected = xferlearn.load(tiny_run, prevalence=0.3).threshold
    assert rows and all(float(r.split(",")[-2]) == pytest.approx(expected, abs=1e-6) for r in rows)


@pytest.mark.parametrize("options, message", [
    ({"stages": "0"}, "--stages"), ({"stages": "9,4"}, "more layers"), ({"stages": "2,x"}, "--stages"),
    ({"finetune_epochs": 0}, "--finetune-epochs"), ({"layer_decay": 0}, "--layer-decay"),
    ({"layer_decay": 1.5}, "--layer-decay"), ({"bn_policy": "train"}, "--bn-policy"), ({"ema": 1.0}, "--ema"),
    ({"patience": 0}, "--patience"), ({"lr_backbone": 0}, "--lr-backbone"),
    ({"frozen_engine": "gpu"}, "--frozen-engine"),
    ({"finetune_batch_size": 1}, "--finetune-batch-size"),
])
def test_config_rejects_bad_finetune_options(options, message):
    with pytest.raises(XferlearnError, match=message):
        TrainConfig(data="x", recipe="finetune", **options)


def test_the_deepest_stage_is_kept_unless_an_earlier_one_is_better_beyond_noise():
    records = lambda *aucs: [{"val_auc": auc} for auc in aucs]
    # Saturated: a shallower stage ahead by 0.0004 on 268 + 770 images is noise (SE about 0.002).
    assert ft.choose_stage(records(0.9943, 0.9977, 0.9973), [268, 770]) == 2
    assert ft.choose_stage(records(0.90, 0.99, 0.95), [268, 770]) == 1  # a real drop: the earlier stage
    assert ft.choose_stage(records(0.95, None), [10, 10]) == 0  # a stage without a score is never kept
    assert auc_standard_error(0.9977, 268, 770) == pytest.approx(0.0021, abs=1e-4)
    assert auc_standard_error(0.9, 100, 100) > auc_standard_error(0.9, 1000, 1000)


def test_recipe_picks_its_augmentation_and_tta_and_cli_reports_bad_stages(tmp_path, capsys):
    gray, colour = TrainConfig(data="x"), TrainConfig(data="x")
    assert gray.augment is None and gray.views is None  # the linear recipe's wait for the images
    assert gray.resolve_augmentation(grayscale=True) and (gray.views, gray.augment) == (0.25, "noise")
    assert not colour.resolve_augmentation(grayscale=False) and (colour.views, colour.augment) == (0, "article")
    mine = TrainConfig(data="x", views=0)
    assert not mine.resolve_augmentation(grayscale=True) and (mine.views, mine.augment) == (0, "noise")
    assert TrainConfig(data="x", recipe="finetune").views == 0
    assert TrainConfig(data="x").tta is False and TrainConfig(data="x", recipe="finetune").tta is True
    assert TrainConfig(data="x", recipe="finetune", tta=False).tta is False
    finetune = [TrainConfig(data="x", recipe="finetune") for _ in range(2)]
    assert finetune[0].augment is None  # waits for the images too
    assert finetune[0].resolve_augmentation(grayscale=True) and finetune[0].augment == "erase"
    assert not finetune[1].resolve_augmentation(grayscale=False) and finetune[1].augment == "xray"
    assert TrainConfig(data="x", recipe="finetune", augment="none").augment == "none"
    assert TrainConfig(data="x", stages="4, 9, all").stage_depths() == [4, 9, None]
    assert main(["train", str(tmp_path), "--recipe", "finetune", "--stages", "9,4"]) == 2
    assert "more layers" in capsys.readouterr().err


def test_a_batch_larger_than_the_training_images_is_cut_to_them(tmp_path, capsys):
    """16 training images and --finetune-batch-size 64: one batch of 16 a step, not a one-cycle of
    zero steps (OneCycleLR's ValueError). Resumed with more epochs, the finished stage says it is kept."""
    data = make_folder(tmp_path / "d", per_class=10)
    options = dict(data=str(data), out=str(tmp_path / "r"), **{**FINETUNE, "stages": "1", "finetune_batch_size": 64})
    options.pop("finetune_epochs")
    result = xferlearn.train(**options, finetune_epochs=1)
    stage = [s for s in result.metrics["selection"]["stages"] if s["stage"] == "stage1"]
    assert stage and stage[0]["epochs"] == 1
    capsys.readouterr()
    xferlearn.train(**options, finetune_epochs=2, resume=True)
    said = " ".join(capsys.readouterr().err.split())
    assert "stage stage1 was done" in said and "ran 1 epochs and is kept as it is: --finetune-epochs 2" in said
