"""Average-case adaptive sharpness: exact on a quadratic, honest standard errors, invariant to
layer rescaling (where the top Hessian eigenvalue is not), and loud on bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_flatness.functional import (
    Objective,
    adaptive_sharpness,
    fisher_rao_norm,
    hessian_eigenvalues,
    measurement_mode,
    without_normalization,
)
from lightning_flatness.functional.adaptive_sharpness import _difference_table, crossed_mean_and_se
from tests.functional.test_standard_errors import pool
from tests.helpers.models import (
    Quadratic,
    cnn_batches,
    mlp_batches,
    model_output_loss,
    quadratic_batches,
    random_symmetric,
    relu_mlp,
    rescaled_twin,
    tiny_cnn,
    tiny_mlp,
)
from tests.helpers.oracles import dense_hessian

RHO = 0.1


def quadratic():
    a = random_symmetric(6, shift=2.0)
    return Quadratic(a), [torch.cat(quadratic_batches(6))], a


def one_batch(size: int = 128, seed: int = 0):
    x, y = pool(size, seed)
    return [(x, y)]


def grouped(model, batches, loss_fn="cross_entropy", groups=100, k=8, rho=RHO, antithetic=True):
    """(value, se_draws) of ``groups`` estimates of ``k`` draws (pairs) each: what ``groups`` calls
    with their own perturbations report, from one table (fast: a test draws thousands)."""
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn)
        num_draws = groups * k * (2 if antithetic else 1)
        table, _ = _difference_table(objective, torch.Generator().manual_seed(0), rho, num_draws, antithetic, 0.0)
    stats = [crossed_mean_and_se(part) for part in table.split(k, dim=1)]
    return torch.tensor([v for v, _, _ in stats]), torch.tensor([e for _, e, _ in stats])


@pytest.mark.parametrize("antithetic", [True, False])
def test_quadratic_is_exact_in_expectation_and_within_its_error(antithetic):
    # E[L(w + |w|δ)] - L(w) = ρ²/2 Σ_i w_i² A_ii exactly: no higher-order term.
    model, batches, a = quadratic()
    w = model.w.detach()
    exact = RHO**2 / 2 * (w**2 * a.diagonal()).sum().item()
    values, errors = grouped(model, batches, model_output_loss, antithetic=antithetic)  # 100 estimates of 8
    assert abs(values.mean().item() - exact) < 3 * values.std().item() / 100**0.5  # unbiased
    assert ((values - exact).abs() < 2 * errors).float().mean().item() > 0.8  # within its se (t, 7 dof: 91%)
    assert errors.mean().item() == pytest.approx(values.std().item(), rel=0.25)
    one = adaptive_sharpness(
        model, batches, model_output_loss, rho=RHO, num_draws=32, antithetic=antithetic, generator=1
    )
    assert abs(one.value - exact) < 3 * one.se
    if antithetic:
        # A pair's value is ½ eᵀAe, e = |w|⊙δ: Var = ρ⁴ tr(M²)/2 with M = D A D, D = diag|w|.
        m = torch.diag(w.abs()) @ a @ torch.diag(w.abs())
        exact_se = (RHO**4 * torch.trace(m @ m) / 2 / 8).sqrt().item()
        assert values.std().item() == pytest.approx(exact_se, rel=0.15)
        assert (errors**2).mean().sqrt().item() == pytest.approx(exact_se, rel=0.15)
        assert one.se_samples < 1e-12  # every sample sees the same pair value (H is constant)


def test_smooth_network_matches_the_second_order_term_at_small_rho():
    model, batches = tiny_mlp(), mlp_batches()  # tanh: twice differentiable
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    second_order = 0.01**2 / 2 * (w**2 * dense_hessian(model, batches).diagonal()).sum().item()
    result = adaptive_sharpness(model, batches, rho=0.01, num_draws=100, generator=0)
    assert abs(result.value - second_order) < 3 * result.se_draws
    assert result.n_forward == 101


@pytest.mark.parametrize("antithetic", [True, False])
def test_draw_error_matches_the_spread_over_redrawn_perturbations(antithetic):
    values, errors = grouped(tiny_mlp(), one_batch(), rho=0.2, k=8, antithetic=antithetic)
    assert errors.mean().item() == pytest.approx(values.std().item(), rel=0.25)


def test_total_error_matches_the_spread_over_redrawn_subsamples_and_perturbations():
    model, (x, y) = tiny_mlp(), pool(1024)
    g = torch.Generator().manual_seed(1)
    results = []
    for seed in range(100):
        idx = torch.randperm(1024, generator=g)[:64]
        results.append(adaptive_sharpness(model, [(x[idx], y[idx])], rho=0.2, num_draws=32, generator=seed))
    spread = torch.tensor([r.value for r in results]).std().item()
    assert torch.tensor([r.se for r in results]).mean().item() == pytest.approx(spread, rel=0.25)  # measured 0.97
    # the draws' part alone would be too small here (measured 0.74 of the spread): the subsample's part counts
    assert torch.tensor([r.se_draws for r in results]).mean().item() < 0.8 * spread


def test_crossed_design_error_is_the_textbook_two_way_anova():
    g = torch.Generator().manual_seed(0)
    noise = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    table = noise(30, 1) + 0.5 * noise(1, 6) + 0.3 * noise(30, 6)  # samples, draws, interaction
    mean, se_draws, se_samples = crossed_mean_and_se(table)
    n, k = table.shape
    rows, cols = table.mean(1), table.mean(0)
    ms_a = k * rows.var().item()
    ms_b = n * cols.var().item()
    ms_e = ((table - rows[:, None] - cols[None, :] + table.mean()) ** 2).sum().item() / ((n - 1) * (k - 1))
    assert mean == pytest.approx(table.mean().item(), rel=1e-12)
    assert se_draws**2 == pytest.approx(ms_b / (n * k), rel=1e-10)
    assert se_samples**2 == pytest.approx((ms_a - ms_e) / (n * k), rel=1e-10)


def invariance_numbers(alpha: float = 10.0) -> dict[str, tuple[float, float]]:
    """(model, twin) values of each measure: the numbers of docs/metrics.md's invariance table."""
    model, batches = relu_mlp(), mlp_batches()
    twin = rescaled_twin(model, alpha)
    out = {}
    for name, fn in {
        "hessian_top_eig": lambda m: hessian_eigenvalues(m, batches, tol=1e-10).values[0].item(),
        "adaptive_sharpness": lambda m: adaptive_sharpness(m, batches, rho=RHO, generator=7).value,
        "adaptive_sharpness_eta": lambda m: adaptive_sharpness(m, batches, rho=RHO, eta=0.01, generator=7).value,
        "fisher_rao_norm": lambda m: fisher_rao_norm(m, batches).value,
    }.items():
        out[name] = (fn(model), fn(twin))
    return out


