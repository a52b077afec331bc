"""The train/test gap: eval-mode loss and accuracy on fixed subsamples, with torchmetrics states."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from .. import keys
from ..functional._stats import MeanAccumulator
from ..functional import Objective, measurement_mode
from ..functional._losses import LossArg


class GapMeter:
    """Eval-mode mean loss and accuracy on fixed subsamples, entered in ``collection``.

    Accuracy is measured where the loss gives each sample's correctness from its own evaluation
    (:meth:`~lightning_flatness.functional.Objective.losses_and_correct`: the built-in
    ``"cross_entropy"`` with integer labels and ``"bce_with_logits"``, or a callable returning
    ``(losses, correct)``); its state, the mean of ``correct`` over the samples, is added to the
    collection on first use.
    """

    def __init__(self, collection: MetricCollection, loss_fn: LossArg) -> None:
        self.collection = collection
        self.loss_fn = loss_fn
        self.errors: dict[str, float] = {}  # {"gap/train_loss_se": ...}: per-sample s / √n, over processes

    def _accuracy(self, split: str, device: torch.device) -> MeanMetric:
        key = keys.split_acc(split)
        if key not in self.collection:
            self.collection.add_metrics({key: MeanMetric(nan_strategy="error").to(device)})
        return self.collection[key]  # type: ignore[return-value]

    @torch.no_grad()
    def update(self, split: str, model: nn.Module, batches: list[Any]) -> None:
        """One split's loss and accuracy; an empty shard still takes part in the reduction of the errors."""
        loss_metric = self.collection[keys.split_loss(split)]
        with measurement_mode(model):
            objective = Objective(model, batches, self.loss_fn)
            spread = MeanAccumulator(2, objective.device)  # per sample: loss, correct (1/0)
            for batch in objective.iter_batches() if batches else ():
                losses, correct = objective.losses_and_correct(batch)
                hits = torch.full_like(losses, math.nan) if correct is None else correct.to(losses)
                if correct is not None:
                    self._accuracy(split, losses.device).update(hits.double())
                loss_metric.update(losses.float())
                spread.add(torch.stack([losses, hits], dim=1))
            se = spread.result(objective.reduce_sum)[1].tolist()
        self.errors[keys.se(keys.split_loss(split))], self.errors[keys.se(keys.split_acc(split))] = se

    def derived(self, values: dict[str, float]) -> dict[str, float]:
        """Accuracies where measured, the gaps (test − train loss, train − test accuracy), and the
        standard errors of all of them (train and test subsamples are independent)."""
        out = {}
        for split in ("train", "test"):
            acc = keys.split_acc(split)
            if self.has_accuracy(split) and keys.split_loss(split) in values and self.collection[acc].update_called:
                out[acc] = float(self.collection[acc].compute())
        for split in ("train", "test"):
            for key in (keys.split_loss(split), keys.split_acc(split)):
                if key in values or key in out:
                    out[keys.se(key)] = self.errors[keys.se(key)]
        for gap, test, train, sign in ((keys.LOSS_GAP, keys.TEST_LOSS, keys.TRAIN_LOSS, 1), (keys.ACC_GAP, keys.TEST_ACC, keys.TRAIN_ACC, -1)):
            both = {**values, **out}
            if test in both and train in both:
                out[gap] = sign * (both[test] - both[train])
                out[keys.se(gap)] = math.hypot(out[keys.se(test)], out[keys.se(train)])
        return out

    def has_accuracy(self, split: str) -> bool:
        return keys.split_acc(split) in self.collection
