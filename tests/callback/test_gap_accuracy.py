"""The gap's accuracy comes from the loss's own evaluation, never from a guess at ``model(x)`` (issue 23, item 3).

A built-in loss knows its accuracy from the outputs it computes; a callable ``loss_fn`` gives it
by returning ``(losses, correct)``, and without that no accuracy is logged. Each value is checked
against the accuracy of the same subsample computed by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness import FlatnessCallback
from tests.helpers.lightning_models import Classifier, DataModule, make_data, trainer

GAP = dict(metrics=["fisher_trace"], num_samples=64, batch_size=16, gap_num_samples=96)
ACCURACY_KEYS = ("gap/train_acc", "gap/test_acc", "gap/acc", "gap/train_acc_se", "gap/test_acc_se", "gap/acc_se")


class Features(Classifier):
    """``forward`` returns features; the classifier head is applied in the loss (and in training_step)."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0, batchnorm=False)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.logits(x), y)

    def validation_step(self, batch, batch_idx):
        pass


class NoForward(Classifier):
    """The FAQ's own case for ``loss_fn``: training_step calls the submodule and there is no forward."""

    forward = nn.Module.forward

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        pass


def loss_only(model, batch):
    x, y = batch
    return F.cross_entropy(model.logits(x), y, reduction="none")


def loss_and_correct(model, batch):
    x, y = batch
    logits = model.logits(x)
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y


def subsample_accuracy(model, dataset, seed, num):
    """The accuracy of the callback's gap subsample (drawn by index with ``seed``), by hand."""
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num]
    x, y = dataset.tensors[0][idx], dataset.tensors[1][idx]
    model.eval()
    with torch.no_grad():
        return (model.logits(x).argmax(1) == y).double().mean().item()


def fit(tmp_path, model, loss_fn, epochs=2):
    seed_everything(0)
    dm = DataModule()
    cb = FlatnessCallback(loss_fn=loss_fn, **GAP)
    trainer(tmp_path, [cb], max_epochs=epochs).fit(model, dm)
    return cb, dm


@pytest.mark.parametrize("make", [Features, NoForward], ids=["features_forward", "no_forward"])
def test_a_callable_loss_logs_the_gap_at_every_measurement_and_no_accuracy_it_does_not_give(tmp_path, make):
    cb, _ = fit(tmp_path, make(), loss_only)
    assert [x for x, _ in cb.history] == [1, 2]
    for _, values in cb.history:
        assert {"gap/train_loss", "gap/test_loss", "gap/loss"} <= set(values)
        assert not set(ACCURACY_KEYS) & set(values)  # model(x) is features, or does not exist: no guess


@pytest.mark.parametrize("make", [Features, NoForward], ids=["features_forward", "no_forward"])
def test_a_callable_loss_returning_losses_and_correct_logs_the_models_real_accuracy(tmp_path, make):
    model = make()
    cb, dm = fit(tmp_path, model, loss_and_correct)
    last = cb.history[-1][1]
    train = subsample_accuracy(model, dm.train_set, 1, GAP["gap_num_samples"])
    test = subsample_accuracy(model, dm.val_set, 2, GAP["gap_num_samples"])
    assert train > 0.8  # a trained model, so that a guess from the features could not pass
    assert last["gap/train_acc"] == pytest.approx(train, abs=1e-6)
    assert last["gap/test_acc"] == pytest.approx(test, abs=1e-6)
    assert last["gap/acc"] == pytest.approx(train - test, abs=1e-6)
    assert last["gap/train_acc_se"] > 0


def test_bce_with_logits_gap_accuracy_is_the_logits_sign(tmp_path):
    """One output unit, float targets (B, 1): the gap's loss and accuracy of the built-in binary loss."""

    class Binary(Classifier):
        def __init__(self) -> None:
            super().__init__(classes=1, dropout=0.0, batchnorm=False)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.binary_cross_entropy_with_logits(self(x), y)

        def validation_step(self, batch, batch_idx):
            pass

    data = make_data(192, classes=2)
    data = TensorDataset(data.tensors[0], data.tensors[1].float()[:, None])
    seed_everything(0)
    model = Binary()
    cb = FlatnessCallback(loss_fn="bce_with_logits", **GAP)
    trainer(tmp_path, [cb], max_epochs=2).fit(model, DataLoader(data, batch_size=32), DataLoader(data, batch_size=64))
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[: GAP["gap_num_samples"]]
    x, y = data.tensors[0][idx], data.tensors[1][idx]
    model.eval()
    with torch.no_grad():
        logits = model(x)
    last = cb.history[-1][1]
    assert last["gap/train_acc"] == pytest.approx(((logits > 0) == (y > 0.5)).double().mean().item(), abs=1e-6)
    expected_loss = F.binary_cross_entropy_with_logits(logits, y, reduction="mean").item()
    assert last["gap/train_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert last["flatness/fisher_trace"] > 0
