"""Stochastic Lanczos quadrature against dense spectra: Gauss exactness, moments, density, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_flatness.functional import DenseOperator, hessian_spectral_density, spectral_density
from lightning_flatness.functional.lanczos import lanczos_tridiagonal
from lightning_flatness.functional.spectral_density import _probe
from lightning_flatness.validation import check_generator
from tests.helpers.models import mlp_batches, tiny_mlp
from tests.helpers.oracles import dense_hessian

torch.set_num_threads(1)
DIM = 40


def _operator(seed: int = 1) -> tuple[DenseOperator, torch.Tensor]:
    """A dense operator with eigenvalues spread over [-1, 2] (a negative part, like a Hessian) in a random basis."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    lam = 3 * torch.rand(DIM, generator=g, dtype=torch.float64) - 1
    a = (basis * lam) @ basis.T
    return DenseOperator((a + a.T) / 2), torch.linalg.eigvalsh((a + a.T) / 2)


def _probe_moments(a: torch.Tensor, v: torch.Tensor, order: int) -> torch.Tensor:
    """``vᵀ A^k v`` for ``k = 1..order``."""
    out, w = [], v
    for _ in range(order):
        w = a @ w
        out.append(v @ w)
    return torch.stack(out)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
@pytest.mark.parametrize("steps", [3, 6])
def test_one_probe_is_a_gauss_rule_exact_up_to_degree_2m_minus_1(probes, steps):
    op, _ = _operator()
    res = spectral_density(op, num_probes=1, lanczos_steps=steps, probes=probes, generator=7)
    v = _probe(probes, DIM, check_generator(7), op.matrix)
    exact = _probe_moments(op.matrix, v, 2 * steps)
    got = res.moments(2 * steps)[0]
    assert res.weights.sum().item() == pytest.approx(1.0, abs=1e-13)
    assert torch.allclose(got[: 2 * steps - 1], exact[: 2 * steps - 1], rtol=1e-10, atol=1e-12)
    assert abs(got[-1] - exact[-1]) > 1e-6  # degree 2m: no longer exact (the test is sharp)
    assert res.n_products == steps and res.nodes.shape == (1, steps)


def test_full_krylov_space_recovers_the_spectrum_and_every_moment():
    op, lam = _operator()
    res = spectral_density(op, num_probes=3, lanczos_steps=DIM + 5, generator=0)
    assert res.n_products == 3 * DIM and res.nodes.shape == (3, DIM)
    for nodes in res.nodes:  # the Ritz values of a full Krylov space are the eigenvalues
        assert torch.allclose(nodes, lam, atol=1e-10)
    gen = check_generator(0)
    vs = [_probe("rademacher", DIM, gen, op.matrix) for _ in range(3)]
    exact = torch.stack([_probe_moments(op.matrix, v, 8) for v in vs]).mean(0)
    assert torch.allclose(res.moments(8)[0], exact, rtol=1e-9)
    # The negative mass is then each probe's exact weight on the negative eigenvectors.
    _, vectors = torch.linalg.eigh(op.matrix)
    neg = torch.stack([((vectors.T @ v) ** 2)[lam < 0].sum() for v in vs]).mean()
    assert res.negative_mass()[0] == pytest.approx(neg.item(), abs=1e-10)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_moments_match_the_dense_spectrum_within_their_standard_error(probes):
    op, lam = _operator(seed=3)
    res = spectral_density(op, num_probes=64, lanczos_steps=4, probes=probes, generator=11)
    values, se = res.moments(3)
    exact = torch.stack([(lam**k).mean() for k in (1, 2, 3)])
    assert ((values - exact).abs() <= 3 * se).all(), ((values - exact) / se).tolist()
    trace, trace_se = res.trace()
    assert trace == pytest.approx(DIM * values[0].item()) and trace_se == pytest.approx(DIM * se[0].item())
    mass, mass_se = res.negative_mass()
    assert abs(mass - (lam < 0).double().mean().item()) <= 3 * mass_se + 0.05  # + the quadrature's own error


def test_standard_errors_match_the_spread_over_repeated_draws():
    op, _ = _operator(seed=4)
    draws = [spectral_density(op, num_probes=8, lanczos_steps=3, generator=s).moments(3) for s in range(150)]
    values = torch.stack([v for v, _ in draws])
    reported = torch.stack([e for _, e in draws]).pow(2).mean(0).sqrt()
    ratio = reported / values.std(0)
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio.tolist()


def test_hessian_density_of_a_tiny_model_matches_its_dense_hessian():
    model, batches = tiny_mlp(), mlp_batches()
    h = dense_hessian(model, batches)
    lam, p = torch.linalg.eigvalsh(h), h.shape[0]
    res = hessian_spectral_density(model, batches, num_probes=48, lanczos_steps=5, generator=2, dtype=torch.float64)
    assert res.n_products == 48 * 5 and res.num_params == p
    values, se = res.moments(3)
    exact = torch.stack([(lam**k).mean() for k in (1, 2, 3)])
    assert ((values - exact).abs() <= 3 * se).all(), ((values - exact) / se).tolist()
    one = hessian_spectral_density(model, batches, num_probes=1, lanczos_steps=4, generator=5, dtype=torch.float64)
    v = _probe("rademacher", p, check_generator(5), h)
    assert torch.allclose(one.moments(7)[0], _probe_moments(h, v, 7), rtol=1e-8, atol=1e-12)


