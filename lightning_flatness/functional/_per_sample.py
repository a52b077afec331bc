"""Per-sample squared gradient norms ``‖∇ℓ_i(w)‖²``, by the cheapest path that works on the model.

The measured parameters are split in two, and their squared norms summed:

* **Ghost norms** (``_ghost.py``) for the parameters of linear, 2-D convolution, layer norm,
  eval-mode batch norm and embedding calls and of broadcast additions: from one batched
  forward and backward, ``‖∂ℓ_n/∂W‖² = ‖Σ_t δ_{n,t} a_{n,t}ᵀ‖²`` and its relatives, no
  per-sample gradient formed where a Gram matrix is cheaper (Goodfellow 2015; Li et al. 2022;
  BackPACK's ``BatchL2Grad``).
* Every other parameter (attention's packed projections, recurrent layers, group norm, custom
  layers, shared weights, …) by one of two fallbacks:

  - ``"vmap"``: ``torch.func.vmap`` over ``torch.func.grad``, in sub-chunks of at most
    ``2**25`` gradient entries: all samples at once, but it needs a batching rule for every
    operation of the forward pass, which ``nn.RNN``/``GRU``/``LSTM``,
    ``nn.Embedding(max_norm=...)``, a nested-tensor ``nn.TransformerEncoder`` with a padding
    mask and ``torch.utils.checkpoint(use_reentrant=True)`` lack;
  - ``"loop"``: one forward and ``.backward()`` per sample: works wherever the model trains,
    in the memory of one sample's graph, at the speed of a Python loop.

Which path a model takes is decided once (:func:`per_sample_path`), on two samples of its first
batch, and kept for the model: never by catching a failure at every measurement.

Every path assumes samples do not interact in the forward pass, which holds in eval mode
(BatchNorm uses running statistics).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from ..validation import check_choice
from ._ghost import by_sample_chunks, ghost_sq_norms
from ._params import unflatten

if TYPE_CHECKING:
    from .objective import Objective

PER_SAMPLE = ("auto", "vmap", "loop")
# Samples of the first batch the path is tried on (two, so ghost norms run and a sample axis shows).
TRIAL_SAMPLES = 2


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


def check_per_sample(per_sample: str) -> str:
    """``per_sample`` if it names a path choice: ``"auto"``, ``"vmap"`` or ``"loop"``."""
    return check_choice("per_sample", per_sample, PER_SAMPLE)


@dataclass(frozen=True)
class PerSamplePath:
    """How one model's per-sample norms are computed.

    ``ghost``: ghost norms for the parameters of supported layers (``False`` where the ghost
    pass itself fails, e.g. under ``checkpoint(use_reentrant=True)``, which refuses
    ``torch.autograd.grad``); ``fallback``: ``"vmap"`` or ``"loop"`` for every other parameter;
    ``covered``: ghost norms covered every parameter on the trial samples (no fallback ran).
    """

    ghost: bool
    fallback: str
    covered: bool = False

    @property
    def name(self) -> str:
        """``"ghost"``, ``"ghost+vmap"``, ``"ghost+loop"``, ``"vmap"`` or ``"loop"``: what runs."""
        if self.covered:
            return "ghost"
        return f"ghost+{self.fallback}" if self.ghost else self.fallback


# model -> {(choice, loss, dtype, device, parameters, batch structure): path}; dropped with the model.
_PATHS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, PerSamplePath]] = weakref.WeakKeyDictionary()


def per_sample_path(objective: Objective, batch: Any, per_sample: str = "auto") -> PerSamplePath:
    """The path for ``objective``'s model, tried on two samples of ``batch`` the first time, then kept.

    ``per_sample="auto"``: ghost norms where the ghost pass works, and for the other parameters
    ``vmap`` where it runs and agrees with a loop on the trial samples, else the loop.
    ``"vmap"`` or ``"loop"`` force the fallback; a forced ``"vmap"`` that fails on the trial
    samples raises a ``ValueError`` saying so. The choice is kept per model, loss, dtype,
    device, measured parameters and batch structure, so every later measurement reuses it.
    """
    per_sample = check_per_sample(per_sample)
    paths = _PATHS.setdefault(objective.model, {})
    key = _key(objective, batch, per_sample)
    if key not in paths:
        paths[key] = _try_paths(objective, batch, per_sample)
    return paths[key]


def _key(objective: Objective, batch: Any, per_sample: str) -> tuple:
    key = (per_sample, objective.loss_fn, objective.dtype, objective.device, tuple(objective.names))
    return key + _structure(batch)


def _keep(objective: Objective, batch: Any, per_sample: str, path: PerSamplePath) -> None:
    """Replaces the kept path (a ``vmap`` that failed on a later batch gives way to the loop)."""
    _PATHS.setdefault(objective.model, {})[_key(objective, batch, per_sample)] = path


def _structure(batch: Any) -> tuple:
    """What of a batch a path depends on: its nesting and each tensor's dtype and rank (not its sizes)."""
    leaves, spec = tree_flatten(batch)
    return str(spec), tuple((t.dtype, t.dim()) if isinstance(t, Tensor) else type(t).__name__ for t in leaves)


