"""Which parameters are measured, and conversion between flat vectors and parameter lists."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn


def resolve_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` pairs that are measured, in ``model.parameters()`` order.

    Default: every parameter with ``requires_grad=True``. An explicit ``params`` must be
    parameters of ``model``; they are reordered to the model's order so flat vectors have a
    single, documented layout.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        wanted = {id(p) for p in params}
        if not wanted:
            raise ValueError("params is empty; pass None to measure every trainable parameter.")
        chosen = [(n, p) for n, p in named if id(p) in wanted]
        if len(chosen) != len(wanted):
            raise ValueError("params contains tensors that are not parameters of model.")
    if not chosen:
        raise ValueError("model has no trainable parameters to measure (all have requires_grad=False).")
    return chosen


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (in order)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor | torch.Size]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like`` (tensors or shapes); inverse of :func:`flatten`."""
    shapes = [t.shape if isinstance(t, Tensor) else torch.Size(t) for t in like]
    numels = [s.numel() for s in shapes]
    if vector.shape != (sum(numels),):
        raise ValueError(f"expected a flat vector of shape ({sum(numels)},), got {tuple(vector.shape)}.")
    return [chunk.view(s) for chunk, s in zip(torch.split(vector, numels), shapes)]
