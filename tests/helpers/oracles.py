"""Exact oracles: the dense Hessian and per-sample gradients by a loop over samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _split(w, shapes):
    out, i = [], 0
    for s in shapes:
        n = s.numel()
        out.append(w[i : i + n].view(s))
        i += n
    return out


def dense_hessian(model, batches, reduction_loss=F.cross_entropy) -> torch.Tensor:
    """Exact ∇²L via torch.autograd.functional.hessian of the sample-mean loss in eval mode."""
    named = trainable(model)
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    n_total = sum(len(b[1]) for b in batches)
    was_training = model.training
    model.eval()

    def objective(w):
        state = dict(zip(names, _split(w, shapes)))
        return sum(reduction_loss(functional_call(model, state, (x,)), y, reduction="sum") for x, y in batches) / n_total

    h = torch.autograd.functional.hessian(objective, w0)
    model.train(was_training)
    return h


def per_sample_grads_loop(model, x, y, loss=F.cross_entropy) -> torch.Tensor:
    """(B, P) per-sample gradients with a Python loop over samples, eval mode."""
    params = [p for _, p in trainable(model)]
    was_training = model.training
    model.eval()
    rows = []
    for i in range(len(x)):
        out = loss(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]))
    model.train(was_training)
    return torch.stack(rows)
