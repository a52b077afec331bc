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
    from lightning_flatness.functional._per_sample import batch_size as _batch_size

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
