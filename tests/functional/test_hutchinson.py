import math

import pytest
import torch

from lightning_flatness.functional import hessian_diagonal, hessian_trace
from tests.helpers.models import (
    Quadratic,
    model_output_loss,
    quadratic_batches,
    random_symmetric,
)
from tests.helpers.oracles import dense_hessian

RUNS = 200
PROBES = 4


def test_trace_is_unbiased_with_honest_stderr(model_and_batches):
    model, batches = model_and_batches
    h = dense_hessian(model, batches)
    exact = h.trace().item()
    off = h - torch.diag(h.diagonal())
    # Var(zᵀHz) = 2 Σ_{i≠j} H_ij² for Rademacher z: the stderr the estimator should report.
    exact_stderr = math.sqrt(2 * (off**2).sum().item() / PROBES)
    results = [hessian_trace(model, batches, num_probes=PROBES, generator=seed) for seed in range(RUNS)]
    values = torch.tensor([r.value for r in results])
    assert all(r.n_hvp == PROBES for r in results)
    se_of_mean = values.std().item() / math.sqrt(RUNS)
    assert abs(values.mean().item() - exact) <= 3 * se_of_mean
    # The spread across runs and the mean reported stderr both match the exact standard error.
    assert values.std().item() == pytest.approx(exact_stderr, rel=0.2)
    mean_reported = torch.tensor([r.se for r in results]).pow(2).mean().sqrt().item()
    assert mean_reported == pytest.approx(exact_stderr, rel=0.2)


def test_diagonal_is_unbiased(model_and_batches):
    model, batches = model_and_batches
    h = dense_hessian(model, batches)
    exact = h.diagonal()
    # Per-entry variance of z_i (Hz)_i is Σ_{j≠i} H_ij².
    var = (h**2).sum(1) - exact**2
    estimates = torch.stack([hessian_diagonal(model, batches, num_probes=PROBES, generator=s) for s in range(RUNS)])
    z = (estimates.mean(0) - exact) / (var / (PROBES * RUNS)).sqrt().clamp_min(1e-300)
    assert z.abs().max() < 4.5
    assert 0.5 < (z**2).mean() < 1.6


def test_diagonal_hessian_is_recovered_exactly_from_one_probe():
    """For a diagonal Hessian every Rademacher probe gives the exact trace and diagonal."""
    d = torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0], dtype=torch.float64)
    model = Quadratic(torch.diag(d))
    batches = quadratic_batches(5)
    diag = hessian_diagonal(model, batches, model_output_loss, num_probes=1, generator=3)
    assert torch.allclose(diag, d, atol=1e-12)
    trace = hessian_trace(model, batches, model_output_loss, num_probes=5, generator=3)
    assert trace.value == pytest.approx(d.sum().item(), abs=1e-12)
    assert trace.se == pytest.approx(0.0, abs=1e-12)


def test_trace_of_dense_quadratic_converges():
    a = random_symmetric(10, shift=2.0)
    model = Quadratic(a)
    result = hessian_trace(model, quadratic_batches(10), model_output_loss, num_probes=4000, generator=0)
    assert abs(result.value - a.trace().item()) <= 3 * result.se
    assert result.se < 0.2


def test_same_generator_seed_reproduces():
    a = random_symmetric(6)
    model = Quadratic(a)
    batches = quadratic_batches(6)
    first = hessian_trace(model, batches, model_output_loss, num_probes=9, generator=7)
    second = hessian_trace(model, batches, model_output_loss, num_probes=9, generator=torch.Generator().manual_seed(7))
    assert first == second


def test_standard_errors_are_named_se_and_stderr_still_works_with_a_warning():
    """Issue 23, item 13: ``hessian_trace`` returned ``.stderr`` where the docs promise ``se``."""
    from lightning_flatness.functional import hessian_trace
    from tests.helpers.models import mlp_batches, tiny_mlp

    result = hessian_trace(tiny_mlp(), mlp_batches(), num_probes=8, generator=0)
    assert result.se > 0
    with pytest.warns(FutureWarning, match=r"TraceResult.stderr is deprecated .* use .se"):
        assert result.stderr == result.se
