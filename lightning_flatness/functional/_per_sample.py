"""Per-sample squared gradient norms ``‖∇ℓ_i(w)‖²`` without a Python loop over samples.

Two exact paths, summed over a partition of the measured parameters:

* **Ghost norms** (``_ghost.py``) for the parameters of linear, 2-D convolution, layer norm,
  eval-mode batch norm and embedding calls and of broadcast additions: from one batched
  forward and backward, ``‖∂ℓ_n/∂W‖² = ‖Σ_t δ_{n,t} a_{n,t}ᵀ‖²`` and its relatives, no
  per-sample gradient formed where a Gram matrix is cheaper (Goodfellow 2015; Li et al. 2022;
  BackPACK's ``BatchL2Grad``).
* ``torch.func.vmap`` over ``torch.func.grad`` for every other parameter (attention's packed
  projections, group norm, custom layers, shared weights, …), in sub-chunks of at most
  ``2**25`` gradient entries.

Both paths assume samples do not interact in the forward pass, which holds in eval mode
(BatchNorm uses running statistics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_leaves, tree_map

from ._ghost import by_sample_chunks, ghost_sq_norms
from ._params import unflatten

if TYPE_CHECKING:
    from .objective import Objective


def leading_sizes(batch: Any) -> list[int]:
    """The distinct sizes of dim 0 over the tensors (at least 1-D) of ``batch``, sorted: one for a batch of samples."""
    return sorted({t.shape[0] for t in tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0})


def batch_size(batch: Any, purpose: str = "per-sample gradients") -> int:
    """The number of samples in ``batch``: the leading size shared by all its tensors."""
    sizes = leading_sizes(batch)
    if len(sizes) != 1:
        raise ValueError(
            f"{purpose} need(s) every tensor in a batch to share the leading (sample) "
            f"dimension; found leading sizes {sizes}."
        )
    return sizes[0]


def per_sample_sq_norms(objective: Objective, batch: Any, at: Tensor | None = None) -> Tensor:
    """``‖∇ℓ_i(w)‖²`` for every sample of one prepared batch (see the module docstring)."""
    w = objective.w0 if at is None else at
    tensors = [t.detach() for t in unflatten(w, objective.shapes)]
    size = batch_size(batch)
    total = torch.zeros(size, dtype=objective.dtype, device=objective.device)
    ghost: set[int] = set()
    if size > 1:
        leaves = [t.clone().requires_grad_() for t in tensors]
        ghost = ghost_sq_norms(lambda b: objective.losses(leaves, b), batch, leaves, size, total, objective.ghost_axes)
    rest = [i for i in range(len(tensors)) if i not in ghost]
    if rest:
        total += _vmap_sq_norms(objective, batch, tensors, rest, size)
    return total


def _vmap_sq_norms(objective: Objective, batch: Any, tensors: list[Tensor], rest: list[int], size: int) -> Tensor:
    """``Σ_{i ∈ rest} ‖∂ℓ_n/∂θ_i‖²`` per sample, the other parameters held fixed."""

    def sample_loss(rest_ts: list[Tensor], sample: Any) -> Tensor:
        ts = list(tensors)
        for i, t in zip(rest, rest_ts):
            ts[i] = t
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample)
        return objective.losses(ts, one).sum()

    def sq_norm(rest_ts: list[Tensor], sample: Any) -> Tensor:
        return sum((g**2).sum() for g in grad(sample_loss)(rest_ts, sample))

    rest_ts = [tensors[i] for i in rest]
    in_dims = (None, tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch))

    def sq_norms(part: slice) -> Tensor:  # (chunk x parameters) per-sample gradients at once
        samples = tree_map(lambda t: t[part] if isinstance(t, Tensor) else t, batch)
        return vmap(sq_norm, in_dims=in_dims)(rest_ts, samples)

    return by_sample_chunks(size, sum(t.numel() for t in rest_ts), sq_norms)