def test_negative_mass_past_the_zero_atom_of_a_relu_network():
    """A ReLU net's Hessian: 42% exact zeros (dead units, softmax invariance) inside a bulk of small
    eigenvalues. The threshold keeps the node that lands in that atom, at a small value of either
    sign, out of the negative mass (with threshold 0 it read 0.37-0.69 at 16-32 steps, truth 0.23)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    lam = torch.linalg.eigvalsh(dense_hessian(copy.deepcopy(model).double(), [(x.double(), y) for x, y in batches]))
    assert (lam.abs() < 1e-10).double().mean() > 0.4  # the atom
    exact = (lam < -0.01 * lam.abs().max()).double().mean().item()
    for seed in range(3):  # float32, as the callback measures a float32 model
        res = hessian_spectral_density(model, batches, num_probes=4, lanczos_steps=32, generator=seed)
        mass, se = res.negative_mass(threshold=0.01)
        assert abs(mass - exact) <= 3 * se + 0.03, (seed, mass, se, exact)


def test_density_integrates_to_one_and_histogram_counts_the_eigenvalues():
    op, _ = _operator()
    res = spectral_density(op, num_probes=4, lanczos_steps=8, generator=0)
    for sigma in (None, 0.05, 0.3):
        t, d = res.density(2000, sigma)
        assert (d >= 0).all() and torch.trapezoid(d, t).item() == pytest.approx(1.0, abs=1e-6)
    t = torch.linspace(-20, 20, 40001, dtype=torch.float64)  # any grid wide enough: the mixture has unit mass
    assert torch.trapezoid(res.density(t, 0.1)[1], t).item() == pytest.approx(1.0, abs=1e-6)
    counts, edges = res.histogram(10)
    assert counts.sum().item() == pytest.approx(DIM) and edges.numel() == 11
    assert edges[0] == res.nodes.min() and edges[-1] == res.nodes.max()
    smooth = res.negative_mass(sigma=1e-9)[0]
    assert smooth == pytest.approx(res.negative_mass()[0], abs=1e-12)


def test_breakdown_stops_early_with_the_exact_measure():
    lam = torch.tensor([-1.0, 2.0, 5.0], dtype=torch.float64).repeat_interleave(10)  # three distinct eigenvalues
    op = DenseOperator(torch.diag(lam))
    res = spectral_density(op, num_probes=2, lanczos_steps=12, generator=0)
    assert res.n_products == 2 * 3 and res.nodes.shape == (2, 3)
    assert torch.allclose(res.nodes, torch.tensor([-1.0, 2.0, 5.0], dtype=torch.float64).expand(2, 3), atol=1e-10)
    assert torch.allclose(res.weights, torch.full((2, 3), 1 / 3, dtype=torch.float64), atol=1e-10)


def test_lanczos_tridiagonal_partial_and_full_reorthogonalization_agree():
    op, _ = _operator()
    start = torch.ones(DIM, dtype=torch.float64)
    full = lanczos_tridiagonal(op, start, 10)
    partial = lanczos_tridiagonal(op, start, 10, full_reorthogonalization=False)
    assert full[0].shape == (10,) and full[1].shape == (9,)
    assert torch.allclose(full[0], partial[0], atol=1e-10) and torch.allclose(full[1], partial[1], atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"num_probes": 0}, "num_probes"), ({"lanczos_steps": 0}, "lanczos_steps"), ({"probes": "normal"}, "probes"),
     ({"generator": "seed"}, "generator"), ({"num_probes": 1.5}, "num_probes"),
     ({"full_reorthogonalization": 1}, "full_reorthogonalization")],
)  # fmt: skip
def test_bad_arguments_name_themselves(kwargs, name):
    op, _ = _operator()
    with pytest.raises((ValueError, TypeError), match=name):
        spectral_density(op, **kwargs)
    if name != "full_reorthogonalization":
        with pytest.raises((ValueError, TypeError), match=name):
            hessian_spectral_density(tiny_mlp(), mlp_batches(), **kwargs)


def test_bad_arguments_of_the_result_methods():
    op, _ = _operator()
    res = spectral_density(op, num_probes=2, lanczos_steps=3, generator=0)
    for call, name in ((lambda: res.moments(0), "order"), (lambda: res.density(100, sigma=0.0), "sigma"),
                       (lambda: res.histogram(0), "bins"), (lambda: res.negative_mass(sigma=-1.0), "sigma"),
                       (lambda: res.negative_mass(-0.1), "threshold"),
                       (lambda: res.grid(1), "num")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            call()
    assert math.isnan(spectral_density(op, num_probes=1, lanczos_steps=3).moments(1)[1].item())


def test_the_trace_error_holds_the_mini_batches_share():
    """The data's part of ``trace()``'s error: batch means of each mini-batch's ``P·mean_s vᵀH_b v`` over the
    same probes, from the chunks of each probe's first product (no product of its own)."""
    from lightning_flatness.functional._stats import mean_and_se

    model, batches = tiny_mlp(), mlp_batches()
    res = hessian_spectral_density(model, batches, num_probes=6, lanczos_steps=4, generator=3)
    gen, like = torch.Generator().manual_seed(3), torch.empty(0, dtype=torch.float64)
    probes = torch.stack([_probe("rademacher", res.num_params, gen, like) for _ in range(6)])
    shares = torch.stack([res.num_params * torch.einsum("sp,pq,sq->s", probes, dense_hessian(model, [b]), probes).mean()
                          for b in batches])  # fmt: skip
    sizes = torch.tensor([float(len(b[1])) for b in batches], dtype=torch.float64)
    want = mean_and_se(shares, sizes)[1].item()
    assert res.trace_sample_se == pytest.approx(want, rel=1e-8)
    probe_se = res.num_params * res.moments(1)[1].item()
    assert res.trace()[1] == pytest.approx(math.hypot(probe_se, want), rel=1e-12)
