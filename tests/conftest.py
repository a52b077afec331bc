"""Tiny float64 models, data and exact oracles shared by the estimator tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# Tiny models: one intra-op thread avoids spin-wait overhead that dominates at this size.
torch.set_num_threads(1)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_cnn() -> nn.Module:
    """Conv -> BatchNorm -> ReLU -> Linear, with non-trivial BatchNorm running statistics."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    bn = model[1]
    bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
    bn.running_var.copy_(torch.tensor([1.5, 0.7]))
    bn.weight.data.copy_(torch.tensor([1.2, 0.8]))
    return model


def mlp_batches(sizes=(5, 7, 8), seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        for n in sizes
    ]


def cnn_batches(sizes=(4, 6), seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        for n in sizes
    ]


def rebatch(batches, sizes):
    """The same samples split into batches of other sizes."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert sum(sizes) == len(x)
    return list(zip(torch.split(x, list(sizes)), torch.split(y, list(sizes))))


@pytest.fixture(params=["mlp", "cnn"])
def model_and_batches(request):
    if request.param == "mlp":
        return tiny_mlp(), mlp_batches()
    return tiny_cnn(), cnn_batches()


# ----------------------------------------------------------------------------- oracles
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


class Quadratic(nn.Module):
    """ℓ_i(w) = ½ (w − x_i)ᵀ A (w − x_i): Hessian A everywhere, third derivative 0."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = a
        self.w = nn.Parameter(torch.linspace(-1, 1, a.shape[0], dtype=a.dtype))

    def forward(self, x):
        d = self.w - x
        return 0.5 * torch.einsum("bi,ij,bj->b", d, self.a, d)


def model_output_loss(model, batch):
    """A custom loss_fn whose per-sample loss is the model's own output."""
    return model(batch)


def quadratic_batches(dim: int, sizes=(3, 5), seed: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g, dtype=torch.float64) for n in sizes]


def random_symmetric(dim: int, seed: int = 5, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return (m + m.T) / 2 + shift * torch.eye(dim, dtype=torch.float64)
