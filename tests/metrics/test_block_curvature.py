"""BlockCurvature: its keys (known at construction, or from the model at the callback's setup), options and logging."""

from __future__ import annotations

import pytest

from lightning_flatness import BlockCurvature, FlatnessCallback, keys
from lightning_flatness.functional import block_curvature
from lightning_flatness.metrics import BUILTIN, DEFAULT_METRICS, MeasurementContext
from tests.helpers.lightning_models import Classifier, DataModule, trainer
from tests.helpers.models import mlp_batches, tiny_mlp

SMALL = {"num_samples": 64, "batch_size": 16, "gap_num_samples": 0}


def block_keys(*names: str) -> set[str]:
    values = {k for n in names for k in (keys.hessian_top_eig_block(n), keys.hessian_trace_block(n))}
    return values | {keys.se(k) for k in values}


def test_keys_of_named_blocks_are_known_at_construction():
    metric = BlockCurvature(blocks={"hidden": "net.0.*", "head": ["net.4.weight", "net.4.bias"]})
    assert set(metric.keys) == block_keys("hidden", "head")
    assert keys.hessian_top_eig_block("head") == "flatness/hessian_top_eig/head"
    assert keys.se(keys.hessian_trace_block("head")) == "flatness/hessian_trace/head_se"
    assert BUILTIN["block_curvature"] is BlockCurvature and "block_curvature" not in DEFAULT_METRICS
    by_module = BlockCurvature()
    assert by_module.keys == ()  # "by_module": the names come with the model
    by_module.setup(Classifier())
    assert set(by_module.keys) == block_keys("0", "1", "4")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"blocks": "per_layer"}, "blocks='per_layer' is not accepted"),
        ({"blocks": {"a/b": "*"}}, "blocks: block name 'a/b'"),
        ({"trace_probes": 0}, "trace_probes"),
        ({"tol": 0.0}, "tol"),
        ({"warm_start": 1}, "warm_start"),
    ],
)
def test_bad_options_are_refused_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        BlockCurvature(**options)


def test_compute_is_the_functional_estimate_and_warm_starts_the_next():
    model, batches = tiny_mlp(), mlp_batches()
    metric = BlockCurvature(trace_probes=4)
    metric.setup(model)
    ctx = MeasurementContext(model=model, batches=batches, loss_fn="cross_entropy", epoch=1, seed=0, num_samples=20)
    out = metric.compute(ctx)
    assert set(out) == set(metric.keys) == block_keys("0", "2")
    direct = block_curvature(model, batches, trace_probes=4, generator=ctx.seed_for("block_curvature"), error_ratio=0.1)
    assert out[keys.hessian_top_eig_block("2")] == direct["2"].top_eig
    assert out[keys.hessian_trace_block("0")] == direct["0"].trace
    assert set(metric.state_dict()["vectors"]) == {"0", "2"}
    again = metric.compute(ctx)  # from last measurement's eigenvectors: the same eigenvalue, within its error target
    tight = block_curvature(model, batches, trace_probes=4, tol=1e-10, max_iter=300)["2"]
    for value in (again[keys.hessian_top_eig_block("2")], direct["2"].top_eig):
        assert abs(value - tight.top_eig) <= 0.1 * tight.top_eig_se


def test_the_callback_logs_every_blocks_keys(tmp_path):
    cb = FlatnessCallback(metrics=["hessian_top_eig", BlockCurvature(trace_probes=4)], **SMALL)
    trainer(tmp_path, [cb], max_epochs=1).fit(Classifier(), DataModule())
    ((x, values),) = cb.history
    assert x == 1
    assert set(values) == {"flatness/hessian_top_eig", "flatness/hessian_top_eig_se", "flatness/seconds"} | block_keys(
        "0", "1", "4"
    )  # the wrapped net's Linear, BatchNorm and Linear
    whole = values["flatness/hessian_top_eig"]
    for name in ("0", "1", "4"):  # interlacing, up to Lanczos' tolerance
        assert 0 < values[keys.hessian_top_eig_block(name)] <= whole * 1.01
        assert values[keys.hessian_trace_block(name)] > 0
    assert set(cb.state_dict()["metrics"]["block_curvature"]["vectors"]) == {"0", "1", "4"}


def test_patterns_are_checked_against_the_model_when_training_starts(tmp_path):
    cb = FlatnessCallback(metrics=[BlockCurvature(blocks={"head": "classifier.*"})], **SMALL)
    with pytest.raises(ValueError, match=r"blocks\['head'\].*matches no trainable parameter.*'net\.0\.weight'"):
        trainer(tmp_path, [cb], max_epochs=1).fit(Classifier(), DataModule())


def test_model_dependent_keys_may_not_clash_with_another_metrics():
    class Clash(BlockCurvature):
        name = "clash"

    cb = FlatnessCallback(metrics=[BlockCurvature(), Clash(blocks={"0": "net.0.*"})], **SMALL)
    with pytest.raises(ValueError, match="same key.*hessian_top_eig/0"):
        cb._setup_metrics(Classifier())


def test_setup_adds_the_keys_to_the_callbacks_values():
    cb = FlatnessCallback(metrics=[BlockCurvature()], **SMALL)
    cb._setup_metrics(Classifier())
    cb._setup_metrics(Classifier())  # idempotent: a second fit, or validate after fit
    assert block_keys("0", "1", "4") <= set(cb.values.keys())
