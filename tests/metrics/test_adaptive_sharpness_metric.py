"""The AdaptiveSharpness and FisherRaoNorm metrics: names, options, values in the callback, and DDP."""

from __future__ import annotations

import math

import pytest
import torch.distributed as dist
from lightning.pytorch import seed_everything

from lightning_flatness import AdaptiveSharpness, FisherRaoNorm, FlatnessCallback
from lightning_flatness.functional import (
    adaptive_sharpness,
    fisher_rao_norm,
    measurement_mode,
    without_normalization,
)
from lightning_flatness.metrics import MeasurementContext, resolve_metrics
from tests.helpers.distributed import in_two_processes
from tests.helpers.lightning_models import Classifier, DataModule, trainer
from tests.helpers.models import cnn_batches, mlp_batches, tiny_cnn, tiny_mlp

SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=0)


def test_names_keys_and_options():
    sharp, fr = resolve_metrics(["adaptive_sharpness", "fisher_rao_norm"])
    assert isinstance(sharp, AdaptiveSharpness) and isinstance(fr, FisherRaoNorm)
    assert sharp.keys == ("flatness/adaptive_sharpness", "flatness/adaptive_sharpness_se")
    assert fr.keys == ("flatness/fisher_rao_norm", "flatness/fisher_rao_norm_se")
    assert sharp.hparams() == dict(
        rho=0.1, num_draws=16, antithetic=True, eta=0.0, exclude_normalization=False, every_n_epochs=None
    )
    assert repr(AdaptiveSharpness(rho=0.05)) == "AdaptiveSharpness(rho=0.05)"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0.0}, "rho"),
        ({"num_draws": 3}, "num_draws must be even"),
        ({"num_draws": 0, "antithetic": False}, "num_draws"),
        ({"eta": -1.0}, "eta"),
        ({"antithetic": None}, "antithetic"),
        ({"exclude_normalization": "yes"}, "exclude_normalization"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveSharpness(**kwargs)


@pytest.mark.parametrize("exclude", [False, True])
def test_compute_equals_the_functional_with_the_metrics_seed(exclude):
    model, batches = tiny_cnn(), cnn_batches()
    ctx = MeasurementContext(model, batches, "cross_entropy", epoch=3, seed=5, num_samples=10)
    metric = AdaptiveSharpness(num_draws=4, exclude_normalization=exclude)
    with measurement_mode(model):
        got = metric.compute(ctx)
    params = without_normalization(model) if exclude else None
    want = adaptive_sharpness(model, batches, num_draws=4, generator=ctx.seed_for("adaptive_sharpness"), params=params)
    assert got == {"flatness/adaptive_sharpness": want.value, "flatness/adaptive_sharpness_se": want.se}
    fr = fisher_rao_norm(model, batches)
    assert FisherRaoNorm().compute(ctx) == {"flatness/fisher_rao_norm": fr.value, "flatness/fisher_rao_norm_se": fr.se}


def test_both_are_logged_by_the_callback(tmp_path):
    seed_everything(0)
    cb = FlatnessCallback(metrics=["fisher_trace", AdaptiveSharpness(num_draws=4), FisherRaoNorm()], **SMALL)
    trainer(tmp_path, [cb], max_epochs=1).fit(Classifier(), DataModule())
    x, last = cb.history[-1]
    for key in ("flatness/adaptive_sharpness", "flatness/fisher_rao_norm"):
        assert math.isfinite(last[key]) and last[key + "_se"] > 0
    assert last["flatness/fisher_rao_norm"] > 0 and x == 1


def _shard(rank: int) -> tuple:
    """One process's measures on its shard (uneven: 12 and 8 samples), reduced across both."""
    model, batches = tiny_mlp(), mlp_batches()
    mine = batches[:2] if rank == 0 else batches[2:]
    sharp = adaptive_sharpness(model, mine, num_draws=6, generator=3)
    fr = fisher_rao_norm(model, mine)
    return (sharp.value, sharp.se_draws, sharp.se_samples, sharp.loss, fr.value, fr.se)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one():
    results = in_two_processes(_shard)
    model, batches = tiny_mlp(), mlp_batches()
    sharp = adaptive_sharpness(model, batches, num_draws=6, generator=3)
    fr = fisher_rao_norm(model, batches)
    want = (sharp.value, sharp.se_draws, sharp.se_samples, sharp.loss, fr.value, fr.se)
    for result in results:
        assert result == pytest.approx(want, rel=1e-10)