def test_layer_rescaling_moves_the_top_eigenvalue_but_not_adaptive_sharpness():
    numbers = invariance_numbers()
    eig, twin_eig = numbers["hessian_top_eig"]
    assert twin_eig / eig > 10  # the same function, a much sharper Hessian
    # common random numbers: every perturbed loss is the same up to rounding, not just in expectation
    assert numbers["adaptive_sharpness"][1] == pytest.approx(numbers["adaptive_sharpness"][0], rel=1e-10)
    assert numbers["fisher_rao_norm"][1] == pytest.approx(numbers["fisher_rao_norm"][0], rel=1e-10)
    # ASAM's offset η breaks the invariance (|w| + η is not rescaled with w)
    eta, twin_eta = numbers["adaptive_sharpness_eta"]
    assert abs(twin_eta - eta) > 1e-3 * abs(eta)


def test_normalization_layers_can_be_left_unperturbed():
    model, batches = tiny_cnn(), cnn_batches()
    kept = without_normalization(model)
    assert {id(p) for p in kept} == {id(p) for p in model.parameters()} - {id(p) for p in model[1].parameters()}
    partial = adaptive_sharpness(model, batches, params=kept, generator=0)
    model[1].requires_grad_(False)  # frozen parameters are not perturbed either
    assert adaptive_sharpness(model, batches, generator=0).value == partial.value
    with pytest.raises(ValueError, match="normalization"):
        without_normalization(nn.Sequential(nn.LayerNorm(3)))


def test_the_model_is_untouched_and_the_split_does_not_matter():
    model, batches = tiny_mlp(), mlp_batches()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    one = adaptive_sharpness(model, batches, generator=3)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    other = adaptive_sharpness(model, [(x[:3], y[:3]), (x[3:], y[3:])], generator=3)
    assert one.value == pytest.approx(other.value, rel=1e-12) and one.se == pytest.approx(other.se, rel=1e-10)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0.0}, "rho"),
        ({"rho": -1.0}, "rho"),
        ({"num_draws": 0}, "num_draws"),
        ({"num_draws": 3}, "num_draws must be even"),
        ({"antithetic": 1}, "antithetic"),
        ({"eta": -0.1}, "eta"),
        ({"generator": "seed"}, "generator"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adaptive_sharpness(tiny_mlp(), mlp_batches(), **kwargs)


def test_one_draw_without_pairs_is_allowed_but_has_no_draw_error():
    result = adaptive_sharpness(tiny_mlp(), mlp_batches(), num_draws=1, antithetic=False)
    assert result.se_draws != result.se_draws and result.se != result.se  # NaN: one draw


def test_a_perturbation_that_overflows_the_loss_is_reported():
    model, batches = tiny_mlp(), mlp_batches()
    with torch.no_grad():
        model[0].weight.mul_(1e300)  # a perturbed point overflows float64
    with pytest.raises(ValueError, match="non-finite.*rho"):
        adaptive_sharpness(model, batches, rho=1e10)
