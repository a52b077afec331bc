"""Per-sample squared gradient norms ``‖∇ℓ_i(w)‖²`` without a Python loop over samples.

Two exact paths, summed over a partition of the measured parameters:

* **Ghost norms** for ``nn.Linear`` layers (Goodfellow 2015; Li et al. 2022, "ghost clipping";
  BackPACK's ``BatchL2Grad``): from one ordinary batched forward and backward, with the layer
  input ``a_n`` captured by a forward hook and the output gradient ``δ_n`` by ``autograd.grad``,
  ``‖∂ℓ_n/∂W‖² = ‖a_n‖²‖δ_n‖²``; with ``T`` positions (sequences) ``Σ_{t,t'} (a_t·a_t')(δ_t·δ_t')``
  or the materialized ``‖Σ_t δ_t a_tᵀ‖²``, whichever is cheaper. No per-sample gradient is formed.
* ``torch.func.vmap`` over ``torch.func.grad`` for every other parameter (convolutions,
  normalization layers, embeddings, …), in sub-chunks of at most ``2**25`` gradient entries.

A Linear layer takes the ghost path when its weight is measured, not shared with another
module, has a measured (or no) bias, and runs exactly once per forward pass; otherwise it
falls back to ``vmap``. Both paths assume samples do not interact in the forward pass, which
holds in eval mode (BatchNorm uses running statistics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_leaves, tree_map

from ._params import unflatten

if TYPE_CHECKING:
    from ._objective import Objective

# Per-sample gradients materialize (chunk x parameters) numbers; cap a chunk at this many.
PER_SAMPLE_ELEMENTS = 2**25


def batch_size(batch: Any, purpose: str = "per-sample gradients") -> int:
    """The number of samples in ``batch``: the leading size shared by all its tensors."""
    sizes = {t.shape[0] for t in tree_leaves(batch) if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"{purpose} need(s) every tensor in a batch to share the leading (sample) "
            f"dimension; found leading sizes {sorted(sizes)}."
        )
    return sizes.pop()


def _linear_sq_norms(a: Tensor, d: Tensor, bias: bool) -> Tensor:
    """Per-sample ``‖∂ℓ_n/∂W‖² (+ ‖∂ℓ_n/∂b‖²)`` of ``y = a Wᵀ + b``: ``a`` (B, ..., in), ``d`` (B, ..., out)."""
    b = a.shape[0]
    a = a.reshape(b, -1, a.shape[-1])
    d = d.reshape(b, -1, d.shape[-1])
    t, n_in, n_out = a.shape[1], a.shape[2], d.shape[2]
    if t == 1:
        out = (a[:, 0] ** 2).sum(1) * (d[:, 0] ** 2).sum(1)
    elif t * (n_in + n_out) <= n_in * n_out:
        out = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum((1, 2))
    else:
        out = (torch.bmm(d.transpose(1, 2), a) ** 2).sum((1, 2))
    if bias:
        out = out + (d.sum(1) ** 2).sum(1)
    return out


def _ghost_candidates(objective: Objective) -> dict[str, tuple[nn.Linear, int, int | None]]:
    """Linear layers eligible for ghost norms: ``name -> (module, weight index, bias index)``."""
    index = {name: i for i, name in enumerate(objective.names)}
    owners: dict[int, int] = {}
    for module in objective.model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    found = {}
    for name, module in objective.model.named_modules():
        # Exactly nn.Linear: subclasses such as MultiheadAttention's out_proj may be used functionally.
        if type(module) is not nn.Linear:
            continue
        prefix = f"model.{name}." if name else "model."
        w_idx = index.get(prefix + "weight")
        b_idx = index.get(prefix + "bias") if module.bias is not None else None
        if w_idx is None or owners.get(id(module.weight), 0) != 1 or (module.bias is not None and b_idx is None):
            continue
        found[name] = (module, w_idx, b_idx)
    return found


def per_sample_sq_norms(objective: Objective, batch: Any, at: Tensor | None = None) -> Tensor:
    """``‖∇ℓ_i(w)‖²`` for every sample of one prepared batch (see the module docstring)."""
    w = objective.w0 if at is None else at
    tensors = [t.detach() for t in unflatten(w, objective.shapes)]
    size = batch_size(batch)
    total = torch.zeros(size, dtype=objective.dtype, device=objective.device)
    ghost: set[int] = set()
    linear = _ghost_candidates(objective)
    if linear:
        ghost = _add_ghost_norms(objective, batch, tensors, linear, total)
    rest = [i for i in range(len(tensors)) if i not in ghost]
    if rest:
        total += _vmap_sq_norms(objective, batch, tensors, rest, size)
    return total


def _add_ghost_norms(
    objective: Objective, batch: Any, tensors: list[Tensor], linear: dict, total: Tensor
) -> set[int]:
    """Adds the ghost norms of the usable Linear layers to ``total``; returns their parameter indices."""
    captured: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in linear}
    handles = []
    for name, (module, _, _) in linear.items():

        def hook(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, name: str = name) -> None:
            captured[name].append((inputs[0].detach(), output))

        handles.append(module.register_forward_hook(hook))
    wanted = {i for _, wi, bi in linear.values() for i in (wi, bi) if i is not None}
    leaves = [t.clone().requires_grad_() if i in wanted else t for i, t in enumerate(tensors)]
    try:
        losses = objective.losses(leaves, batch)
    finally:
        for h in handles:
            h.remove()
    usable = [n for n, calls in captured.items() if len(calls) == 1 and calls[0][1].requires_grad]
    if not usable:
        return set()
    outputs = [captured[n][0][1] for n in usable]
    # In eval mode samples do not interact: the output gradients of Σ_i ℓ_i are the per-sample ones.
    grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True, materialize_grads=True)
    for n, d in zip(usable, grads):
        total += _linear_sq_norms(captured[n][0][0], d.detach(), linear[n][2] is not None).to(total.dtype)
    return {i for n in usable for i in (linear[n][1], linear[n][2]) if i is not None}


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
    numel = sum(t.numel() for t in rest_ts)
    in_dims = (None, tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch))
    chunk = max(1, PER_SAMPLE_ELEMENTS // max(1, numel))
    parts = []
    for start in range(0, size, chunk):
        part = tree_map(lambda t: t[start : start + chunk] if isinstance(t, Tensor) else t, batch)
        parts.append(vmap(sq_norm, in_dims=in_dims)(rest_ts, part))
    return torch.cat(parts)
