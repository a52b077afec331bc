"""Prototype of a leaner ``Objective.hvps``, timed beside the real one (section 1).

A candidate fix for ``lightning_flatness/functional/_objective.py`` measured here before it is
proposed: it computes the same products with the same passes, but

* accumulates each product per parameter tensor in place instead of flattening every chunk's
  product into a fresh ``(P,)`` vector and adding it into a zero-initialized ``(K, P)`` buffer;
* flattens once at the end, writing straight into the output rows;
* checks finiteness with one float64 reduction (``isfinite(total.sum(dtype=float64))``: a NaN or
  inf anywhere makes the sum non-finite, and float64 cannot overflow on float32 inputs) instead
  of ``isfinite(total).all()``, which makes four passes over ``K·P`` numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flatness.functional._objective import Objective
from lightning_flatness.functional._params import unflatten

DESCRIPTION = "in-place per-tensor accumulation, one flatten, one-pass finiteness check"


def hvps(objective: Objective, vectors: Tensor) -> Tensor:
    """``∇²L(w) v`` for each row of ``vectors``, like :meth:`Objective.hvps` (no ``at``)."""
    leaves = objective._leaves(None)
    vs = [unflatten(v, objective.shapes) for v in vectors]
    totals: list[list[Tensor] | None] = [None] * len(vs)
    count = 0
    for batch in objective.iter_batches():
        losses = objective.losses(leaves, batch)
        g = torch.autograd.grad(losses.sum(), leaves, create_graph=True, allow_unused=True, materialize_grads=True)
        for k, v in enumerate(vs):
            hv = torch.autograd.grad(
                g, leaves, grad_outputs=v, retain_graph=k + 1 < len(vs), allow_unused=True, materialize_grads=True
            )
            acc = totals[k]
            if acc is None:
                totals[k] = list(hv)
            else:
                for a, h in zip(acc, hv):
                    a.add_(h)
        count += losses.numel()
    out = torch.empty_like(vectors)
    for k, acc in enumerate(totals):
        assert acc is not None
        torch.cat([t.reshape(-1) for t in acc], out=out[k])
    out /= count
    if not torch.isfinite(out.sum(dtype=torch.float64)):
        raise ValueError("loss_fn produced a non-finite Hessian-vector product on these batches (NaN or inf).")
    return out


def hvps_batched(objective: Objective, vectors: Tensor) -> Tensor:
    """Like :func:`hvps`, but the ``K`` second backward passes run as one vmapped pass.

    ``torch.autograd.grad(..., is_grads_batched=True)`` vectorizes the double backward over the
    rows of ``vectors`` (``torch.func.vmap`` over the backward graph), so a block of probes costs
    one forward, one backward and one batched second backward, with ``K``-times larger matrix
    products instead of ``K`` small ones.
    """
    leaves = objective._leaves(None)
    k = vectors.shape[0]
    rows, offset = [], 0
    for shape in objective.shapes:
        n = shape.numel()
        rows.append(vectors[:, offset : offset + n].reshape(k, *shape))
        offset += n
    totals: list[Tensor] | None = None
    count = 0
    for batch in objective.iter_batches():
        losses = objective.losses(leaves, batch)
        g = torch.autograd.grad(losses.sum(), leaves, create_graph=True, allow_unused=True, materialize_grads=True)
        hv = torch.autograd.grad(g, leaves, grad_outputs=rows, is_grads_batched=True, allow_unused=True, materialize_grads=True)
        if totals is None:
            totals = list(hv)
        else:
            for a, h in zip(totals, hv):
                a.add_(h)
        count += losses.numel()
    assert totals is not None
    out = torch.cat([t.reshape(k, -1) for t in totals], dim=1)
    out /= count
    if not torch.isfinite(out.sum(dtype=torch.float64)):
        raise ValueError("loss_fn produced a non-finite Hessian-vector product on these batches (NaN or inf).")
    return out


# ----------------------------------------------------------------------------------------------
# Per-sample squared gradient norms with the "ghost norm" of linear layers (a candidate fast path
# for Objective.per_sample_sq_norms / fisher_trace).


def _ghost_linear_norms(a: Tensor, d: Tensor, bias: bool) -> Tensor:
    """Per-sample ``‖∂ℓ_n/∂W‖² (+ ‖∂ℓ_n/∂b‖²)`` of ``y = a Wᵀ + b`` from inputs ``a`` and output grads ``d``.

    ``a``: (B, ..., in), ``d``: (B, ..., out). Without extra dims ``∂ℓ_n/∂W = d_n a_nᵀ`` and its
    squared norm is ``‖d_n‖²‖a_n‖²``; with ``T`` positions it is ``Σ_tt' (a_t·a_t')(d_t·d_t')``
    (cost ``T²(in+out)``) or, when cheaper, the materialized ``Σ_t d_t a_tᵀ`` (cost ``T·in·out``).
    """
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


def ghost_sq_norms(objective: Objective, batch: object) -> Tensor:
    """``‖∇ℓ_i(w)‖²`` per sample, like :meth:`Objective.per_sample_sq_norms` (at ``w0``).

    ``nn.Linear`` layers whose parameters are measured, not shared with another module, and whose
    ``forward`` runs once per forward pass get their per-sample norms from one ordinary batched
    forward and backward (inputs captured by a forward hook, output gradients by ``autograd.grad``
    w.r.t. the captured outputs): no per-sample gradient of theirs is materialized. Every other
    measured parameter goes through ``vmap(grad)`` as before, with the linear layers' parameters
    held fixed. Exact (no approximation), and in eval mode samples do not interact, so the output
    gradients of the summed loss are the per-sample ones.
    """
    from torch import nn
    from torch.func import grad, vmap
    from torch.utils._pytree import tree_map

    from lightning_flatness.functional._objective import _PER_SAMPLE_ELEMENTS, _batch_size
    from lightning_flatness.functional._params import unflatten as unflat

    index = {name: i for i, name in enumerate(objective.names)}
    owners: dict[int, int] = {}
    for module in objective.model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    linear: dict[str, tuple[nn.Module, int, int | None]] = {}
    for mod_name, module in objective.model.named_modules():
        if type(module) is nn.Linear:  # subclasses (e.g. MultiheadAttention.out_proj) may be used functionally
            w_key = f"model.{mod_name}.weight" if mod_name else "model.weight"
            b_key = f"model.{mod_name}.bias" if mod_name else "model.bias"
            if w_key in index and owners.get(id(module.weight), 0) == 1:
                b_idx = index.get(b_key) if module.bias is not None else None
                if module.bias is not None and b_idx is None:
                    continue  # a frozen bias with a measured weight: keep it simple, use vmap
                linear[mod_name] = (module, index[w_key], b_idx)
    ghost_idx = {i for _, wi, bi in linear.values() for i in (wi, bi) if i is not None}
    tensors = [t.detach() for t in unflat(objective.w0, objective.shapes)]
    size = _batch_size(batch)
    total = torch.zeros(size, dtype=objective.dtype, device=objective.device)

    if linear:
        captured: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in linear}
        handles = []
        for name, (module, _, _) in linear.items():

            def hook(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, name: str = name) -> None:
                captured[name].append((inputs[0].detach(), output))

            handles.append(module.register_forward_hook(hook))
        try:
            leaves = [t.requires_grad_() if i in ghost_idx else t for i, t in enumerate(tensors)]
            losses = objective.losses(leaves, batch)
        finally:
            for h in handles:
                h.remove()
            for t in tensors:
                t.requires_grad_(False)
        usable = [n for n, calls in captured.items() if len(calls) == 1 and calls[0][1].requires_grad]
        if usable:
            outs = [captured[n][0][1] for n in usable]
            grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True, materialize_grads=True)
            for n, d in zip(usable, grads):
                a = captured[n][0][0]
                total += _ghost_linear_norms(a, d.detach(), linear[n][2] is not None)
        ghost_idx = {i for n in usable for i in (linear[n][1], linear[n][2]) if i is not None}

    rest = [i for i in range(len(tensors)) if i not in ghost_idx]
    if rest:
        fixed = list(tensors)

        def sample_loss(rest_ts: list[Tensor], sample: object) -> Tensor:
            ts = list(fixed)
            for i, t in zip(rest, rest_ts):
                ts[i] = t
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample)
            return objective.losses(ts, one).sum()

        def sq_norm(rest_ts: list[Tensor], sample: object) -> Tensor:
            return sum((g**2).sum() for g in grad(sample_loss)(rest_ts, sample))

        rest_ts = [tensors[i] for i in rest]
        numel = sum(t.numel() for t in rest_ts)
        in_dims = (None, tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch))
        chunk = max(1, _PER_SAMPLE_ELEMENTS // max(1, numel))
        parts = []
        for start in range(0, size, chunk):
            part = tree_map(lambda t: t[start : start + chunk] if isinstance(t, Tensor) else t, batch)
            parts.append(vmap(sq_norm, in_dims=in_dims)(rest_ts, part))
        total += torch.cat(parts)
    return total


def fisher_trace_ghost(model: "torch.nn.Module", batches: list) -> float:
    """``fisher_trace(kind="empirical")`` through :func:`ghost_sq_norms`."""
    from lightning_flatness.functional import measurement_mode

    with measurement_mode(model):
        objective = Objective(model, batches)
        total, count = 0.0, 0
        for batch in objective.iter_batches():
            sq = ghost_sq_norms(objective, batch)
            total += sq.sum(dtype=torch.float64).item()
            count += sq.numel()
    return total / count


# ----------------------------------------------------------------------------------------------
# Other Hessian-vector product strategies, for comparison in section 1.


def hvp_forward_over_reverse(objective: Objective, vector: Tensor) -> Tensor:
    """``∇²L v`` as ``jvp(grad(L), (w,), (v,))`` (forward-mode over reverse-mode, Pearlmutter)."""
    from torch.func import grad, jvp

    tensors = [t.detach() for t in unflatten(objective.w0, objective.shapes)]
    vs = unflatten(vector, objective.shapes)
    total = None
    count = 0
    for batch in objective.iter_batches():
        def loss(ts: list[Tensor]) -> Tensor:
            return objective.losses(ts, batch).sum()

        _, hv = jvp(grad(loss), (tensors,), (vs,))
        flat = torch.cat([h.reshape(-1) for h in hv])
        total = flat if total is None else total.add_(flat)
        count += _n(batch)
    assert total is not None
    return total / count


def _n(batch: object) -> int:
    from lightning_flatness.functional._objective import _batch_size

    return _batch_size(batch)


class CachedHVP:
    """HVPs that keep every chunk's first-backward graph between calls (PyHessian's single-batch trick).

    The forward pass and the backward pass with ``create_graph=True`` run once, at construction;
    each product then costs one second backward pass per chunk. Memory grows with the number of
    chunks (every chunk's graph is held), so this only suits a subsample that fits in a memory
    budget.
    """

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.leaves = objective._leaves(None)
        self.grads = []
        self.count = 0
        for batch in objective.iter_batches():
            losses = objective.losses(self.leaves, batch)
            self.grads.append(
                torch.autograd.grad(losses.sum(), self.leaves, create_graph=True, allow_unused=True, materialize_grads=True)
            )
            self.count += losses.numel()

    def __call__(self, vector: Tensor) -> Tensor:
        vs = unflatten(vector, self.objective.shapes)
        acc: list[Tensor] | None = None
        for g in self.grads:
            hv = torch.autograd.grad(g, self.leaves, grad_outputs=vs, retain_graph=True, allow_unused=True, materialize_grads=True)
            if acc is None:
                acc = list(hv)
            else:
                for a, h in zip(acc, hv):
                    a.add_(h)
        assert acc is not None
        return torch.cat([a.reshape(-1) for a in acc]) / self.count


# ----------------------------------------------------------------------------------------------
# Eval-mode BatchNorm as an explicit affine map, so its double backward is a few products.


class AffineBatchNorm(torch.overrides.TorchFunctionMode):
    """Inside, ``F.batch_norm(..., training=False)`` runs as ``x * scale + shift``.

    With running statistics, batch norm is the per-channel affine map
    ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean * scale``. Autograd's double
    backward of ``native_batch_norm_backward`` is a long generic formula over the whole
    activation tensor (it also serves training mode); of the explicit form it is two products.
    Same values, same gradients.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.nn.functional.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            if not bound.get("training", False) and bound.get("running_mean") is not None:
                x = bound["input"]
                eps = bound.get("eps", 1e-5)
                scale = torch.rsqrt(bound["running_var"] + eps)
                if bound.get("weight") is not None:
                    scale = scale * bound["weight"]
                shift = -bound["running_mean"] * scale
                if bound.get("bias") is not None:
                    shift = shift + bound["bias"]
                shape = (1, -1) + (1,) * (x.dim() - 2)
                return x * scale.reshape(shape) + shift.reshape(shape)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# grad_cosine_regret in O(P) memory: every pair statistic from running sums.


def grad_cosine_regret_streaming(model: "torch.nn.Module", batches: list) -> tuple[float, float, float]:
    """``(regret, regret_sgd, cosine)`` of :func:`grad_cosine_regret` with two running sums.

    With ``n_i = ‖g_i‖``, ``S = Σ g_i/n_i``, ``G = Σ g_i``, ``A = Σ n_i``, ``Q = Σ n_i²`` over the
    ``M`` mini-batches, the sums over ordered pairs ``i ≠ j`` are
    ``Σ cos = ‖S‖² − M``, ``Σ n_j(1 − cos) = M·A − S·G`` and ``Σ (n_j² − g_i·g_j) = M·Q − ‖G‖²``;
    each is divided by ``M(M−1)``. Memory: two float64 flat vectors instead of ``M``.
    """
    from lightning_flatness.functional import measurement_mode
    from lightning_flatness.functional._params import flatten

    with measurement_mode(model):
        objective = Objective(model, batches)
        leaves = objective._leaves(None)
        s = g_sum = None
        a = q = 0.0
        m = 0
        for batch in objective.iter_batches():
            losses = objective.losses(leaves, batch)
            g = flatten(torch.autograd.grad(losses.mean(), leaves, allow_unused=True, materialize_grads=True))
            g = g.to(torch.float64)
            n = g.norm().item()
            if s is None:
                s, g_sum = g / n, g.clone()
            else:
                s.add_(g, alpha=1 / n)
                g_sum.add_(g)
            a, q, m = a + n, q + n * n, m + 1
    assert s is not None and g_sum is not None and m >= 2
    pairs = m * (m - 1)
    cosine = ((s @ s).item() - m) / pairs
    regret = (m * a - (s @ g_sum).item()) / pairs
    regret_sgd = (m * q - (g_sum @ g_sum).item()) / pairs
    return regret, regret_sgd, cosine
