"""The gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018): the unbiased estimates
against a per-sample-gradient loop, their unbiasedness over draws from a pool whose exact values
are known, the standard errors against the spread over draws, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_flatness.functional import (
    fisher_trace,
    grad_cosine_regret,
    grad_noise_scale,
)
from tests.helpers.models import mlp_batches, mostly_zero_labels, tiny_mlp
from tests.helpers.oracles import per_sample_grads_loop

BATCH = 16


def loop_estimates(model, batches) -> tuple[float, float]:
    """``(tr Σ, |G|²)`` from every per-sample gradient: the pair-sum forms, not the code's."""
    g = torch.cat([per_sample_grads_loop(model, x, y) for x, y in batches])
    n = len(g)
    gram = g @ g.T
    pairs = (gram.sum() - gram.diagonal().sum()).item() / (n * (n - 1))  # mean g_i·g_j over i ≠ j
    diffs = (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).sum().item() / (2 * n * (n - 1))
    return diffs, pairs  # tr Σ = mean |g_i − g_j|²/2 over pairs, |G|² = mean g_i·g_j


def test_equals_the_per_sample_loop(model_and_batches):
    model, batches = model_and_batches
    trace, sq_norm = loop_estimates(model, batches)
    r = grad_noise_scale(model, batches)
    assert r.trace_cov == pytest.approx(trace, rel=1e-10)
    assert r.grad_sq_norm == pytest.approx(sq_norm, rel=1e-10, abs=1e-12)
    assert r.num_samples == sum(len(b[1]) for b in batches) and r.n_grad == 3
    if sq_norm > 0:
        assert r.resolved and r.value == pytest.approx(trace / sq_norm, rel=1e-9)
    else:
        assert not r.resolved and r.value == math.inf and math.isnan(r.se)


def test_resolved_value_equals_the_loop_ratio():
    model, x, y = tiny_mlp(), *mostly_zero_labels(48)  # the fixtures above are noise-dominated: |G|² < 0
    batches = [(x[s : s + 16], y[s : s + 16]) for s in range(0, 48, 16)]
    trace, sq_norm = loop_estimates(model, batches)
    r = grad_noise_scale(model, batches)
    assert sq_norm > 0 and r.resolved
    assert r.value == pytest.approx(trace / sq_norm, rel=1e-10) and r.grad_sq_norm == pytest.approx(sq_norm, rel=1e-10)


def test_shared_inputs_give_the_same_result_without_a_pass():
    model, batches = tiny_mlp(), mlp_batches((8, 8, 8, 8))
    reg, fis = grad_cosine_regret(model, batches), fisher_trace(model, batches)
    shared = grad_noise_scale(
        model, batches, gradient=reg.gradient, sample_sq_norms=fis.sample_sq_norms,
        batch_gradient_dots=reg.batch_gradient_dots,
    )  # fmt: skip
    own = grad_noise_scale(model, batches)
    assert shared == own.__class__(**{**own.__dict__, "n_grad": 0})  # bit for bit, no data pass


def test_float32_agrees_with_float64():
    model, batches = tiny_mlp(), mlp_batches((8, 8, 8))
    wide, narrow = grad_noise_scale(model, batches), grad_noise_scale(model.float(), batches, dtype=torch.float32)
    assert narrow.trace_cov == pytest.approx(wide.trace_cov, rel=1e-5)
    assert narrow.grad_sq_norm == pytest.approx(wide.grad_sq_norm, rel=1e-4)


# ------------------------------------------------------------- a pool with known values
@pytest.fixture(scope="module")
def pool():
    return make_pool()


def make_pool():
    """512 samples whose labels are mostly 0, so the mean gradient stands out of the noise
    (B_simple ≈ 7), their exact per-sample gradients, and the population tr Σ and |G|²."""
    model = tiny_mlp()
    x, y = mostly_zero_labels(512)
    grads = per_sample_grads_loop(model, x, y)
    mean = grads.mean(0)
    return model, x, y, grads, ((grads - mean) ** 2).sum(1).mean().item(), (mean @ mean).item()


