"""Checks the callbacks run before training, so that a setup they cannot measure fails once, early, clearly.

* :func:`check_strategy` (in ``setup``): refuses strategies that shard the parameters or split
  the model, whose per-rank Hessian-vector products would be wrong.
* :func:`probe_loss` (at ``on_train_start``): evaluates the loss on two samples, so that a
  module without ``forward``, batches that are not ``(inputs, targets)``, a loss that is not
  per-sample and a built-in loss that does not fit the model's outputs (cross-entropy over one
  output unit, which is 0 for every sample) are reported once, with what to do, instead of once
  per metric, deep inside a training step, or not at all (zeros logged).

A leaf module: it imports nothing from the callbacks or the metrics, which import it.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ._failures import ConfigurationError
from .functional._losses import (
    HF_LOSSES,
    BuiltinLoss,
    BuiltinLossError,
    LossArg,
    LossFn,
    hf_loss_for,
    looks_like_hf,
    resolve_loss_fn,
    split_output,
)
from .functional.objective import Objective
from .functional._restore import measurement_mode

__all__ = ["LossFnError", "UnsupportedStrategyError", "check_strategy", "head", "probe_loss"]

# Two samples, not one: a loss that calls ``.squeeze()`` would drop the batch axis of a single
# sample and be reported as not per-sample.
PROBE_SAMPLES = 2

# PyTorch's message for a module whose class defines no ``forward`` (nn.Module._forward_unimplemented).
_MISSING_FORWARD = 'missing the required "forward" function'

LOSS_FN_EXAMPLE = """\
    def loss_fn(model, batch):  # per-sample losses, shape (B,)
        x, y = batch
        return F.cross_entropy(model.net(x), y, reduction="none")"""


class LossFnError(TypeError, ConfigurationError):
    """The loss cannot be evaluated on the module and its batches; raised by :func:`probe_loss`."""


class UnsupportedStrategyError(ConfigurationError):
    """The trainer's strategy shards the parameters or splits the model; raised by :func:`check_strategy`."""


def head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (every tensor sliced along dim 0), detached copies."""
    return tree_map(lambda t: t[:n].detach().clone() if isinstance(t, Tensor) and t.dim() > 0 else t, batch)


def _what_to_do(who: str) -> str:
    return (
        f"Pass {who}(loss_fn=loss_fn) with a function that unpacks the batch as your training_step does and "
        f"returns one loss per sample, e.g.\n\n{LOSS_FN_EXAMPLE}\n\n(docs/faq.md: \"cannot evaluate the loss\")."
    )


def _hf_hint(batch: Any, name: str | None, who: str) -> str:
    """Names the Hugging Face built-in that fits when the batches look like Hugging Face's and another loss is set."""
    if name in HF_LOSSES or not looks_like_hf(batch):
        return ""
    return (
        f'The batches look like Hugging Face\'s (a dict with "input_ids" and "labels"): pass '
        f'{who}(loss_fn="{hf_loss_for(batch)}") (the built-ins {list(HF_LOSSES)} call model(**inputs) with every key '
        'but "labels" and read its .logits; docs/faq.md, "Hugging Face transformers"). Or: '
    )


def _checked(fn: LossFn, name: str | None, who: str) -> LossFn:
    """``fn`` with its failure kinds (no ``forward``, not per-sample, a built-in loss that does not fit)
    turned into :class:`LossFnError`."""

    def loss(model: nn.Module, batch: Any) -> Any:
        try:
            out = fn(model, batch)
        except NotImplementedError as err:
            if _MISSING_FORWARD not in str(err):
                raise
            call = "model(**inputs)" if name in HF_LOSSES else "model(x)"
            calls = f'the built-in loss_fn="{name}" calls {call}' if name else "your loss_fn calls a module without forward"
            raise LossFnError(
                f"{who}: cannot evaluate the loss: {err} ({calls}). A LightningModule whose training_step calls a "
                "submodule often defines no forward. Either define forward (e.g. `def forward(self, x): return "
                f"self.net(x)`), or call the submodule in your own loss. {_what_to_do(who)}"
            ) from err
        except BuiltinLossError as err:
            raise LossFnError(f"{who}: {err}") from err
        try:
            split_output(out)
        except ValueError as err:
            raise LossFnError(f"{who}: {err} {_what_to_do(who)}") from err
        return out

    return loss


