"""Built-in per-sample losses and resolution of the ``loss_fn`` argument.

A loss function has the signature ``loss_fn(model, batch) -> Tensor`` of shape ``(B,)``:
one loss per sample, never reduced, so that estimators can weight samples exactly and
take per-sample gradients.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
LossArg = Union[str, LossFn]


def _unpack(batch: Any, loss_name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            f'loss_fn="{loss_name}" expects each batch to be a pair (inputs, targets); '
            f"got {type(batch).__name__}. Pass a callable loss_fn(model, batch) for other batch types."
        )
    return batch[0], batch[1]


def cross_entropy_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample cross-entropy ``F.cross_entropy(model(x), y, reduction="none")``."""
    x, y = _unpack(batch, "cross_entropy")
    return F.cross_entropy(model(x), y, reduction="none")


def mse_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample mean over output dimensions of ``(model(x) - y) ** 2``."""
    x, y = _unpack(batch, "mse")
    squared = (model(x) - y) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


BUILTIN_LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy_loss, "mse": mse_loss}


def resolve_loss_fn(loss_fn: LossArg) -> tuple[LossFn, str | None]:
    """Return ``(callable, builtin_name)``; ``builtin_name`` is ``None`` for user callables."""
    if isinstance(loss_fn, str):
        if loss_fn not in BUILTIN_LOSSES:
            raise ValueError(
                f"loss_fn={loss_fn!r} is not a built-in loss; accepted names: "
                f"{sorted(BUILTIN_LOSSES)}, or a callable loss_fn(model, batch) -> Tensor of shape (B,)."
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
            "loss_fn(model, batch) returning per-sample losses of shape (B,)."
        ) from err
    return loss_fn
