"""Ensembles (`--backbone a+b`): one model whose logits are the mean of its members', each
member fed the ensemble's input resized and re-normalised for it, through every command."""

import csv

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, make_folder

import xferlearn
from xferlearn.errors import XferlearnError
from xferlearn.evaluation.explain import explain
from xferlearn.models.backbones import create_model, resolve
from xferlearn.models.checkpoint import load_checkpoint
from xferlearn.models.ensemble import Ensemble, assemble, classifiers
from xferlearn.models.predictor import load_predictor

# Members of different input sizes and normalisations (resnet18: 224 px, ImageNet mean and std;
# tf_efficientnet_lite1: 240 px, 0.5 and 0.5), so the in-graph resize and re-normalisation both act.
MEMBERS = "resnet18+tf_efficientnet_lite1"
ENSEMBLE = {**TINY, "backbone": MEMBERS, "image_size": None, "epochs": 1, "lr": 1e-3}


def test_logits_are_the_mean_of_the_members_on_their_own_inputs():
    torch.manual_seed(0)
    models = [timm.create_model("resnet10t", num_classes=3).eval(), timm.create_model("resnet18", num_classes=3).eval()]
    norms = [((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    ensemble = assemble(models, [32, 48], norms).eval()
    assert ensemble.input_size == 48
    raw = torch.rand(2, 3, 48, 48)
    mean_e, std_e = (torch.tensor(v).view(1, 3, 1, 1) for v in norms[1])

    def alone(model, size, mean, std):
        pixels = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False) if size != 48 else raw
        return model((pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))

    with torch.no_grad():
        expected = (alone(models[0], 32, *norms[0]) + alone(models[1], 48, *norms[1])) / 2
        got = ensemble((raw - mean_e) / std_e)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert classifiers(ensemble) == [m.get_classifier() for m in models]


def test_names_resolve_member_by_member_and_bad_ones_are_refused(tmp_path):
    assert resolve("efficientnet_lite0+efficientnet_lite1") == "tf_efficientnet_lite0+tf_efficientnet_lite1"
    for name, message in (("resnet18+resnet18", "names a member twice"), ("resnet18+", "empty member"),
                          ("resnet18+nosuchnet", "unknown backbone 'nosuchnet'")):
        with pytest.raises(XferlearnError, match=message):
            resolve(name)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("resnet18").state_dict(), weights)
    with pytest.raises(XferlearnError, match="a weights file .* fits one network"):
        create_model(MEMBERS, str(weights))
    model, preprocessing, tag = create_model(MEMBERS, "none", 2)
    assert isinstance(model, Ensemble) and preprocessing.input_size == 240 and tag == "none+none"
    assert [member.size for member in model.members] == [224, 240]


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ensemble")
    data = make_folder(base / "data", per_class=14)
    return xferlearn.train(data=str(data), out=str(base / "run"), **ENSEMBLE).run_dir, data


def test_validation_sees_what_prediction_computes(ensemble_run):
    """The heads were trained and the threshold chosen on features computed member by member;
    the saved network, run whole, must give those very probabilities."""
    run, _ = ensemble_run
    checkpoint = load_checkpoint(run)
    members = checkpoint.metrics["selection"]["members"]
    assert checkpoint.arch == MEMBERS and [m["kept"] for m in members] == ["the last epoch"] * 2
    with open(run / "validation_predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    recorded = np.array([float(row["p_PNEUMONIA"]) for row in rows])
    assert 0.01 < recorded.std()  # not saturated: the comparison below means something
    for engine in ("torch", "onnx"):
        # fp32 by name: on a CPU with native bf16, PyTorch's "auto" is bf16 (about 0.03 away here).
        predicted = np.array([row["probabilities"]["PNEUMONIA"] for row in xferlearn.predict(
            run, [row["file"] for row in rows], engine=engine, precision="fp32")])
        assert np.abs(predicted - recorded).max() < 2e-4, engine


def test_every_command_takes_an_ensemble(ensemble_run, tmp_path):
    run, data = ensemble_run
    predictor = load_predictor(run)
    explanation = explain(predictor, next((data / "PNEUMONIA").iterdir()))
    assert explanation.layer == "members.0.model.layer4.1, members.1.model.bn2"
    assert explanation.cam.shape == (240, 240) and explanation.cam.max() > 0
    metrics = xferlearn.evaluate(run, data, tmp_path / "eval", gallery=False)
    assert metrics["n"] == 28
    site = make_folder(tmp_path / "site", per_class=14)
    for path in sorted((site / "PNEUMONIA").iterdir())[:7]:
        path.unlink()  # a site with 2 NORMAL for each PNEUMONIA: --prior has something to fold in
    xferlearn.calibrate(run, site, tmp_path / "cal", prior=True, min_per_class=5)
    # Each member's bias moves by the same prior shift, so the mean of their logits moves by it.
    heads = classifiers(load_checkpoint(tmp_path / "cal").build_model())
    before = classifiers(load_checkpoint(run).build_model())
    shifts = [(after.bias - old.bias).detach() for after, old in zip(heads, before)]
    assert torch.allclose(shifts[0], shifts[1]) and shifts[0].abs().max() > 0


def test_an_ensemble_fine_tunes_member_by_member_and_resumes(tmp_path):
    data = make_folder(tmp_path / "d", per_class=12)
    options = {**ENSEMBLE, "recipe": "finetune", "stages": "2", "finetune_epochs": 1, "finetune_batch_size": 8,
               "tta": False, "cache_dir": str(tmp_path / "cache")}
    before = create_model(MEMBERS, "none", 2, None)[0].state_dict()
    result = xferlearn.train(data=str(data), out=str(tmp_path / "r"), **options)
    run = result.run_dir
    members = result.metrics["selection"]["members"]
    assert [m["chosen_stage"].split("-")[0] for m in members] == ["member0", "member1"]
    assert {p.name for p in (run / "stages").iterdir()} == {"member0-head.pt", "member0-stage1.pt",
                                                           "member1-head.pt", "member1-stage1.pt"}
    # Both members' networks moved (not only their heads), and the run predicts as one model.
    after = load_checkpoint(run).build_model().state_dict()
    for i in (0, 1):
        body = [k for k in before if k.startswith(f"members.{i}.model.") and "fc" not in k and "classifier" not in k
                and before[k].is_floating_point()]
        assert any(not torch.equal(before[k], after[k]) for k in body)
    history = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert len(history) > 1 + 2 * 2  # both members' head epochs and stage epochs, end to end
    probs = xferlearn.load(run).predict(sorted((data / "PNEUMONIA").iterdir())[:3])
    assert len(probs) == 3
    # Killed after the second member's last epoch, before its stages were saved: --resume loads the
    # first member's stages and the second's Lightning checkpoints instead of training again.
    (run / "model.pt").unlink()
    for name in ("member1-head.pt", "member1-stage1.pt"):
        (run / "stages" / name).unlink()
    resumed = xferlearn.train(data=str(data), out=str(run), resume=True, **options)
    assert resumed.metrics["selection"]["members"][0] == members[0]
    assert resumed.metrics["selection"]["members"][1]["best_epoch_val_auc"] is not None
