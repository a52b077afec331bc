"""Built-in per-sample losses and resolution of the ``loss_fn`` argument.

A loss function has the signature ``loss_fn(model, batch)`` and returns the per-sample losses,
a tensor of shape ``(B,)``, never reduced, so that estimators can weight samples exactly and
take per-sample gradients. It may instead return a pair ``(losses, correct)``, where
``correct`` is a bool tensor of shape ``(B,)`` (whether each sample is classified correctly):
the estimators use the losses only, and the callback's gap logs the mean of ``correct`` as the
accuracy. The built-in losses know their own accuracy (:func:`builtin_losses_and_correct`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Union[Tensor, tuple[Tensor, Tensor]]]
LossArg = Union[str, LossFn]

# A loss's accepted return values, for error messages.
RETURNS = "per-sample losses, a 1-D tensor of shape (B,), or a pair (losses, correct)"


class BuiltinLossError(TypeError, ValueError):
    """The batch or the model's outputs do not fit a built-in loss (the message says which loss fits).

    Both a ``TypeError`` (a batch that is not a pair) and a ``ValueError`` (outputs of the wrong shape).
    """


def _unpack(batch: Any, loss_name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise BuiltinLossError(
            f'loss_fn="{loss_name}" expects each batch to be a pair (inputs, targets); '
            f"got {type(batch).__name__}. Pass a callable loss_fn(model, batch) for other batch types."
        )
    return batch[0], batch[1]


def _one_output_unit(outputs: Tensor) -> bool:
    return outputs.dim() < 2 or outputs.shape[1] == 1


def _cross_entropy(outputs: Tensor, y: Tensor) -> Tensor:
    # Cross-entropy over one logit is 0 for every sample: every curvature would be logged as 0.
    if _one_output_unit(outputs):
        raise BuiltinLossError(
            f'loss_fn="cross_entropy" needs one logit per class, outputs of shape (B, C) with C >= 2; the model '
            f"returns shape {tuple(outputs.shape)}, and cross-entropy over a single logit is 0 for every sample. "
            'For one output unit use loss_fn="bce_with_logits" (binary classification, targets 0/1 of shape (B,) '
            'or (B, 1)) or loss_fn="mse" (regression), or a callable loss_fn(model, batch).'
        )
    return F.cross_entropy(outputs, y, reduction="none")


def _class_correct(outputs: Tensor, y: Tensor) -> Optional[Tensor]:
    """The arg-max class against integer labels; ``None`` for class probabilities (no hard label)."""
    if y.is_floating_point() or y.dim() != 1:
        return None
    return outputs.argmax(1) == y


def _single_logit(outputs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``outputs`` and ``y`` as ``(B,)``, when both hold one number per sample."""
    size = outputs.shape[0] if outputs.dim() > 0 else 0
    if outputs.dim() not in (1, 2) or outputs.numel() != size:
        raise BuiltinLossError(
            f'loss_fn="bce_with_logits" needs one logit per sample, outputs of shape (B,) or (B, 1); the model '
            f'returns shape {tuple(outputs.shape)}. For C >= 2 classes use loss_fn="cross_entropy".'
        )
    if y.dim() not in (1, 2) or y.numel() != size:
        raise BuiltinLossError(
            f'loss_fn="bce_with_logits" needs one target per sample, 0 or 1, of shape (B,) or (B, 1), for outputs of '
            f"shape {tuple(outputs.shape)}; got targets of shape {tuple(y.shape)}."
        )
    return outputs.reshape(size), y.reshape(size)


def _binary_cross_entropy(outputs: Tensor, y: Tensor) -> Tensor:
    logits, targets = _single_logit(outputs, y)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")


def _binary_correct(outputs: Tensor, y: Tensor) -> Tensor:
    logits, targets = _single_logit(outputs, y)
    return (logits > 0) == (targets > 0.5)  # a positive logit predicts class 1


def _mse(outputs: Tensor, y: Tensor) -> Tensor:
    squared = (outputs - y) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


@dataclass(frozen=True)
class _Builtin:
    losses: Callable[[Tensor, Tensor], Tensor]  # (model outputs, targets) -> (B,)
    correct: Callable[[Tensor, Tensor], Optional[Tensor]]  # -> (B,) bool, or None: no accuracy


