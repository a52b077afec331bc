"""Ghost norms: per-sample squared gradient norms of layer parameters from one batched pass.

While the loss is evaluated, a ``TorchFunctionMode`` records every call of a supported
function that takes a measured parameter as its weight or bias: ``F.linear``, ``F.conv2d``
(``groups=1``), ``F.layer_norm``, eval-mode ``F.batch_norm``, ``F.embedding`` and the
broadcast addition ``x + p`` (learned positions, biases). One backward pass gives each call's
output gradient ``δ``; the per-sample gradient of its parameters is a contraction of ``δ`` with
the call's input, and its squared norm is formed without materializing it where that is
cheaper (Goodfellow 2015; Li et al. 2022, "ghost clipping"; BackPACK's ``BatchL2Grad``).

A parameter is handled here only when it is provably exact to do so, else it falls back to
``vmap`` (``_per_sample.py``):

* it enters the loss through exactly one recorded call and no other operation (weight tying,
  a layer applied twice or a parameter used arithmetically fall back); plain self-attention
  (``nn.MultiheadAttention`` without masks) is rewritten so its projections are recorded
  (``_attention.py``);
* the call's output is not modified in place afterwards (``nn.ReLU(inplace=True)``), which
  would make ``δ`` the gradient of a different tensor;
* the call's sample axis is known: a second, one-sample pass must change exactly one axis of
  the call's input from ``B`` to 1 (so ``(T, B, E)`` sequence-first inputs are handled and a
  coincidence ``T == B`` cannot be mistaken for the batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from ._affine_batch_norm import batch_norm_arguments, eval_batch_norm
from ._attention import plain_self_attention, self_attention

# Per-sample intermediates (per-sample gradients, Gram matrices) are formed for a chunk of
# samples at a time, at most this many numbers.
PER_SAMPLE_ELEMENTS = 2**25

_ADD = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__}


@dataclass
class _Use:
    kind: str
    params: dict[str, int]  # role ("weight", "bias", "param") -> parameter index
    carrier: Tensor  # the tensor whose sample axis is the call's (input, or output for ``add``)
    output: Tensor
    version: int  # ``output._version`` right after the call
    extra: dict[str, Any] = field(default_factory=dict)


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name, default)


class _Recorder(TorchFunctionMode):
    """Records the supported calls on measured parameters and flags every other use."""

    def __init__(self, index: dict[int, int]) -> None:
        super().__init__()
        self.index = index  # id(parameter tensor) -> parameter index
        self.uses: list[_Use] = []
        self.other: set[int] = set()

    def _measured(self, t: Any) -> int | None:
        return self.index.get(id(t)) if isinstance(t, Tensor) else None

    def _scan(self, args: tuple, kwargs: dict) -> list[int]:
        """Indices of the measured parameters among the arguments (one level of lists and tuples).

        Called on every operation of the forward pass, so it avoids a full pytree walk.
        """
        found = []
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                if (i := self.index.get(id(a))) is not None:
                    found.append(i)
            elif isinstance(a, (list, tuple)):
                found.extend(i for t in a if isinstance(t, Tensor) and (i := self.index.get(id(t))) is not None)
        return found

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            attention = plain_self_attention(args, kwargs)
            if attention is not None:
                with self:  # record the projections inside
                    return self_attention(attention)
        out = func(*args, **kwargs)
        found = self._scan(args, kwargs)
        if not found:
            return out
        use = self._match(func, args, kwargs, out)
        if use is None:
            if any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves(out)):
                self.other.update(found)  # a use we cannot attribute to samples
            return out
        self.uses.append(use)
        self.other.update(set(found) - set(use.params.values()))  # e.g. a parameter fed in as an input
        return out

    def _match(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> _Use | None:
        if not isinstance(out, Tensor):
            return None
        m = self._measured
        if func is F.linear or func is torch.conv2d or func is F.conv2d:
            x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
            extra: dict[str, Any] = {}
            if func is not F.linear:
                extra = dict(
                    kernel=tuple(weight.shape[2:]), stride=_arg(args, kwargs, 3, "stride", 1),
                    padding=_arg(args, kwargs, 4, "padding", 0), dilation=_arg(args, kwargs, 5, "dilation", 1),
                )  # fmt: skip
                if _arg(args, kwargs, 6, "groups", 1) != 1 or isinstance(extra["padding"], str) or x.dim() != 4:
                    return None
            params = {"weight": m(weight), "bias": m(bias)}
            kind = "linear" if func is F.linear else "conv2d"
            return self._use(kind, params, x, out, extra)
        if func is F.layer_norm:
            x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
            params = {"weight": m(_arg(args, kwargs, 2, "weight")), "bias": m(_arg(args, kwargs, 3, "bias"))}
            eps = _arg(args, kwargs, 4, "eps", 1e-5)
            return self._use("layer_norm", params, x, out, dict(shape=tuple(shape), eps=eps))
        if func is F.batch_norm:
            a = batch_norm_arguments(args, kwargs)
            if a["training"] or a["running_mean"] is None or a["running_var"] is None:
                return None  # batch statistics: samples interact
            params = {"weight": m(a["weight"]), "bias": m(a["bias"])}
            extra = dict(mean=a["running_mean"].detach(), var=a["running_var"].detach(), eps=a["eps"])
            return self._use("batch_norm", params, a["input"], out, extra)
        if func is F.embedding:
            ids, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
            if _arg(args, kwargs, 3, "max_norm") is not None or _arg(args, kwargs, 5, "scale_grad_by_freq", False):
                return None
            pad = _arg(args, kwargs, 2, "padding_idx")
            extra = dict(padding_idx=None if pad is None else pad % weight.shape[0])  # F.embedding's own convention
            return self._use("embedding", {"weight": m(weight)}, ids, out, extra)
        if func in _ADD and len(args) == 2 and not kwargs:
            a, b = args
            if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or (m(a) is None) == (m(b) is None):
                return None
            param = a if m(a) is not None else b
            return self._use("add", {"param": m(param)}, out, out, dict(shape=tuple(param.shape)))
        return None

    @staticmethod
    def _use(kind: str, params: dict[str, int | None], carrier: Tensor, out: Tensor, extra: dict) -> _Use | None:
        present = {role: i for role, i in params.items() if i is not None}
        if not present:
            return None
        return _Use(kind, present, carrier, out, out._version, extra)


def _sample_axis(full: torch.Size, probe: torch.Size, size: int) -> int | None:
    """The one axis that is ``size`` in the full pass and 1 in the one-sample pass."""
    if len(full) != len(probe):
        return None
    changed = [i for i, (f, p) in enumerate(zip(full, probe)) if f != p]
    if len(changed) == 1 and full[changed[0]] == size and probe[changed[0]] == 1:
        return changed[0]
    return None


def _axis_fits(use: _Use, axis: int) -> bool:
    """Whether the formula for ``use`` applies with samples along ``axis``."""
    dims = use.carrier.dim()
    if use.kind == "linear":
        return axis != dims - 1  # not the feature axis
    if use.kind in ("conv2d", "batch_norm"):
        return axis == 0  # (B, C, ...)
    if use.kind == "layer_norm":
        return axis < dims - len(use.extra["shape"])  # not a normalized axis
    if use.kind == "add":  # the parameter is broadcast along the sample axis
        lead = dims - len(use.extra["shape"])
        return axis < lead or use.extra["shape"][axis - lead] == 1
    return True


def _record(losses_fn: Callable[[Any], Tensor], batch: Any, index: dict[int, int]) -> tuple[Tensor, _Recorder]:
    recorder = _Recorder(index)
    with recorder:
        losses = losses_fn(batch)
    return losses, recorder


def _sample_axes(
    losses_fn: Callable[[Any], Tensor], batch: Any, index: dict[int, int], uses: list[_Use], size: int, cache: dict
) -> list[int | None] | None:
    """The sample axis of every recorded call, from a one-sample pass (or ``cache``), or None.

    The axes depend on the model's code and the shapes, not on the values: a pass whose calls
    and shapes match a previous one (the next chunk of the same size) reuses its axes.
    """
    key = (size, tuple((u.kind, tuple(u.params.items()), tuple(u.carrier.shape)) for u in uses))
    if key not in cache:
        # With gradients on, as in the full pass: some modules take another path without them.
        one = tree_map(lambda t: t[:1] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)
        _, probe = _record(losses_fn, one, index)
        if [(u.kind, u.params) for u in uses] != [(u.kind, u.params) for u in probe.uses]:
            cache[key] = None  # the one-sample pass took another path: no reliable sample axes
        else:
            cache[key] = [_sample_axis(u.carrier.shape, p.carrier.shape, size) for u, p in zip(uses, probe.uses)]
    return cache[key]


def ghost_sq_norms(
    losses_fn: Callable[[Any], Tensor], batch: Any, leaves: list[Tensor], size: int, total: Tensor,
    axes_cache: dict | None = None,
) -> set[int]:
    """Adds ``‖∂ℓ_n/∂θ_i‖²`` over the parameters it can handle to ``total`` (B,); returns their indices.

    ``losses_fn(batch)`` evaluates the per-sample losses with the parameters ``leaves``
    (which require grad); ``size`` is the number of samples, at least 2. ``axes_cache`` (a dict
    kept between calls on chunks of one data set) saves the one-sample pass.
    """
    index = {id(t): i for i, t in enumerate(leaves)}
    losses, recorder = _record(losses_fn, batch, index)
    axes = _sample_axes(losses_fn, batch, index, recorder.uses, size, {} if axes_cache is None else axes_cache)
    if axes is None:
        return set()
    counts: dict[int, int] = {}
    for use in recorder.uses:
        for i in use.params.values():
            counts[i] = counts.get(i, 0) + 1
    chosen: list[tuple[_Use, int]] = []
    for use, axis in zip(recorder.uses, axes):
        exclusive = all(counts[i] == 1 and i not in recorder.other for i in use.params.values())
        intact = use.output._version == use.version and use.output.requires_grad  # not overwritten in place
        if axis is not None and exclusive and intact and _axis_fits(use, axis):
            chosen.append((use, axis))
    if not chosen:
        return set()
    # In eval mode samples do not interact: the output gradients of Σ_n ℓ_n are the per-sample ones.
    deltas = torch.autograd.grad(losses.sum(), [u.output for u, _ in chosen], allow_unused=True, materialize_grads=True)
    for (use, axis), delta in zip(chosen, deltas):
        total += _FORMULAS[use.kind](use, axis, delta.detach(), size).to(total.dtype)
    return {i for use, _ in chosen for i in use.params.values()}


# ------------------------------------------------------------------------------ per-call formulas
def by_sample_chunks(size: int, per_sample: int, fn: Callable[[slice], Tensor]) -> Tensor:
    """``fn`` on consecutive slices of the ``size`` samples, concatenated; a slice holds at most
    ``PER_SAMPLE_ELEMENTS // per_sample`` samples (``per_sample``: numbers formed per sample)."""
    chunk = max(1, PER_SAMPLE_ELEMENTS // max(1, per_sample))
    return torch.cat([fn(slice(start, start + chunk)) for start in range(0, size, chunk)])


def _rows(t: Tensor, axis: int, size: int) -> Tensor:
    """``t`` (features last) with its sample axis first, as ``(B, positions, features)``."""
    return t.movedim(axis, 0).reshape(size, -1, t.shape[-1])


def _outer_sq_norms(a: Tensor, d: Tensor) -> Tensor:
    """``‖Σ_t d_t a_tᵀ‖²`` per sample for ``a`` (B, T, n_in), ``d`` (B, T, n_out), in chunks of samples."""
    size, t, n_in = a.shape
    n_out = d.shape[2]
    if t == 1:
        return (a[:, 0] ** 2).sum(1) * (d[:, 0] ** 2).sum(1)
    if t * (n_in + n_out) <= n_in * n_out:  # the cheaper of the two contractions: Gram matrices

        def gram(part: slice) -> Tensor:
            ac, dc = a[part], d[part]
            return (torch.bmm(ac, ac.transpose(1, 2)) * torch.bmm(dc, dc.transpose(1, 2))).sum((1, 2))

        return by_sample_chunks(size, t * t, gram)

    def materialized(part: slice) -> Tensor:  # the (n_out, n_in) per-sample gradients themselves
        return (torch.bmm(d[part].transpose(1, 2), a[part]) ** 2).sum((1, 2))

    return by_sample_chunks(size, n_in * n_out, materialized)


def _bias_sq_norms(d: Tensor) -> Tensor:
    return (d.sum(1) ** 2).sum(1)


def _linear(use: _Use, axis: int, delta: Tensor, size: int) -> Tensor:
    a, d = _rows(use.carrier.detach(), axis, size), _rows(delta, axis, size)
    out = _outer_sq_norms(a, d) if "weight" in use.params else torch.zeros(size, dtype=d.dtype, device=d.device)
    return out + _bias_sq_norms(d) if "bias" in use.params else out


def _conv2d(use: _Use, axis: int, delta: Tensor, size: int) -> Tensor:
    e = use.extra
    d = delta.reshape(size, delta.shape[1], -1).transpose(1, 2)  # (B, L, out)
    out = torch.zeros(size, dtype=d.dtype, device=d.device)
    if "weight" in use.params:
        cols = F.unfold(use.carrier.detach(), e["kernel"], dilation=e["dilation"], padding=e["padding"], stride=e["stride"])
        out = out + _outer_sq_norms(cols.transpose(1, 2), d)
    return out + _bias_sq_norms(d) if "bias" in use.params else out


def _normalized(use: _Use, x: Tensor) -> Tensor:
    e = use.extra
    if use.kind == "layer_norm":
        return F.layer_norm(x, e["shape"], None, None, e["eps"])
    return eval_batch_norm(x, e["mean"], e["var"], e["eps"])


def _norm_layer(use: _Use, axis: int, delta: Tensor, size: int) -> Tensor:
    """Per-channel (batch norm) or per-feature (layer norm) affine parameters: ``Σ δ·x̂`` and ``Σ δ``."""
    x = use.carrier.detach()
    if use.kind == "batch_norm":  # (B, C, *): channels second
        flat = lambda t: t.reshape(size, t.shape[1], -1).transpose(1, 2)  # noqa: E731 - (B, positions, C)
    else:
        features = math.prod(use.extra["shape"])
        flat = lambda t: t.movedim(axis, 0).reshape(size, -1, features)  # noqa: E731
    d = flat(delta)
    out = torch.zeros(size, dtype=d.dtype, device=d.device)
    if "weight" in use.params:
        out = out + ((d * flat(_normalized(use, x))).sum(1) ** 2).sum(1)
    return out + _bias_sq_norms(d) if "bias" in use.params else out


def _embedding(use: _Use, axis: int, delta: Tensor, size: int) -> Tensor:
    """``Σ_{t,t'} [id_t = id_t' ≠ padding] δ_t·δ_t'``: rows hit by the same token add up."""
    ids = use.carrier.movedim(axis, 0).reshape(size, -1)
    d = delta.movedim(axis, 0).reshape(size, ids.shape[1], -1)
    pad = use.extra["padding_idx"]

    def sq_norms(part: slice) -> Tensor:
        ic, dc = ids[part], d[part]
        same = ic[:, :, None] == ic[:, None, :]
        if pad is not None:  # the padding row gets no gradient
            same &= (ic != pad)[:, :, None]
        return (torch.bmm(dc, dc.transpose(1, 2)) * same).sum((1, 2))

    return by_sample_chunks(size, ids.shape[1] ** 2, sq_norms)


def _add(use: _Use, axis: int, delta: Tensor, size: int) -> Tensor:
    """``x + p`` with ``p`` broadcast over the samples: ``δ`` summed over the axes ``p`` is broadcast along."""
    shape = use.extra["shape"]
    lead = delta.dim() - len(shape)
    summed = [j for j in range(delta.dim()) if j != axis and (j < lead or shape[j - lead] == 1)]
    g = delta.sum(dim=summed, keepdim=True) if summed else delta
    return (g.movedim(axis, 0).reshape(size, -1) ** 2).sum(1)


_FORMULAS: dict[str, Callable[[_Use, int, Tensor, int], Tensor]] = {
    "linear": _linear, "conv2d": _conv2d, "layer_norm": _norm_layer, "batch_norm": _norm_layer,
    "embedding": _embedding, "add": _add,
}  # fmt: skip
