"""Tiny float64 models and their data, shared by the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn


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


def relu_mlp(bias: bool = True) -> nn.Module:
    """``4 → 6 → 3`` with a ReLU: positively homogeneous in each layer's weights (and biases)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, bias=bias), nn.ReLU(), nn.Linear(6, 3, bias=bias)).double()


def rescaled_twin(model: nn.Sequential, alpha: float) -> nn.Sequential:
    """The same function with other weights (Dinh et al. 2017): layer 0's weights and bias times
    ``alpha``, layer 2's weights divided by it (ReLU(αz) = αReLU(z) for α > 0)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.mul_(alpha)
        if twin[0].bias is not None:
            twin[0].bias.mul_(alpha)
        twin[2].weight.div_(alpha)
    return twin


def mostly_zero_labels(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels that are 0 for about half the samples: a mean gradient above the noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.where(torch.rand(n, generator=g) < 0.5, 0, torch.randint(0, 3, (n,), generator=g))