def _try_paths(objective: Objective, batch: Any, per_sample: str) -> PerSamplePath:
    """Runs the ghost pass and the fallbacks on the first :data:`TRIAL_SAMPLES` samples of ``batch``.

    Each failure of ghost norms or ``vmap`` is an unsupported operation, since the loop, run last,
    raises the model's or loss's own error if the loss cannot be evaluated at all.
    """
    trial = tree_map(lambda t: t[:TRIAL_SAMPLES] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)
    size = batch_size(trial)
    tensors = [t.detach() for t in unflatten(objective.w0, objective.shapes)]
    ghost, covered = True, set()
    try:
        scratch = torch.zeros(size, dtype=objective.dtype, device=objective.device)
        covered = _ghost_part(objective, trial, tensors, size, scratch)
    except Exception:  # noqa: BLE001 - any failure: no ghost norms for this model
        ghost = False
    rest = [i for i in range(len(tensors)) if i not in covered]
    if not rest:
        return PerSamplePath(True, "vmap" if per_sample == "auto" else per_sample, covered=True)
    if per_sample == "loop":
        return PerSamplePath(ghost, "loop")
    vmapped, failure = _attempt(lambda: _vmap_sq_norms(objective, trial, tensors, rest, size))
    if per_sample == "vmap":
        if failure is not None:
            raise ValueError(
                f"per_sample='vmap' cannot compute this model's per-sample gradients: torch.func.vmap fails with "
                f"{type(failure).__name__}: {failure}. Pass per_sample='auto' or 'loop' (a loop over samples)."
            ) from failure
        return PerSamplePath(ghost, "vmap")
    looped = _loop_sq_norms(objective, trial, tensors, rest, size)
    return PerSamplePath(ghost, "vmap" if vmapped is not None and _agree(vmapped, looped) else "loop")


def _attempt(fn: Callable[[], Tensor]) -> tuple[Tensor | None, Exception | None]:
    """``(fn(), None)``, or ``(None, the exception)`` it raised; its warnings (e.g. functorch's "no
    batching rule" before it fails) are the trial's, not the user's, and are dropped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(), None
    except Exception as err:  # noqa: BLE001 - the caller reports or falls back
        return None, err


def _agree(a: Tensor, b: Tensor) -> bool:
    """Whether two paths' norms are the same numbers up to rounding (a silently wrong batching rule is not)."""
    rtol = 1e-8 if a.dtype == torch.float64 else 1e-2  # float32 on GPUs may use TF32 matmuls
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max())))


def per_sample_sq_norms(objective: Objective, batch: Any, at: Tensor | None = None, per_sample: str = "auto") -> Tensor:
    """``‖∇ℓ_i(w)‖²`` for every sample of one prepared batch, by :func:`per_sample_path`'s path."""
    path = per_sample_path(objective, batch, per_sample)
    w = objective.w0 if at is None else at
    tensors = [t.detach() for t in unflatten(w, objective.shapes)]
    size = batch_size(batch)
    total = torch.zeros(size, dtype=objective.dtype, device=objective.device)
    ghost: set[int] = set()
    if path.ghost:
        ghost = _ghost_part(objective, batch, tensors, size, total)
    rest = [i for i in range(len(tensors)) if i not in ghost]
    if not rest:
        return total
    if path.fallback == "vmap":
        try:
            return total + _vmap_sq_norms(objective, batch, tensors, rest, size)
        except Exception:
            if per_sample != "auto":
                raise
            # The trial samples did not reach every operation (a branch taken only for some batch shapes): from
            # now on this model takes the loop.
            _keep(objective, batch, per_sample, PerSamplePath(path.ghost, "loop"))
    return total + _loop_sq_norms(objective, batch, tensors, rest, size)


def _ghost_part(objective: Objective, batch: Any, tensors: list[Tensor], size: int, total: Tensor) -> set[int]:
    """Adds the ghost norms of the parameters they cover to ``total``; returns their indices (none for one sample)."""
    if size < 2:
        return set()
    leaves = [t.clone().requires_grad_() for t in tensors]
    return ghost_sq_norms(lambda b: objective.losses(leaves, b), batch, leaves, size, total, objective.ghost_axes)


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


def _loop_sq_norms(objective: Objective, batch: Any, tensors: list[Tensor], rest: list[int], size: int) -> Tensor:
    """``Σ_{i ∈ rest} ‖∂ℓ_n/∂θ_i‖²`` per sample, one forward and backward per sample.

    ``.backward()`` inside the substitution (:meth:`Objective.backward_losses`) rather than
    ``torch.autograd.grad``: reentrant checkpointing supports only the former. The parameters are copies, so an in-place update in the forward pass (the row
    renormalization of ``nn.Embedding(max_norm=...)``) changes them as it would the model's,
    never the objective's ``w0``.
    """
    leaves = [tensors[i].clone().requires_grad_() for i in rest]
    ts = list(tensors)
    for i, t in zip(rest, leaves):
        ts[i] = t
    out = torch.empty(size, dtype=objective.dtype, device=objective.device)
    for n in range(size):
        sample = tree_map(lambda t: t[n : n + 1].detach() if isinstance(t, Tensor) and t.dim() > 0 else t, batch)
        for t in leaves:
            t.grad = None
        objective.backward_losses(ts, sample)  # no gradient reaches a parameter unused by this sample: 0
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        out[n] = sum(((t.grad**2).sum() for t in leaves if t.grad is not None), zero)
    return out
