import math

import pytest
import torch
from torch import nn

from lightning_flatness.functional import pacgen, pacgen_perturbation_scale
from tests.helpers.models import (
    Quadratic,
    model_output_loss,
    quadratic_batches,
    random_symmetric,
)
from tests.helpers.oracles import dense_hessian


def direct_psi(w, h_diag, rho, gamma, eps):
    m = len(w)
    total = 0.0
    for wi, hi in zip(w.tolist(), h_diag.tolist()):
        n = gamma * abs(wi) + eps
        curv = math.sqrt(max(0.0, hi + rho * math.sqrt(m) * n))
        total += math.log((abs(wi) + n) * max(curv, 1 / n))
    return total


def test_matches_direct_formula_with_exact_diagonal(model_and_batches):
    model, batches = model_and_batches
    diag = dense_hessian(model, batches).diagonal()
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for rho, gamma, eps in [(0.0, 0.1, 0.1), (0.05, 0.3, 0.01), (2.0, 0.0, 0.5)]:
        result = pacgen(model, batches, gamma=gamma, eps=eps, rho=rho, hessian_diag=diag)
        assert result.value == pytest.approx(direct_psi(w, diag, rho, gamma, eps), rel=1e-12)
        assert result.rho == rho and result.n_hvp == 0


def test_perturbation_scale_formula(model_and_batches):
    model, batches = model_and_batches
    diag = dense_hessian(model, batches).diagonal()
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sigma = pacgen_perturbation_scale(model, batches, gamma=0.2, eps=0.05, rho=0.3, hessian_diag=diag)
    n = 0.2 * w.abs() + 0.05
    expected = [min(ni, 1 / math.sqrt(max(hi + 0.3 * ni, 1e-308))) for ni, hi in zip(n.tolist(), diag.tolist())]
    assert torch.allclose(sigma, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


def test_rho_estimate_is_zero_on_a_quadratic():
    model = Quadratic(random_symmetric(8, shift=3.0))
    result = pacgen(model, quadratic_batches(8), model_output_loss, hessian_diag=torch.ones(8, dtype=torch.float64))
    assert result.rho == pytest.approx(0.0, abs=1e-10)
    assert result.n_hvp == 6  # 3 probes x (product at w and at w + delta)


class Cubic(nn.Module):
    """ℓ_i(w) = a/6 (w − x_i)³ in one dimension: ∇²ℓ = a (w − x_i), Lipschitz constant |a|."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a
        self.w = nn.Parameter(torch.tensor([0.7], dtype=torch.float64))

    def forward(self, x):
        return self.a / 6 * (self.w - x[:, 0]) ** 3


def test_rho_estimate_is_exact_on_a_cubic():
    batches = quadratic_batches(1)
    for a in (2.5, -4.0):
        result = pacgen(Cubic(a), batches, model_output_loss, hessian_diag=torch.ones(1, dtype=torch.float64), generator=1)
        assert result.rho == pytest.approx(abs(a), rel=1e-10)


def test_estimated_diagonal_counts_hvps_and_is_reproducible(model_and_batches):
    model, batches = model_and_batches
    first = pacgen(model, batches, num_probes=8, generator=3)
    second = pacgen(model, batches, num_probes=8, generator=3)
    assert first == second
    assert first.n_hvp == 8 + 6
    assert math.isfinite(first.value) and first.rho > 0


def test_hessian_max_skips_the_diagonal_only_when_it_cannot_matter(model_and_batches):
    model, batches = model_and_batches
    hessian = dense_hessian(model, batches)
    diag, lam_max = hessian.diagonal(), torch.linalg.eigvalsh(hessian)[-1].item()
    assert (diag <= lam_max + 1e-12).all()  # the bound the screen relies on
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # Floor 1/N_i² >= 1/(0.1·max|w| + 0.1)² is far above λ_max here: the diagonal is skipped,
    # and Ψ and σ equal their values with the exact diagonal.
    screened = pacgen(model, batches, rho=0.01, hessian_max=lam_max, num_probes=8, generator=0)
    assert screened.n_hvp == 0
    assert screened.value == pytest.approx(direct_psi(w, diag, 0.01, 0.1, 0.1), rel=1e-12)
    sigma = pacgen_perturbation_scale(model, batches, rho=0.01, hessian_max=lam_max, generator=0)
    exact = pacgen_perturbation_scale(model, batches, rho=0.01, hessian_diag=diag)
    assert torch.equal(sigma, exact)
    # With ρ estimated, only its 2·rho_probes products are spent.
    assert pacgen(model, batches, hessian_max=lam_max, generator=0).n_hvp == 6
    # A wide box (eps = 3: floor 1/9 < λ_max) fails the screen: the diagonal is estimated,
    # with the same draws as without the bound.
    assert 1 / 9 < lam_max
    fallback = pacgen(model, batches, eps=3.0, rho=0.0, hessian_max=lam_max, num_probes=8, generator=4)
    plain = pacgen(model, batches, eps=3.0, rho=0.0, num_probes=8, generator=4)
    assert fallback == plain and fallback.n_hvp == 8


@pytest.mark.parametrize("bad, error", [(float("nan"), ValueError), (float("inf"), ValueError), ("1", TypeError), (True, TypeError)])
def test_hessian_max_is_validated(model_and_batches, bad, error):
    model, batches = model_and_batches
    with pytest.raises(error, match="hessian_max"):
        pacgen(model, batches, rho=0.0, hessian_max=bad)


def test_hessian_max_computes_the_few_coordinates_left_exactly(model_and_batches):
    model, batches = model_and_batches
    hessian = dense_hessian(model, batches)
    diag, lam_max = hessian.diagonal(), torch.linalg.eigvalsh(hessian)[-1].item()
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gamma, eps = 2.0, 0.1
    floor = (gamma * w.abs() + eps).pow(-2)  # rho = 0: coordinate i needs H_ii iff hessian_max > 1/N_i²
    floors = floor.sort().values
    # the first gap between floors above λ_max (a valid bound on every H_ii), leaving >= 2 coordinates
    left = next(j for j in range(2, len(floors)) if (floors[j - 1] + floors[j]) / 2 > lam_max)
    bound = ((floors[left - 1] + floors[left]) / 2).item()
    assert 2 <= left <= 8
    result = pacgen(model, batches, gamma=gamma, eps=eps, rho=0.0, hessian_max=bound, num_probes=8, generator=0)
    assert result.n_hvp == left
    assert result.value == pytest.approx(direct_psi(w, diag, 0.0, gamma, eps), rel=1e-12)
    sigma = pacgen_perturbation_scale(model, batches, gamma=gamma, eps=eps, rho=0.0, hessian_max=bound)
    exact = pacgen_perturbation_scale(model, batches, gamma=gamma, eps=eps, rho=0.0, hessian_diag=diag)
    assert torch.allclose(sigma, exact, rtol=1e-12, atol=0)
