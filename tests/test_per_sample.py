"""Per-sample squared gradient norms: ghost norms for Linear layers and the vmap fallback."""

import pytest
import torch
from torch import nn

from conftest import per_sample_grads_loop
from lightning_flatness.functional import fisher_trace
from lightning_flatness.functional import _per_sample


class SequenceModel(nn.Module):
    """Linear layers applied per position (T = 5), so ghost norms take the Gram-matrix form."""

    def __init__(self, width: int = 3, hidden: int = 40) -> None:
        super().__init__()
        self.embed = nn.Linear(width, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.mix(h))
        return self.head(h.mean(1))


class ReusedLinear(nn.Module):
    """The same Linear called twice per forward: must fall back to vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _models():
    torch.manual_seed(0)
    frozen_bias = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    frozen_bias[0].bias.requires_grad_(False)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    tied[2].weight = tied[0].weight  # a weight shared by two modules: vmap for both
    return {
        "sequence": (SequenceModel().double(), (2, 5, 3)),
        "reused": (ReusedLinear().double(), (2, 4)),
        "frozen_bias": (frozen_bias, (2, 4)),
        "tied": (tied, (2, 4)),
    }


@pytest.mark.parametrize("name", ["sequence", "reused", "frozen_bias", "tied"])
def test_sq_norms_equal_the_per_sample_loop(name):
    model, shape = _models()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, *shape[1:], generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    loop = per_sample_grads_loop(model, x, y).pow(2).sum(1)
    assert fisher_trace(model, [(x, y)]).value == pytest.approx(loop.mean().item(), rel=1e-10)


def test_ghost_path_is_taken_for_plain_linear_layers(monkeypatch):
    """An MLP needs no vmap at all; the test fails if the fast path silently stops being used."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    def no_vmap(*args, **kwargs):
        raise AssertionError("vmap path used")

    monkeypatch.setattr(_per_sample, "_vmap_sq_norms", no_vmap)
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    loop = per_sample_grads_loop(model, x, y).pow(2).sum(1)
    assert fisher_trace(model, [(x, y)]).value == pytest.approx(loop.mean().item(), rel=1e-10)


def test_linear_sq_norms_forms_agree():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    d = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    explicit = torch.einsum("bto,bti->boi", d, a).pow(2).sum((1, 2)) + d.sum(1).pow(2).sum(1)
    assert torch.allclose(_per_sample._linear_sq_norms(a, d, bias=True), explicit, rtol=1e-12)
    # wide layers take the Gram-matrix form instead of the materialized product
    a_wide = torch.randn(3, 2, 50, generator=g, dtype=torch.float64)
    d_wide = torch.randn(3, 2, 40, generator=g, dtype=torch.float64)
    explicit = torch.einsum("bto,bti->boi", d_wide, a_wide).pow(2).sum((1, 2))
    assert torch.allclose(_per_sample._linear_sq_norms(a_wide, d_wide, bias=False), explicit, rtol=1e-12)
