"""The sweep's models and stopping rule: an MLP, LeNet or a small ResNet classifier and a full-train-loss target."""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn


def mlp(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """``in → hidden[0] → ... → num_classes`` with ReLU between the linear layers."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """The CNN of Wang et al.'s (2018) MNIST experiments, as in PyTorch's MNIST example of 2018.

    conv(1→20, 5x5) → ReLU → max-pool 2 → conv(20→50, 5x5) → ReLU → max-pool 2 →
    fc(800→500) → ReLU → fc(500→10): 431,080 weights for 28x28 inputs. Takes the flat
    ``(B, side²)`` rows the study's data sets hold and reshapes them to ``(B, 1, side, side)``.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.side = math.isqrt(in_features)
        if self.side * self.side != in_features or self.side < 16:
            raise ValueError(f"model 'lenet' needs square single-channel images of side >= 16 (e.g. 784 = 28x28 "
                             f"features, --data mnist), got {in_features} features.")  # fmt: skip
        after = ((self.side - 4) // 2 - 4) // 2  # two 5x5 convolutions, each followed by a 2x2 pool
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * after * after, 500), nn.ReLU(), nn.Linear(500, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.reshape(-1, 1, self.side, self.side)))


MODELS = ("mlp", "lenet")


def build_model(
    model: str, in_features: int, hidden: Sequence[int], num_classes: int, architecture: str | None = None
) -> nn.Module:
    """``"mlp"``: :func:`mlp` with ``hidden`` layers; ``"lenet"``: :class:`LeNet` (``hidden`` unused). An
    ``architecture`` (``"res8x16"``, ``"plain8x16"``; :mod:`~lightning_flatness.study.resnet`) replaces both."""
    if architecture is not None:
        from .resnet import ResNet, parse_architecture

        return ResNet(in_features, num_classes, parse_architecture(architecture))
    if model == "mlp":
        return mlp(in_features, hidden, num_classes)
    if model == "lenet":
        return LeNet(in_features, num_classes)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}.")


OPTIMIZERS = ("sgd", "entropy-sgd")
ADVERSARIAL_TRAINING = ("none", "fgsm", "pgd")


class Classifier(LightningModule):
    """An MLP or LeNet (``model``), or a ResNet (``architecture``: ``"res8x16"``, ``"plain8x16"``), on
    cross-entropy, plain SGD (no momentum, no weight decay) or Entropy-SGD.

    ``adversarial="fgsm"`` or ``"pgd"``: every training step is taken on the batch's adversarial examples
    within ``epsilon`` (L∞; PGD with ``attack_steps`` steps from a random start drawn with ``attack_seed``),
    Madry et al.'s (2018) robust training; ``"none"``: on the batch itself.
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int, lr: float, batch_size: int,
        optimizer: str = "sgd", model: str = "mlp", adversarial: str = "none", epsilon: float = 0.1,
        attack_steps: int = 10, attack_seed: int = 0, architecture: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        if adversarial not in ADVERSARIAL_TRAINING:
            raise ValueError(f"adversarial must be one of {ADVERSARIAL_TRAINING}, got {adversarial!r}.")
        self.save_hyperparameters()
        self.net = build_model(model, in_features, hidden, num_classes, architecture)
        self._attack_generator = torch.Generator().manual_seed(attack_seed)  # PGD's random starts

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if self.hparams.adversarial != "none":
            from ..functional import adversarial_examples

            x = adversarial_examples(
                self, (x, y), attack=self.hparams.adversarial, epsilon=self.hparams.epsilon,
                steps=self.hparams.attack_steps, generator=self._attack_generator,
            )  # fmt: skip
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "entropy-sgd":
            from ..optim import EntropySGD

            # Inner SGLD at the sweep's lr; 5 gradient evaluations per step (Chaudhari et al. 2017). Algorithm 1's
            # outer step lr * gamma_t * (w - mu), as the sweep always ran: lr * gamma_t grows from 0.5 to 1 with
            # the scope, which no constant lr of the authors' form (lr * (w - mu)) reproduces.
            return EntropySGD(self.parameters(), lr=1.0, num_steps=5, sgld_lr=self.hparams.lr, noise=1e-4,
                              gamma=0.5, gamma_growth=1e-3, gamma_max=1.0, parametrization="paper")  # fmt: skip
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class TargetTrainLoss(Callback):
    """After every epoch, the loss on the whole training set (eval mode); stops at ``target``.

    Also prints a progress line every ``progress_seconds`` (and when the run stops).
    """

    def __init__(self, x: Tensor, y: Tensor, target: float, label: str = "", progress_seconds: float | None = 5.0,
                 chunk: int = 4096) -> None:  # fmt: skip
        self.x, self.y, self.target, self.label = x, y, float(target), label
        self.progress_seconds, self.chunk = progress_seconds, chunk
        self.loss = float("nan")
        self.reached = self.diverged = False
        self._start = self._last_print = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = self._last_print = time.perf_counter()

    @torch.no_grad()
    def full_train_loss(self, pl_module: LightningModule) -> float:
        was_training = pl_module.training
        pl_module.eval()
        total = 0.0
        for s in range(0, len(self.y), self.chunk):
            x = self.x[s : s + self.chunk].to(pl_module.device)
            y = self.y[s : s + self.chunk].to(pl_module.device)
            total += float(F.cross_entropy(pl_module(x), y, reduction="sum"))
        pl_module.train(was_training)
        return total / len(self.y)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.loss = self.full_train_loss(pl_module)
        pl_module.log("train/full_loss", self.loss, prog_bar=True, logger=False)
        if not math.isfinite(self.loss):
            self.diverged = True
            trainer.should_stop = True
        elif self.loss <= self.target:
            self.reached = True
            trainer.should_stop = True
        now = time.perf_counter()
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        due = trainer.should_stop or last or now - self._last_print >= (self.progress_seconds or 0)
        if self.progress_seconds is not None and due:
            self._last_print = now
            test = trainer.callback_metrics.get("val/loss")
            test_text = f", test loss {float(test):.3f}" if test is not None else ""
            print(f"  {self.label} epoch {trainer.current_epoch + 1}: train loss {self.loss:.4f} "
                  f"(target {self.target:g}){test_text}, {now - self._start:.0f} s", flush=True)  # fmt: skip
