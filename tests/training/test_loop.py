"""The shared training loop's choice of weights: the best epoch by validation AUC, or the last
epoch (an ensemble's members), validated either way."""

import math

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from xferlearn.config import TrainConfig
from xferlearn.rundir import RunDir, read_history
from xferlearn.training.linear import ArrayRows, FeatureRowsDataset
from xferlearn.training.loop import ClassifierModule, fit, train_loader

EPOCHS = 5


def fit_a_head(run, keep, resume=False, callbacks=None, epochs=EPOCHS, imbalance="weights"):
    """A head whose validation labels are unrelated to what it learns, so validation AUC wanders
    from epoch to epoch and the best epoch is not the last."""
    rng = np.random.default_rng(0)
    x, x_val = rng.normal(size=(200, 8)), rng.normal(size=(60, 8))
    y, y_val = (x[:, 0] > 0).astype(np.int64), rng.integers(0, 2, 60)
    config = TrainConfig(data=str(run), epochs=epochs, resume=resume, imbalance=imbalance)
    head = torch.nn.Linear(8, 2)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    module = ClassifierModule(head, ["NORMAL", "PNEUMONIA"], lr=0.05, weight_decay=0.0, epochs=epochs)
    train = train_loader(FeatureRowsDataset(ArrayRows(x), y, None, None), y, config, 2, batch_size=32)
    val = DataLoader(FeatureRowsDataset(ArrayRows(x_val), y_val, None, None), batch_size=64)
    record = fit(module, train, val, config, run, keep=keep, accelerator="cpu", devices=1,
                 enable_progress_bar=False, callbacks=callbacks)
    aucs = [float(row["val_auc"]) for row in read_history(RunDir(run).history()) if row.get("val_auc")]
    return record, head.weight.detach().clone(), aucs


def saved_weight(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]["net.weight"]


def test_the_best_epoch_or_the_last_is_kept_and_recorded(tmp_path):
    best, best_weight, aucs = fit_a_head(tmp_path / "best", "best")
    last, last_weight, last_aucs = fit_a_head(tmp_path / "last", "last")
    assert len(aucs) == EPOCHS and aucs == last_aucs  # the same trajectory, validated in both
    assert int(np.argmax(aucs)) != EPOCHS - 1  # else the two choices below could not differ
    assert best["best_epoch_val_auc"] == pytest.approx(max(aucs))
    assert torch.equal(best_weight, saved_weight(tmp_path / "best/lightning/best.ckpt"))
    assert last["kept"] == "the last epoch" and last["epochs_run"] == EPOCHS
    assert last["last_epoch_val_auc"] == pytest.approx(aucs[-1])
    assert torch.equal(last_weight, saved_weight(tmp_path / "last/lightning/last.ckpt"))
    assert not (tmp_path / "last/lightning/best.ckpt").exists()  # no file names a choice never made
    assert not torch.equal(best_weight, last_weight)


def test_a_finished_fit_resumed_keeps_its_last_epoch_and_its_record(tmp_path):
    first, weight, aucs = fit_a_head(tmp_path, "last")
    again, weight_again, _ = fit_a_head(tmp_path, "last", resume=True)  # no epoch left to run
    assert again["last_epoch_val_auc"] == pytest.approx(aucs[-1]) == pytest.approx(first["last_epoch_val_auc"])
    assert torch.equal(weight_again, weight)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_last_ckpt_holds_every_epoch_as_it_ends(keep, tmp_path):
    """What --resume continues from: the epoch just finished, whether or not it was the best (Lightning
    2.6's own `save_last` wrote last.ckpt only beside a new best.ckpt, and never without one)."""
    import lightning as L

    steps = []
    last = tmp_path / "lightning" / "last.ckpt"

    def record(trainer):
        steps.append((torch.load(last, map_location="cpu", weights_only=True)["global_step"], trainer.global_step))

    class Recorder(L.Callback):  # Lightning runs checkpoint callbacks last: look as the next epoch starts
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch > 0:
                record(trainer)

        def on_train_end(self, trainer, module):
            record(trainer)

    fit_a_head(tmp_path, keep, callbacks=[Recorder()])
    assert len(steps) == EPOCHS and all(saved == now for saved, now in steps)


def test_a_fit_resumed_for_longer_follows_the_schedule_of_its_new_length(tmp_path):
    """--resume --epochs 4 after 2 epochs: the last two run at the 4-epoch cosine's rates; the
    2-epoch schedule saved in last.ckpt would have climbed back up past its end."""
    rates = []

    class Rates(Callback):
        def on_train_epoch_start(self, trainer, module):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit_a_head(tmp_path, "last", epochs=2)
    fit_a_head(tmp_path, "last", resume=True, epochs=4, callbacks=[Rates()])
    assert rates == pytest.approx([0.05 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in (2, 3)])


@pytest.mark.parametrize("imbalance", ["weights", "sampler"])
def test_a_fit_stopped_after_an_epoch_and_resumed_ends_as_one_that_ran_through(imbalance, tmp_path):
    """The shuffles and the class-balanced draws are seeded by the epoch, not by how far a
    generator had advanced, so the resumed epochs see the rows the uninterrupted fit saw."""

    class StopAfterFirst(Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = True

    _, through, _ = fit_a_head(tmp_path / "a", "last", imbalance=imbalance)
    fit_a_head(tmp_path / "b", "last", imbalance=imbalance, callbacks=[StopAfterFirst()])
    _, resumed, _ = fit_a_head(tmp_path / "b", "last", resume=True, imbalance=imbalance)
    assert torch.allclose(resumed, through, atol=1e-6)


def test_an_unknown_choice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep must be"):
        fit(None, None, None, TrainConfig(data=str(tmp_path)), tmp_path, keep="median")
