"""The FlatnessRatio metric: name, keys and options, the mean loss's eigenpair read from HessianEigenvalues,
a warning once when Lanczos does not converge, and values through the callback."""

from __future__ import annotations

import math
import warnings

import pytest
from lightning.pytorch import seed_everything

from lightning_flatness import FlatnessCallback, FlatnessRatio, HessianEigenvalues
from lightning_flatness.functional import flatness_ratio, measurement_mode
from lightning_flatness.metrics import DEFAULT_METRICS, MeasurementContext, execution_order, resolve_metrics
from tests.helpers.lightning_models import Classifier, DataModule, trainer
from tests.helpers.models import mlp_batches, tiny_mlp

KEYS = ("flatness/flatness_ratio", "flatness/batch_top_eig_mean")


def context(model, batches) -> MeasurementContext:
    return MeasurementContext(
        model, batches, "cross_entropy", epoch=2, seed=5, num_samples=sum(len(b[1]) for b in batches)
    )


def test_name_keys_and_options():
    (metric,) = resolve_metrics(["flatness_ratio"])
    assert isinstance(metric, FlatnessRatio) and "flatness_ratio" not in DEFAULT_METRICS  # opt-in
    assert metric.keys == (*KEYS, *(k + "_se" for k in KEYS)) and metric.min_batches == 2
    assert metric.hparams() == dict(
        tol=None, error_ratio=0.1, max_iter=100, cache_chunks="auto", verify=True, every_n_epochs=None
    )
    assert repr(FlatnessRatio(verify=False)) == "FlatnessRatio(verify=False)"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tol": 0.0}, ValueError, "tol"),
        ({"error_ratio": 1.5}, ValueError, "error_ratio"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"cache_chunks": "all"}, ValueError, "cache_chunks"),
        ({"verify": 1}, TypeError, "verify"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FlatnessRatio(**kwargs)


def test_it_reads_the_eigenpair_of_hessian_eigenvalues():
    model, batches = tiny_mlp(), mlp_batches((8, 8, 8, 8))
    ratio, eigen = FlatnessRatio(), HessianEigenvalues()
    assert execution_order([ratio, eigen]) == [eigen, ratio]
    ctx = context(model, batches)
    with measurement_mode(model):
        logged = eigen.compute(ctx)
        got = ratio.compute(ctx)
        alone = FlatnessRatio().compute(context(model, batches))  # its own Lanczos run on the mean loss
    pair = dict(eigenvalue=ctx.shared.eigenvalues[0].item(), eigenvector=ctx.shared.eigenvectors[0])
    want = flatness_ratio(model, batches, **pair, generator=ctx.seed_for("flatness_ratio"))
    assert got == {KEYS[0]: want.value, KEYS[0] + "_se": want.se, KEYS[1]: want.batch_top_eig_mean,
                   KEYS[1] + "_se": want.batch_top_eig_mean_se}  # fmt: skip
    assert want.top_eig == logged["flatness/hessian_top_eig"] and want.n_hvp == 0
    assert alone[KEYS[0]] == pytest.approx(got[KEYS[0]], abs=0.1 * got[KEYS[0] + "_se"])


def test_an_unconverged_run_is_logged_with_a_warning_once():
    model, batches = tiny_mlp(), mlp_batches((8, 8, 8, 8))
    metric = FlatnessRatio(tol=1e-12, max_iter=2)
    with measurement_mode(model):
        with pytest.warns(UserWarning, match="FlatnessRatio: a Lanczos run did not converge within max_iter=2"):
            first = metric.compute(context(model, batches))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            metric.compute(context(model, batches))  # once only
    assert first[KEYS[0]] >= 1


def test_logged_by_the_callback(tmp_path):
    seed_everything(0)
    cb = FlatnessCallback(metrics=["hessian_top_eig", "flatness_ratio"], num_samples=64, batch_size=16,
                          gap_num_samples=0, measure_at_start=True, on_error="raise")  # fmt: skip
    trainer(tmp_path, [cb], max_epochs=1).fit(Classifier(), DataModule())
    rows = [row for _, row in cb.history]
    assert len(rows) == 2
    for row in rows:
        assert row[KEYS[0]] >= 1 and row[KEYS[1]] >= row["flatness/hessian_top_eig"]
        assert all(math.isfinite(row[k + "_se"]) and row[k + "_se"] > 0 for k in KEYS)