def probe_loss(model: nn.Module, batch: Any, loss_fn: LossArg, who: str) -> None:
    """Evaluate ``loss_fn`` once on the first two samples of ``batch``, as the estimators do.

    Same evaluation as the estimators: eval mode, no gradients, autocast off, the batch moved to
    the model's device and compute dtype, the parameters substituted functionally. The model's
    train/eval flags, parameters, ``.grad`` and the global RNG are restored
    (:func:`~lightning_flatness.functional.measurement_mode`). A loss that is exactly 0 for both
    samples is warned about: its gradients and curvature are 0 too, and so would every value be.

    Raises:
        LossFnError: (a ``TypeError``) whose message names ``who``, what went wrong and what to
            do, when the module has no ``forward`` (the default losses call ``model(x)``), when
            ``loss_fn`` is a built-in and the batch's structure does not fit it (not a pair
            ``(inputs, targets)``, a dict whose inputs and targets it cannot tell apart, or no
            ``"labels"`` for the ``"hf_*"`` losses, the message then naming the loss that fits a
            Hugging Face batch) or the model's outputs do not fit it (e.g. ``"cross_entropy"`` on one output unit), or
            when the loss returns neither per-sample losses ``(B,)`` nor ``(losses, correct)``.
            Any other exception of the loss propagates unchanged.
    """
    fn, name = resolve_loss_fn(loss_fn)
    if isinstance(fn, BuiltinLoss):
        try:
            fn.check_batch(batch)
        except BuiltinLossError as err:
            raise LossFnError(f"{who}: {err} {_hf_hint(batch, name, who)}{_what_to_do(who)}") from err
    with measurement_mode(model), torch.no_grad():
        objective = Objective(model, [head(batch, PROBE_SAMPLES)], _checked(fn, name, who))
        losses = objective.losses(objective.w0, next(objective.iter_batches()))
    if losses.numel() and not losses.any():
        rank_zero_warn(
            f"{who}: the loss is exactly 0 for each of the {losses.numel()} samples probed at the start of training. "
            "A loss that is 0 for every sample has zero gradients and curvature, so every flatness value and the "
            "gap's loss would be logged as 0. Check loss_fn against how the model is trained (docs/faq.md, "
            '"Every value is 0").'
        )


# Data-parallel strategies: every process holds all the parameters, on one device.
SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)
# ... except these subclasses, which shard parameters (DeepSpeed ZeRO stage 3) or wrap the model in an engine.
EXCLUDED_STRATEGIES = (DeepSpeedStrategy,)


def check_strategy(trainer: Trainer, who: str) -> None:
    """Refuse a strategy that shards the parameters or splits the model across devices.

    Supported: ``SingleDeviceStrategy`` and ``DDPStrategy`` (``"ddp"``, ``"ddp_spawn"``,
    ``"ddp_fork"``, ``"ddp_notebook"``, on one or several nodes) and their subclasses, except
    ``DeepSpeedStrategy``. Refused: FSDP, DeepSpeed, ``ModelParallelStrategy`` and any other
    strategy: a rank's Hessian-vector products over its shard of the parameters would give
    wrong numbers or obscure errors.

    Raises:
        UnsupportedStrategyError: (a ``ValueError``) naming the strategy, what is supported and
            where the alternatives are documented (docs/faq.md).
    """
    strategy = trainer.strategy
    if isinstance(strategy, SUPPORTED_STRATEGIES) and not isinstance(strategy, EXCLUDED_STRATEGIES):
        return
    raise UnsupportedStrategyError(
        f"{who} does not support {type(strategy).__name__}: it measures the full parameter vector on every "
        "process, and sharded or model-parallel strategies (FSDP, DeepSpeed, ModelParallelStrategy) hold only a "
        'shard of it. Supported: a single device (strategy="auto" on one device, SingleDeviceStrategy) and DDP '
        '(strategy="ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", on one or several nodes). For a sharded model, '
        "measure a consolidated copy on one device with the functional API every few epochs: see docs/faq.md, "
        "'Sharded or model-parallel training (FSDP, DeepSpeed)?'."
    )