_BUILTINS: dict[str, _Builtin] = {
    "cross_entropy": _Builtin(_cross_entropy, _class_correct),
    "bce_with_logits": _Builtin(_binary_cross_entropy, _binary_correct),
    "mse": _Builtin(_mse, lambda outputs, y: None),  # regression: no accuracy
}


def builtin_losses_and_correct(name: str, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
    """The built-in loss ``name`` and its per-sample correctness from one forward pass ``model(x)``."""
    x, y = _unpack(batch, name)
    outputs = model(x)
    builtin = _BUILTINS[name]
    return builtin.losses(outputs, y), builtin.correct(outputs, y)


def cross_entropy_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample cross-entropy ``F.cross_entropy(model(x), y, reduction="none")`` for logits ``(B, C)``,
    ``C >= 2``, and integer labels ``(B,)`` or class probabilities ``(B, C)``."""
    x, y = _unpack(batch, "cross_entropy")
    return _cross_entropy(model(x), y)


def bce_with_logits_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample ``F.binary_cross_entropy_with_logits(model(x), y, reduction="none")`` for one logit per
    sample, ``(B,)`` or ``(B, 1)``, and targets 0/1 (float, integer or bool) of shape ``(B,)`` or ``(B, 1)``."""
    x, y = _unpack(batch, "bce_with_logits")
    return _binary_cross_entropy(model(x), y)


def mse_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample mean over output dimensions of ``(model(x) - y) ** 2``."""
    x, y = _unpack(batch, "mse")
    return _mse(model(x), y)


BUILTIN_LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy_loss,
    "bce_with_logits": bce_with_logits_loss,
    "mse": mse_loss,
}


def split_output(out: Any) -> tuple[Tensor, Optional[Tensor]]:
    """``(losses, correct or None)`` from what a loss function returned; ``ValueError`` if it is neither form."""
    losses, correct = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(out).__name__
        if isinstance(out, tuple) and len(out) != 2:
            got = f"a tuple of {len(out)} elements"
        raise ValueError(
            f"loss_fn must return {RETURNS}, got {got}; use reduction=\"none\" and do not average over the batch."
        )
    if correct is not None and not (
        isinstance(correct, Tensor) and correct.dtype == torch.bool and correct.shape == losses.shape
    ):
        got = f"{correct.dtype} of shape {tuple(correct.shape)}" if isinstance(correct, Tensor) else type(correct).__name__
        raise ValueError(
            "loss_fn returned (losses, correct): correct must be a bool tensor of the losses' shape "
            f"{tuple(losses.shape)}, True where a sample is classified correctly (e.g. logits.argmax(1) == y); got {got}."
        )
    return losses, correct


def resolve_loss_fn(loss_fn: LossArg) -> tuple[LossFn, str | None]:
    """Return ``(callable, builtin_name)``; ``builtin_name`` is ``None`` for user callables."""
    if isinstance(loss_fn, str):
        if loss_fn not in BUILTIN_LOSSES:
            raise ValueError(
                f"loss_fn={loss_fn!r} is not a built-in loss; accepted names: "
                f"{sorted(BUILTIN_LOSSES)}, or a callable loss_fn(model, batch) returning {RETURNS}."
            )
        return BUILTIN_LOSSES[loss_fn], loss_fn
    if callable(loss_fn):
        for name, fn in BUILTIN_LOSSES.items():
            if loss_fn is fn:
                return fn, name
        return loss_fn, None
    raise TypeError(
        f"loss_fn must be one of {sorted(BUILTIN_LOSSES)} or a callable loss_fn(model, batch); "
        f"got {type(loss_fn).__name__}."
    )


def check_loss_fn(loss_fn: LossArg) -> LossArg:
    """``loss_fn`` if it is a built-in name or a callable; else a ``ValueError`` that names what is accepted."""
    try:
        resolve_loss_fn(loss_fn)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"loss_fn={loss_fn!r} is not accepted; use one of {sorted(BUILTIN_LOSSES)} or a callable "
            f"loss_fn(model, batch) returning {RETURNS}."
        ) from err
    return loss_fn
