"""The train/test gap: eval-mode loss and accuracy on fixed subsamples, with torchmetrics states."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .. import keys
from ..functional import Objective, measurement_mode
from ..functional._losses import LossArg


class GapMeter:
    """Eval-mode mean loss and accuracy on fixed subsamples, entered in ``collection``.

    Accuracy is measured when a batch is ``(x, y)`` with integer labels ``y`` of shape ``(B,)``
    and the model returns logits of shape ``(B, C)``; ``MulticlassAccuracy(C, average="micro")``
    is created on first use (when ``C`` is known) and added to the collection.
    """

    def __init__(self, collection: MetricCollection, loss_fn: LossArg) -> None:
        self.collection = collection
        self.loss_fn = loss_fn

    def _accuracy(self, split: str, num_classes: int, device: torch.device) -> MulticlassAccuracy:
        key = keys.split_acc(split)
        if key not in self.collection:
            self.collection.add_metrics({key: MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)})
        return self.collection[key]  # type: ignore[return-value]

    @torch.no_grad()
    def update(self, split: str, model: nn.Module, batches: list[Any]) -> None:
        loss_metric = self.collection[keys.split_loss(split)]
        with measurement_mode(model):
            objective = Objective(model, batches, self.loss_fn)
            for batch in objective.iter_batches():
                losses, logits = objective.losses_and_logits(batch)
                if logits is not None:
                    self._accuracy(split, logits.shape[1], logits.device).update(logits, batch[1])
                loss_metric.update(losses.float())

    def has_accuracy(self, split: str) -> bool:
        return keys.split_acc(split) in self.collection
