"""``loss_landscape(convexity=True)``: |λ_min/λ_max| on the landscape's grid (Li et al. 2018), against
models with a known answer and the dense Hessian at grid points."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional import loss_landscape
from tests.helpers.models import Quadratic, mlp_batches, model_output_loss, quadratic_batches, tiny_mlp
from tests.helpers.oracles import dense_hessian

torch.set_num_threads(1)


def moved(model: nn.Module, step: torch.Tensor) -> nn.Module:
    """A copy of ``model`` at ``w + step`` (``step`` flat, in the order of the trainable parameters)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(out.parameters()) + step, out.parameters())
    return out


def test_convex_models_map_to_zero_everywhere():
    """Softmax regression is convex everywhere (a null space: λ_min = 0); least squares' Hessian is the same
    positive definite matrix at every point: its λ_max is the dense one at each of them."""
    torch.manual_seed(0)
    softmax, batches = nn.Linear(4, 3).double(), mlp_batches()
    mapped = loss_landscape(softmax, batches, directions=2, steps=4, convexity=True).convexity
    assert mapped.converged.all() and mapped.ratio.shape == (4, 4)
    assert mapped.ratio.max() <= 1e-2 and (mapped.smallest.abs() <= 1e-2 * mapped.largest).all()
    g = torch.Generator().manual_seed(1)
    least_squares = nn.Linear(6, 1).double()
    data = [(torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(32, 1, generator=g, dtype=torch.float64))]
    exact = torch.linalg.eigvalsh(dense_hessian(least_squares, data, F.mse_loss))
    mapped = loss_landscape(least_squares, data, "mse", directions=2, steps=3, normalization="none", convexity=True).convexity
    assert (mapped.ratio == 0).all() and mapped.converged.all()
    assert torch.allclose(mapped.largest, exact[-1].expand(3, 3), rtol=1e-2)


def test_a_quadratic_maps_to_its_constant_ratio():
    a = torch.diag(torch.tensor([-2.0, 0.5, 1.0, 4.0], dtype=torch.float64))
    result = loss_landscape(Quadratic(a), quadratic_batches(4), model_output_loss, directions=1, steps=5,
                            normalization="none", convexity=True)  # fmt: skip
    assert result.convexity.ratio.shape == (5,)
    assert torch.allclose(result.convexity.ratio, torch.full((5,), 0.5, dtype=torch.float64), atol=1e-2)


@pytest.mark.parametrize("tight", [False, True])
def test_a_network_against_dense_eigvalsh_at_grid_points(tight):
    """Default (loose: tol 1e-2, 20 products, no check) within 0.01 of the dense ratio; tight within 1e-8."""
    model, batches = tiny_mlp(), mlp_batches()
    options = dict(convexity_tol=1e-10, convexity_max_iter=100, convexity_verify=True) if tight else {}
    result = loss_landscape(model, batches, directions=2, steps=3, seed=0, convexity=True, **options)
    mapped, a = result.convexity, result.coordinates[0]
    assert mapped.converged.all() and mapped.n_hvp <= 2 * (100 if tight else 20) * 9 * (2 if tight else 1)
    worst = 0.0
    for i, j in [(1, 1), (0, 2), (2, 0)]:
        exact = torch.linalg.eigvalsh(dense_hessian(moved(model, a[i] * result.directions[0] + a[j] * result.directions[1]), batches))
        want = max(-exact[0].item(), 0.0) / exact[-1].item()
        worst = max(worst, abs(mapped.ratio[i, j].item() - want))
    assert worst <= (1e-8 if tight else 1e-2), worst  # measured: 1.0e-3 loose (143 products), 4.7e-12 tight (712)


def test_the_model_is_left_alone_and_the_options_are_checked():
    model, batches = tiny_mlp(), mlp_batches()
    before = copy.deepcopy(model.state_dict())
    plain = loss_landscape(model, batches, directions=2, steps=2, seed=3)
    mapped = loss_landscape(model, batches, directions=2, steps=2, seed=3, convexity=True, convexity_max_iter=2)
    assert plain.convexity is None and torch.equal(plain.losses, mapped.losses)
    assert not mapped.convexity.converged.any()  # flagged, not hidden
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for kwargs, name in [({"convexity": 1}, "convexity"), ({"convexity": True, "convexity_tol": 0.0}, "tol"),
                         ({"convexity": True, "convexity_max_iter": 0}, "max_iter")]:  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=name):
            loss_landscape(model, batches, directions=2, steps=2, **kwargs)
