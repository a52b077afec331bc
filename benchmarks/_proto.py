"""Hessian-vector product strategies timed beside ``Objective`` (section 1) but not adopted.

Each was measured before it was turned down: the batched block of second backward passes
(``is_grads_batched``) is no faster than the sequential block on CPU and is timed on CUDA only;
forward-over-reverse products cost more than the double backward on both devices. The
prototypes that won (kept gradient graphs, eval-mode BatchNorm as an affine map, in-place
accumulation) moved into ``lightning_flatness/functional``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flatness.functional import Objective
from lightning_flatness.functional import unflatten


def hvps_batched(objective: Objective, vectors: Tensor) -> Tensor:
    """Like :meth:`Objective.hvps`, but the ``K`` second backward passes run as one vmapped pass.

    ``torch.autograd.grad(..., is_grads_batched=True)`` vectorizes the double backward over the
    rows of ``vectors`` (``torch.func.vmap`` over the backward graph), so a block of probes costs
    one forward, one backward and one batched second backward, with ``K``-times larger matrix
    products instead of ``K`` small ones.
    """
    leaves = objective.leaves()
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
    return len(batch[1])  # type: ignore[index]  # the benchmarks' batches are (x, y)
