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
