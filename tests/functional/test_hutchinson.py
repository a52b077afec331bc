import math

import pytest
import torch
import torch.nn.functional as F

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
    # At fixed data the spread across runs and the mean reported probe error both match the exact one.
    assert values.std().item() == pytest.approx(exact_stderr, rel=0.2)
    mean_reported = torch.tensor([r.probe_se for r in results]).pow(2).mean().sqrt().item()
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


def sparse_regression(samples: int = 256, dim: int = 24, seed: int = 5):
    """MSE regression whose inputs are mostly one coordinate of random size: per-sample Hessians nearly
    diagonal (probes agree closely) but far apart (the data's error dominates), so the rule can stop early."""
    g = torch.Generator().manual_seed(seed)
    hot = torch.nn.functional.one_hot(torch.randint(0, dim, (samples,), generator=g), dim).double()
    x = hot * torch.randn(samples, 1, generator=g, dtype=torch.float64).exp() + 0.3 * torch.randn(
        samples, dim, generator=g, dtype=torch.float64)  # fmt: skip
    y = torch.randn(samples, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(dim, 1, bias=False).double()
    return model, [(x[s : s + 32], y[s : s + 32]) for s in range(0, samples, 32)]


def test_error_matched_probes_stop_at_a_tenth_of_the_data_error():
    """Issue 24, item 1: with ``error_ratio`` the probes stop after the first block of 8 whose probe error is at
    most that fraction of the data's; over 50 probe seeds the estimate is then within a tenth of the data's error
    of the exact trace of the same subsample (RMS), and the data's error is the batch means of the exact
    mini-batch traces to within the probes' own noise."""
    model, batches = sparse_regression()
    exact = dense_hessian(model, batches, F.mse_loss).trace().item()
    shares = torch.tensor([dense_hessian(model, [b], F.mse_loss).trace().item() for b in batches], dtype=torch.float64)
    data_se = shares.std().item() / math.sqrt(len(batches))  # equal mini-batches: plain batch means
    runs = [hessian_trace(model, batches, "mse", num_probes=64, generator=s, error_ratio=0.1) for s in range(50)]
    assert all(r.n_hvp < 64 and r.probe_se <= 0.1 * r.sample_se for r in runs), [r.n_hvp for r in runs]
    assert len({r.n_hvp for r in runs}) > 1  # 8 to 32 probes here: stopping after 8 always misses (RMS 0.14)
    assert torch.tensor([r.sample_se for r in runs]).mean().item() == pytest.approx(data_se, rel=0.05)
    errors = torch.tensor([(r.value - exact) / data_se for r in runs])
    assert errors.pow(2).mean().sqrt().item() <= 0.12
    assert all(r.se == pytest.approx(math.hypot(r.probe_se, r.sample_se)) for r in runs)
    fixed = hessian_trace(model, batches, "mse", num_probes=64, generator=0)  # no error_ratio: every probe
    assert fixed.n_hvp == 64 and fixed.probe_se < runs[0].probe_se


def test_error_ratio_runs_every_probe_where_the_data_error_is_unknown():
    model, batches = sparse_regression()
    one = hessian_trace(model, batches[:1], "mse", num_probes=24, generator=0, error_ratio=0.1)
    assert one.n_hvp == 24 and math.isnan(one.sample_se) and one.se == one.probe_se  # one mini-batch
    with pytest.raises(ValueError, match="error_ratio"):
        hessian_trace(model, batches, "mse", error_ratio=0.0)
