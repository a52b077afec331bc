"""The standard errors are honest: over 100 random subsamples of a pool 8x their size, the reported
``se`` matches the real spread of the value within 25%, and it shrinks like 1/sqrt(n)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchmetrics import MeanMetric, MetricCollection

from lightning_flatness.functional import adversarial_accuracy, fisher_trace, grad_cosine_regret, hessian_eigenvalues, hessian_trace, pacgen
from lightning_flatness.functional._stats import MeanAccumulator, mean_and_se
from lightning_flatness.metrics import GapMeter, samples_needed
from tests.helpers.models import tiny_mlp

DRAWS = 100
BATCH = 16


def pool(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (size,), generator=g)


def draws(n: int, estimator, seed: int = 1, num: int = DRAWS) -> tuple[float, float]:
    """(spread of the value, mean reported se) over ``num`` subsamples of n from a pool of 8n."""
    x, y = pool(8 * n)
    g = torch.Generator().manual_seed(seed)
    values, errors = [], []
    for _ in range(num):
        idx = torch.randperm(8 * n, generator=g)[:n]
        batches = [(x[idx[s : s + BATCH]], y[idx[s : s + BATCH]]) for s in range(0, n, BATCH)]
        value, se = estimator(batches)
        values.append(value)
        errors.append(se)
    return torch.tensor(values).std().item(), torch.tensor(errors).mean().item()


MODEL = tiny_mlp()
SEEDS = itertools.count()
ESTIMATORS = {
    "hessian_top_eig": lambda b: (lambda r: (r.values[0].item(), r.se[0].item()))(hessian_eigenvalues(MODEL, b)),
    "grad_cosine_regret": lambda b: (lambda r: (r.regret, r.regret_se))(grad_cosine_regret(MODEL, b)),
    "grad_cosine": lambda b: (lambda r: (r.cosine, r.cosine_se))(grad_cosine_regret(MODEL, b)),
    "fisher_trace": lambda b: (lambda r: (r.value, r.se))(fisher_trace(MODEL, b)),
    "fisher_trace_mc": lambda b: (lambda r: (r.value, r.se))(fisher_trace(MODEL, b, kind="mc", generator=len(b[0][1]))),
    "gap_loss": lambda b: gap_loss_and_se(b),
    # accuracy under attack and its paired drop from the clean accuracy (PGD's random start redrawn too)
    "adversarial_pgd_accuracy": lambda b: (lambda r: (r.accuracy, r.accuracy_se))(
        adversarial_accuracy(MODEL, b, epsilon=0.3, steps=5, generator=next(SEEDS))),
    "adversarial_fgsm_drop": lambda b: (lambda r: (r.drop, r.drop_se))(adversarial_accuracy(MODEL, b, attack="fgsm", epsilon=0.3)),
    # the probes are redrawn with the subsample: se holds both errors (here 1.05x the spread; probe_se alone 0.78x)
    "hessian_trace": lambda b: (lambda r: (r.value, r.se))(hessian_trace(MODEL, b, num_probes=64, generator=next(SEEDS))),
    # PACGen's own randomness (probes, rho's draws) is redrawn with the subsample: a new seed each time
    "pacgen": lambda b: (lambda r: (r.value, r.se))(pacgen(MODEL, b, num_train=1000, num_probes=8, generator=next(SEEDS))),
    "pacgen_first_order": lambda b: pacgen_first_order(b),
    "pacgen_rho_given": lambda b: (lambda r: (r.value, r.se))(pacgen(MODEL, b, num_train=1000, num_probes=8, rho=0.05, generator=next(SEEDS))),
}


FIRST_ORDER_PRODUCTS: list[int] = []


def pacgen_first_order(batches) -> tuple[float, float]:
    """The default ``num_probes=None`` with the diagonal to first order in every draw (a wide box: ρ√m N_i
    dominates): the rule that admits it, a bound on the remainder against a tenth of the error, is relaxed here (error_ratio)
    (on this 51-parameter model the bound rarely shows it; ``test_pacgen.py`` tests the rule), so the error bar
    of the first-order path itself is what is checked."""
    result = pacgen(MODEL, batches, num_train=1000, eps=1.0, generator=next(SEEDS), error_ratio=1e12)
    FIRST_ORDER_PRODUCTS.append(result.n_hvp)
    return result.value, result.se


def gap_loss_and_se(batches) -> tuple[float, float]:
    collection = MetricCollection({"gap/train_loss": MeanMetric()})
    meter = GapMeter(collection, "cross_entropy")
    meter.update("train", MODEL, batches)
    return float(collection["gap/train_loss"].compute()), meter.errors["gap/train_loss_se"]


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_reported_error_matches_the_spread_over_redrawn_subsamples(name):
    spread, reported = draws(128, ESTIMATORS[name])
    assert reported == pytest.approx(spread, rel=0.25), (name, spread, reported)
    if name == "pacgen_first_order":  # the path under test was taken (ρ's 6 products alone) in every draw
        assert FIRST_ORDER_PRODUCTS.count(6) == len(FIRST_ORDER_PRODUCTS), FIRST_ORDER_PRODUCTS


@pytest.mark.parametrize("name", ["hessian_top_eig", "grad_cosine_regret", "fisher_trace"])
def test_error_shrinks_like_one_over_sqrt_n(name):
    _, small = draws(64, ESTIMATORS[name], num=40)  # the mean of 40 errors is precise to a few %
    _, large = draws(256, ESTIMATORS[name], num=40)
    assert small / large == pytest.approx(2.0, rel=0.25), (name, small, large)


def test_weighted_batch_means_equal_the_textbook_formulas():
    x = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64)
    mean, se = mean_and_se(x)
    assert mean.item() == pytest.approx(3.5) and se.item() == pytest.approx(x.std().item() / 2)
    w = torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=torch.float64)
    mean, se = mean_and_se(x, w)
    theta = (w * x).sum() / w.sum()
    want = math.sqrt(4 / 3 * ((w * (x - theta)) ** 2).sum().item()) / w.sum().item()
    assert mean.item() == pytest.approx(theta.item()) and se.item() == pytest.approx(want)
    split = MeanAccumulator()
    split.add(x[:1], w[:1])
    split.add(x[1:], w[1:])  # chunks (and processes) add their sums
    assert torch.allclose(torch.stack(split.result()), torch.stack(mean_and_se(x, w)))
    assert math.isnan(mean_and_se(x[:1])[1].item())


def test_per_batch_rayleigh_quotients_average_to_the_eigenvalue():
    from lightning_flatness.functional import Objective, lanczos, measurement_mode
    from lightning_flatness.functional.hessian_eigenvalues import ChunkRayleighQuotients
    from tests.helpers.oracles import dense_hessian

    x, y = pool(64)
    batches = [(x[s : s + 16], y[s : s + 16]) for s in range(0, 64, 16)]
    with measurement_mode(MODEL):
        operator = Objective(MODEL, batches).hessian_operator()
        operator.chunk_observer = quotients = ChunkRayleighQuotients()
        out = lanczos(operator, torch.ones(51, dtype=torch.float64), k=2, tol=1e-12)
    direct = torch.tensor([[(v @ dense_hessian(MODEL, [b]) @ v).item() for v in out.vectors] for b in batches], dtype=torch.float64)
    assert torch.allclose(quotients.quotients(out.coefficients), direct, rtol=1e-8)
    mean, se = mean_and_se(direct)  # equal mini-batches: plain batch means
    assert torch.allclose(mean, out.values, rtol=1e-8)
    assert torch.allclose(quotients.standard_error(out.coefficients, lambda s: s, torch.device("cpu")), se, rtol=1e-8)


def test_samples_needed_for_a_target_relative_error():
    assert samples_needed(512, 2.0, 0.2) == 512 * 4  # 10% now: 4x the samples for 5%
    assert samples_needed(100, 1.0, 0.01) == 4  # already below
    assert samples_needed(100, 0.0, 0.1) is None and samples_needed(100, 1.0, math.nan) is None