def draw(pool, n: int, gen: torch.Generator):
    """The estimate on ``n`` samples drawn with replacement (i.i.d. from the pool), from their exact
    gradients passed as the shared inputs (the data passes are checked against the loop above)."""
    model, x, y, grads, _, _ = pool
    idx = torch.randint(0, len(x), (n,), generator=gen)
    g, parts = grads[idx], range(0, n, BATCH)
    mean = g.mean(0)
    return grad_noise_scale(
        model, [(x[idx[s : s + BATCH]], y[idx[s : s + BATCH]]) for s in parts], gradient=mean,
        sample_sq_norms=[g[s : s + BATCH].pow(2).sum(1) for s in parts],
        batch_gradient_dots=[(g[s : s + BATCH].mean(0) @ mean).item() for s in parts],
    )  # fmt: skip


def test_trace_and_sq_norm_are_unbiased(pool):
    *_, trace, sq_norm = pool
    gen = torch.Generator().manual_seed(1)
    runs = [draw(pool, 32, gen) for _ in range(600)]
    for got, want in (
        (torch.tensor([r.trace_cov for r in runs]), trace),
        (torch.tensor([r.grad_sq_norm for r in runs]), sq_norm),
    ):
        mc = got.std().item() / math.sqrt(len(got))
        assert abs(got.mean().item() - want) < 3.5 * mc, (got.mean().item(), want, mc)
    # the plug-in |Ḡ|² is biased by tr Σ / n, far beyond the Monte Carlo error: the test can tell
    naive = torch.tensor([r.grad_sq_norm + r.trace_cov / r.num_samples for r in runs])
    assert naive.mean().item() - sq_norm > 10 * naive.std().item() / math.sqrt(len(naive))


def test_standard_errors_match_the_spread_over_draws(pool):
    *_, trace, sq_norm = pool
    gen = torch.Generator().manual_seed(2)
    runs = [draw(pool, 128, gen) for _ in range(200)]
    assert all(r.resolved for r in runs)
    for field in ("value", "trace_cov", "grad_sq_norm"):
        spread = torch.tensor([getattr(r, field) for r in runs]).std().item()
        reported = torch.tensor([getattr(r, "se" if field == "value" else field + "_se") for r in runs]).mean().item()
        assert reported == pytest.approx(spread, rel=0.25), (field, spread, reported)
    values = torch.tensor([r.value for r in runs])
    assert values.median().item() == pytest.approx(trace / sq_norm, rel=0.15)  # consistent; the ratio's bias is small


def test_noise_buried_signal_is_inf_never_negative():
    """Each input twice, once per label, at zero weights: the per-sample gradients cancel, Ḡ = 0, so
    the unbiased |G|² estimate is −tr Σ / n < 0."""
    model = torch.nn.Linear(3, 2).double()
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = grad_noise_scale(model, [(x, torch.zeros(10, dtype=torch.long)), (x, torch.ones(10, dtype=torch.long))])
    assert r.grad_sq_norm == pytest.approx(-r.trace_cov / 20) and r.trace_cov > 0
    assert r.value == math.inf and not r.resolved and math.isnan(r.se)


def test_standard_error_needs_two_batches_and_value_two_samples():
    model, batches = tiny_mlp(), mlp_batches((12,))
    assert math.isnan(grad_noise_scale(model, batches).se)
    with pytest.raises(ValueError, match="at least 2 samples"):
        grad_noise_scale(model, mlp_batches((1,)))


def test_bad_input():
    model, batches = tiny_mlp(), mlp_batches((4, 4))
    with pytest.raises(ValueError, match="gradient must be"):
        grad_noise_scale(model, batches, gradient=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one entry per batch"):
        grad_noise_scale(model, batches, batch_gradient_dots=[0.1])
    with pytest.raises(ValueError, match="empty"):
        grad_noise_scale(model, [])
    with pytest.raises(TypeError, match="re-iterable"):
        grad_noise_scale(model, iter(batches))
    with pytest.raises(TypeError, match="dtype"):
        grad_noise_scale(model, batches, dtype=torch.int64)
