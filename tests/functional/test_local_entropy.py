"""local_entropy: closed forms on quadratics, Algorithm 1 reference, restoration, reproducibility, errors."""

import math

import pytest
import torch
from torch import nn

from lightning_flatness.functional import local_entropy
from tests.helpers.models import mlp_batches, model_output_loss, tiny_mlp


class QuadraticLoss(nn.Module):
    """ℓ_i(w) = ½ (w − x_i)ᵀ A (w − x_i); L(w) = ½ (w − x̄)ᵀ A (w − x̄) + const."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor) -> None:
        super().__init__()
        self.a = a
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        d = self.w - x
        return 0.5 * ((d @ self.a) * d).sum(1)


def rotation(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q


def closed_form(h: torch.Tensor, q: torch.Tensor, w: torch.Tensor, center: torch.Tensor, gamma: float, temperature: float):
    """F_ex, <w'> for L(w') = ½ (w' − c)ᵀ Q diag(h) Qᵀ (w' − c)."""
    a = q @ torch.diag(h) @ q.T
    g = a @ (w - center)
    shifted = a + gamma * torch.eye(len(h), dtype=torch.float64)
    value = -0.5 * torch.log1p(h / gamma).sum() + g @ torch.linalg.solve(shifted, g) / (2 * temperature)
    return value.item(), w - torch.linalg.solve(shifted, g)


CASES = {
    "sharp": (torch.tensor([10.0, 10.0, 10.0, 10.0]), None),
    "flat": (torch.tensor([0.1, 0.1, 0.1, 0.1]), None),
    "mixed_rotated_off_minimum": (torch.tensor([10.0, 3.0, 1.0, 0.1]), torch.tensor([0.3, 0.2, -0.1, 0.5])),
}
GAMMA, NOISE, RUNGS, STEPS = 1.0, 0.5, 9, 500


def run_case(name: str, seed: int = 0):
    h, offset = CASES[name]
    h = h.double()
    q = rotation(4, 1) if offset is not None else torch.eye(4, dtype=torch.float64)
    center = torch.zeros(4, dtype=torch.float64)
    w = center if offset is None else offset.double()
    model = QuadraticLoss(q @ torch.diag(h) @ q.T, w)
    step = 0.5 / (h.max().item() + GAMMA)  # step * (top curvature + gamma) = 0.5: stable, mixes fast
    result = local_entropy(
        model, [center.unsqueeze(0)], model_output_loss, gamma=GAMMA, num_steps=STEPS, step_size=step,
        noise=NOISE, num_rungs=RUNGS, generator=seed,
    )  # fmt: skip
    exact, anchor = closed_form(h, q, w, center, GAMMA, NOISE**2 / 2)
    return result, exact, anchor, h


@pytest.fixture(scope="module")
def results():
    return {name: run_case(name) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_free_energy_matches_closed_form_within_stated_error(results, name):
    result, exact, _, _ = results[name]
    allowed = 4 * result.se + result.quadrature_error
    assert abs(result.value - exact) <= allowed, (name, result.value, exact, result.se, result.quadrature_error)
    assert result.quadrature_error < 0.25
    assert 0 < result.se < 0.05 * max(1.0, abs(exact))
    assert result.n_grad == RUNGS * STEPS
    assert result.temperature == NOISE**2 / 2
    assert result.gammas[0].item() == GAMMA and result.gammas[-1].item() == pytest.approx(100 * GAMMA)


def test_free_energy_separates_sharp_from_flat(results):
    sharp, flat = results["sharp"][0], results["flat"][0]
    assert sharp.value + 4 * sharp.se < flat.value - 4 * flat.se
    # −½ Σ log(1 + h/γ): −4.80 (sharp) vs −0.19 (flat).
    assert sharp.value < -4 and -0.3 < flat.value < 0


def test_anchor_and_gradient_match_closed_form(results):
    result, _, anchor, _ = results["mixed_rotated_off_minimum"]
    w = CASES["mixed_rotated_off_minimum"][1].double()
    # <w'> = w − (H + γ)⁻¹ g; the chain mean's Monte-Carlo error is ~0.01 per coordinate here.
    assert torch.allclose(result.mean, anchor, atol=0.05)
    assert torch.allclose(result.grad, GAMMA * (w - result.mean), rtol=0, atol=1e-15)
    h, _ = CASES["mixed_rotated_off_minimum"]
    q = rotation(4, 1)
    assert result.loss == pytest.approx(0.5 * (w @ q @ torch.diag(h.double()) @ q.T @ w).item(), rel=1e-12)


def test_euler_integrator_within_stated_error_plus_its_bias():
    h = torch.tensor([4.0, 4.0], dtype=torch.float64)
    model = QuadraticLoss(torch.diag(h), torch.zeros(2, dtype=torch.float64))
    step = 0.01
    result = local_entropy(
        model, [torch.zeros(1, 2, dtype=torch.float64)], model_output_loss, gamma=1.0, num_steps=800,
        step_size=step, noise=0.5, num_rungs=5, integrator="euler", generator=1,
    )  # fmt: skip
    exact = -0.5 * torch.log1p(h).sum().item()
    bias = step * (h.max().item() + 1.0) / 2 * abs(exact)  # relative eta (h + s) / 2, documented
    assert abs(result.value - exact) <= 4 * result.se + bias + result.quadrature_error


def test_unequal_batches_are_weighted_by_sample_count():
    """With noise 0 the chain converges to argmin L(w') + γ/2 ‖w' − w‖², L over all samples."""
    h = torch.tensor([2.0, 0.5], dtype=torch.float64)
    batches = [torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.tensor([[-1.0, 3.0]] * 3, dtype=torch.float64)]
    model = QuadraticLoss(torch.diag(h), torch.zeros(2, dtype=torch.float64))
    result = local_entropy(
        model, batches, model_output_loss, gamma=1.0, num_steps=3000, step_size=0.01, noise=0.0, free_energy=False
    )
    xbar = torch.cat(batches).mean(0)  # (-0.5, 2.5); the mean of the batch means would be (0, 2)
    expected = h * xbar / (h + 1.0)
    assert torch.allclose(result.mean, expected, atol=0.02)
    assert math.isnan(result.value) and result.n_grad == 3000


def test_exponential_average_follows_algorithm_1():
    """alpha given, Euler: μ ← (1−α)μ + α w' over w' ← w' − η(∇L(w') + γ(w' − w)) + √η ε ξ."""
    a = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    w0 = torch.tensor([0.4, -0.2], dtype=torch.float64)
    model = QuadraticLoss(a, w0)
    data = [torch.tensor([[0.1, 0.2], [0.3, -0.5]], dtype=torch.float64)]
    gamma, eta, eps, alpha, steps = 0.5, 0.05, 0.3, 0.25, 40
    result = local_entropy(
        model, data, model_output_loss, gamma=gamma, num_steps=steps, step_size=eta, noise=eps, alpha=alpha,
        free_energy=False, integrator="euler", generator=7,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    xbar = data[0].mean(0)
    wp, mu = w0.clone(), w0.clone()
    for _ in range(steps):
        g = a @ (wp - xbar)
        xi = torch.randn(2, generator=gen, dtype=torch.float64)
        wp = wp - eta * (g + gamma * (wp - w0)) + math.sqrt(eta) * eps * xi
        mu = (1 - alpha) * mu + alpha * wp
    assert torch.allclose(result.mean, mu, rtol=0, atol=1e-12)
    assert torch.allclose(result.grad, gamma * (w0 - mu), rtol=0, atol=1e-12)


def test_model_and_global_rng_untouched_and_reproducible():
    model, batches = tiny_mlp(), mlp_batches()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    kwargs = dict(gamma=0.5, num_steps=20, step_size=0.05, noise=0.2, num_rungs=3)
    first = local_entropy(model, batches, generator=3, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None
    again = local_entropy(model, batches, generator=3, **kwargs)
    other = local_entropy(model, batches, generator=4, **kwargs)
    assert torch.equal(first.mean, again.mean) and first.value == again.value
    assert not torch.equal(first.mean, other.mean)
    assert first.n_grad == 60 and first.mean.dtype == torch.float64
    assert math.isfinite(first.value) and first.se > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=0.0), "gamma"),
        (dict(num_steps=0), "num_steps"),
        (dict(step_size=-1.0), "step_size"),
        (dict(step_size=2.0), "step_size \\* gamma"),
        (dict(noise=-0.1), "noise"),
        (dict(noise=0.0), "noise must be > 0 for the free energy"),
        (dict(num_rungs=1), "num_rungs"),
        (dict(num_rungs=4), "num_rungs must be odd"),
        (dict(gamma_max=0.5), "gamma_max"),
        (dict(alpha=1.5), "alpha"),
        (dict(burn_in=1.0), "burn_in"),
        (dict(integrator="heun"), "integrator"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(gamma=1.0, num_steps=10, step_size=0.1, noise=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        local_entropy(tiny_mlp(), mlp_batches(), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_leaves_the_cuda_rng():
    kwargs = dict(gamma=0.5, num_steps=30, step_size=0.05, noise=0.2, num_rungs=3, generator=3)
    cpu = local_entropy(tiny_mlp(), mlp_batches(), **kwargs)
    gpu_model = tiny_mlp().cuda()
    rng = torch.cuda.get_rng_state()
    gpu = local_entropy(gpu_model, mlp_batches(), **kwargs)  # CPU batches, moved by the estimator
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert gpu.mean.is_cuda
    assert torch.allclose(cpu.mean, gpu.mean.cpu(), rtol=1e-9, atol=1e-12)
    assert gpu.value == pytest.approx(cpu.value, rel=1e-8, abs=1e-10)
