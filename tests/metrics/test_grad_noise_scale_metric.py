"""GradientNoiseScale: it reuses the regret's gradient and projections and the Fisher's per-sample
norms (same numbers as computing them itself, and FisherTrace's own value unchanged), logs nothing
but warns once when |G|² is not resolved, and runs in the callback's defaults."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_flatness import (
    FisherTrace,
    FlatnessCallback,
    GradCosineRegret,
    GradientNoiseScale,
)
from lightning_flatness.functional import (
    fisher_trace,
    grad_noise_scale,
    measurement_mode,
)
from lightning_flatness.metrics import (
    DEFAULT_METRICS,
    MeasurementContext,
    execution_order,
)
from tests.helpers.lightning_models import Classifier, DataModule, trainer
from tests.helpers.models import mlp_batches, mostly_zero_labels, tiny_mlp

KEY = "flatness/grad_noise_scale"


def context(model, batches) -> MeasurementContext:
    return MeasurementContext(
        model, batches, "cross_entropy", epoch=0, seed=0, num_samples=sum(len(b[1]) for b in batches)
    )


def test_shared_results_give_the_functional_value_and_leave_the_fisher_unchanged():
    model, batches = tiny_mlp(), mlp_batches((8, 8, 8, 8))
    noise, regret, fisher = GradientNoiseScale(), GradCosineRegret(), FisherTrace()
    assert execution_order([noise, fisher, regret]) == [fisher, regret, noise]
    ctx = context(model, batches)
    with measurement_mode(model):
        values = {}
        for metric in (fisher, regret, noise):
            values.update(metric.compute(ctx))
        assert len(ctx.shared.sample_sq_norms) == len(ctx.shared.batch_gradient_dots) == 4
        alone = GradientNoiseScale().compute(context(model, batches))
    direct = grad_noise_scale(model, batches)
    assert values[KEY] == alone[KEY] == direct.value and values[KEY + "_se"] == direct.se
    assert values["flatness/fisher_trace"] == fisher_trace(model, batches).value  # bit for bit
    with measurement_mode(model):  # kind="mc" has no per-sample norms of the data's labels to share
        ctx = context(model, batches)
        FisherTrace(kind="mc").compute(ctx)
    assert ctx.shared.sample_sq_norms is None


def test_unresolved_gradient_logs_nothing_and_warns_once():
    model = torch.nn.Linear(3, 2).double()
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batches = [(x, torch.zeros(10, dtype=torch.long)), (x, torch.ones(10, dtype=torch.long))]  # Ḡ = 0
    metric = GradientNoiseScale()
    with measurement_mode(model):
        with pytest.warns(UserWarning, match="buried in the noise of 20 samples"):
            assert metric.compute(context(model, batches)) == {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert metric.compute(context(model, batches)) == {}  # once only


def test_in_the_defaults_it_is_logged_by_the_callback(tmp_path):
    assert "grad_noise_scale" in DEFAULT_METRICS
    cb = FlatnessCallback(num_samples=64, batch_size=16, gap_num_samples=0, measure_at_start=True, on_error="raise")
    trainer(tmp_path, [cb], max_epochs=1).fit(Classifier(dropout=0.0), DataModule())
    logged = [v for _, v in cb.history if KEY in v]
    assert logged and all(v[KEY] > 0 and math.isfinite(v[KEY + "_se"]) for v in logged)


def test_one_mini_batch_logs_the_value_without_an_error_bar():
    model, x, y = tiny_mlp(), *mostly_zero_labels(48)  # a mean gradient above the noise
    batches = [(x, y)]
    with measurement_mode(model):
        out = GradientNoiseScale().compute(context(model, batches))
    assert set(out) == {KEY} and math.isfinite(out[KEY]) and out[KEY] > 0
