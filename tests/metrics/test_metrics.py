"""Metric objects: options, keys, names, order of execution, schedules and state, and the old flat options."""

from __future__ import annotations

import pytest
import torch

from lightning_flatness import (
    FisherTrace,
    FlatnessCallback,
    GradCosineRegret,
    GradientNoiseScale,
    HessianEigenvalues,
    LocalEntropy,
    PACGen,
)
from lightning_flatness.metrics import (
    BUILTIN,
    DEFAULT_METRICS,
    FlatnessMetric,
    MeasurementContext,
    SharedResults,
    execution_order,
    resolve_metrics,
)
from tests.helpers.lightning_models import Classifier, DataModule, trainer

SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=0)


def test_names_stand_for_default_configured_objects_with_the_same_keys():
    metrics = resolve_metrics(list(DEFAULT_METRICS) + ["local_entropy"])
    assert [type(m) for m in metrics] == [
        HessianEigenvalues, GradCosineRegret, FisherTrace, PACGen, GradientNoiseScale, LocalEntropy,
    ]  # fmt: skip
    assert [m.name for m in metrics] == list(BUILTIN)[: len(metrics)]  # later entries: tested in their own files
    assert [[k for k in m.keys if not k.endswith("_se")] for m in metrics] == [
        ["flatness/hessian_top_eig"], ["flatness/grad_cosine_regret", "flatness/grad_cosine"],
        ["flatness/fisher_trace"], ["flatness/pacgen", "flatness/pacgen_curved_fraction"],
        ["flatness/grad_noise_scale"], ["flatness/local_entropy"],
    ]  # fmt: skip
    for metric in metrics:  # every value with its standard error
        values = {k for k in metric.keys if not k.endswith("_se") and k != "flatness/pacgen_curved_fraction"}
        assert {k for k in metric.keys if k.endswith("_se")} == {k + "_se" for k in values}
    eigs = ("flatness/hessian_top_eig", *(f"flatness/hessian_eig_{j}" for j in (1, 2, 3)))
    assert HessianEigenvalues(k=3).keys == eigs + tuple(k + "_se" for k in eigs)


def test_options_are_kept_under_their_names_and_shown_in_repr():
    pac = PACGen(gamma=0.2, rho=0.0)
    assert pac.hparams() == dict(
        normalization="sum", num_train=None, gamma=0.2, eps=0.1, rho=0.0, num_probes=None, rho_probes=3, screen=True,
        error_ratio=0.1, every_n_epochs=None,
    )
    assert repr(pac) == "PACGen(gamma=0.2, rho=0.0)" and repr(FisherTrace()) == "FisherTrace()"


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (["sharpness"], ValueError, "unknown metric 'sharpness'.*hessian_top_eig"),
        ([3], TypeError, "FlatnessMetric objects"),
        (42, TypeError, "list of metric names"),
        (["pacgen", PACGen()], ValueError, "twice"),
    ],
)
def test_bad_metric_lists_are_refused(spec, error, match):
    with pytest.raises(error, match=match):
        resolve_metrics(spec)


def test_providers_run_before_the_metrics_that_use_their_results():
    pac, fisher, eig = PACGen(), FisherTrace(), HessianEigenvalues()
    assert execution_order([pac, fisher, eig]) == [fisher, eig, pac]
    assert execution_order([pac, fisher]) == [pac, fisher]  # nothing provides hessian_max: the given order


class Counting(FlatnessMetric):
    """Counts its measurements; logs the epoch and the bound the eigenvalue metric left."""

    name = "counting"
    uses = ("hessian_max",)

    def __init__(self, every_n_epochs: int | None = None) -> None:
        super().__init__(every_n_epochs)
        self.keys = ("flatness/counting", "flatness/counting_bound")
        self.count = 0

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        self.count += 1
        return {"flatness/counting": float(ctx.epoch), "flatness/counting_bound": ctx.shared.hessian_max or -1.0}

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_each_metric_has_its_own_schedule_and_the_final_weights_get_all(tmp_path):
    counting, fisher = Counting(every_n_epochs=2), FisherTrace()
    cb = FlatnessCallback(metrics=[counting, fisher, HessianEigenvalues(every_n_epochs=3)], **SMALL)
    trainer(tmp_path, [cb], max_epochs=5).fit(Classifier(), DataModule())
    logged = {x: {k for k in values if not k.endswith("_se")} - {"flatness/seconds"} for x, values in cb.history}
    assert logged == {
        1: {"flatness/fisher_trace"},
        2: {"flatness/fisher_trace", "flatness/counting", "flatness/counting_bound"},
        3: {"flatness/fisher_trace", "flatness/hessian_top_eig"},
        4: {"flatness/fisher_trace", "flatness/counting", "flatness/counting_bound"},
        5: {"flatness/fisher_trace", "flatness/counting", "flatness/counting_bound", "flatness/hessian_top_eig"},
    }
    # the bound reaches the user's metric only when the eigenvalue was measured in the same measurement
    assert cb.history[1][1]["flatness/counting_bound"] == -1.0
    assert cb.history[4][1]["flatness/counting_bound"] == 2 * cb.history[4][1]["flatness/hessian_top_eig"]
    assert cb.state_dict()["metrics"]["counting"] == {"count": 3}


def test_metric_state_is_checkpointed_and_restored():
    cb = FlatnessCallback(metrics=[HessianEigenvalues(), Counting()], **SMALL)
    cb.metrics[0].vectors, cb.metrics[1].count = torch.ones(1, 5), 7
    fresh = FlatnessCallback(metrics=[HessianEigenvalues(), Counting()], **SMALL)
    fresh.load_state_dict(cb.state_dict())
    assert torch.equal(fresh.metrics[0].vectors, torch.ones(1, 5)) and fresh.metrics[1].count == 7
    old = {"version": 1, "eig_vectors": torch.zeros(1, 5), "indices": {}}  # a checkpoint of version 0.1
    fresh.load_state_dict(old)
    assert torch.equal(fresh.metrics[0].vectors, torch.zeros(1, 5))


def test_deprecated_flat_options_still_work_and_show_the_new_spelling():
    with pytest.warns(FutureWarning, match=r"HessianEigenvalues\(k=3\).*PACGen\(eps=0\.5, screen=False\)"):
        cb = FlatnessCallback(k=3, eps=0.5, pacgen_screen=False, landscape_every_n_epochs=2, **SMALL)
    assert [repr(m) for m in cb.metrics] == [
        "HessianEigenvalues(k=3)", "GradCosineRegret()", "FisherTrace()", "PACGen(eps=0.5, screen=False)",
        "GradientNoiseScale()",
    ]  # fmt: skip
    assert cb._landscape.options.every_n_epochs == 2
    with pytest.raises(ValueError, match="k"):
        FlatnessCallback(metrics=["fisher_trace"], k=0)  # still validated when the metric is not measured
    with pytest.raises(ValueError, match="both"):
        FlatnessCallback(metrics=[HessianEigenvalues(k=2)], tol=1e-6)
    with pytest.raises(TypeError, match="unexpected keyword argument.*bogus"):
        FlatnessCallback(bogus=1)


def test_two_metrics_may_not_log_the_same_key():
    class Clash(Counting):
        name = "clash"

    with pytest.raises(ValueError, match="same key"):
        resolve_metrics([Counting(), Clash()])


def test_shared_results_start_empty():
    assert SharedResults() == SharedResults(None, None, None)


def test_the_regret_hands_its_gradient_to_the_eigenvalue_cold_start():
    from lightning_flatness.functional import Objective, hessian_eigenvalues, measurement_mode
    from tests.helpers.models import mlp_batches, tiny_mlp

    model, batches = tiny_mlp(), mlp_batches((5, 7, 8))
    regret, eig = GradCosineRegret(), HessianEigenvalues()
    assert execution_order([eig, regret]) == [regret, eig]
    ctx = MeasurementContext(model, batches, "cross_entropy", epoch=0, seed=0, num_samples=20)
    with measurement_mode(model):
        regret.compute(ctx)
        assert torch.equal(ctx.shared.gradient, Objective(model, batches).gradient())  # bit for bit
    values = eig.compute(ctx)
    options = eig.solver_options()
    alone = hessian_eigenvalues(model, batches, generator=ctx.seed_for("hessian_top_eig"), **options)
    assert values["flatness/hessian_top_eig"] == alone.values[0].item() and alone.n_grad == 1
    shared = hessian_eigenvalues(model, batches, generator=ctx.seed_for("hessian_top_eig"), gradient=ctx.shared.gradient,
                                 **options)  # fmt: skip
    assert shared.n_grad == 0 and torch.equal(shared.values, alone.values)


def test_a_noisy_value_warns_once_with_the_samples_it_would_need(tmp_path, monkeypatch):
    from lightning_flatness import NoisyMeasurementWarning, keys

    monkeypatch.setattr(keys, "RELATIVE_SE_WARNING", 0.0)  # every value with an error is "noisy"
    cb = FlatnessCallback(metrics=["fisher_trace"], num_samples=64, batch_size=16, gap_num_samples=96)
    with pytest.warns(NoisyMeasurementWarning, match=r"flatness/fisher_trace = .* ± .*About \d+ samples would bring it under 5%") as record:
        trainer(tmp_path, [cb], max_epochs=3).fit(Classifier(), DataModule())
    noisy = [str(w.message) for w in record if w.category is NoisyMeasurementWarning]
    assert sorted(m.split(" = ")[0].split(": ")[1] for m in noisy) == ["flatness/fisher_trace", "gap/test_loss", "gap/train_loss"]
    assert any("(over the draw of its 96 samples; gap_num_samples=96)" in m for m in noisy)


def _noisy_messages(tmp_path, name):
    """One epoch measuring the Fisher trace (the same values every call); the callback and its notices."""
    import warnings

    from lightning.pytorch import seed_everything

    seed_everything(0)
    cb = FlatnessCallback(metrics=["fisher_trace"], num_samples=64, batch_size=16, gap_num_samples=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path / name, [cb], max_epochs=1).fit(Classifier(), DataModule())
    return cb, [str(w.message) for w in record if "flatness/fisher_trace = " in str(w.message)], record


def test_the_noisy_notice_says_when_the_data_cannot_give_the_samples(tmp_path, monkeypatch):
    """Issue 23, item 10: "about 13999 samples would bring it under 5%" on a 4000-sample training set,
    and "see docs/faq.md", a file an installed package does not have."""
    from lightning_flatness import NoisyMeasurementWarning, keys

    monkeypatch.setattr(keys, "RELATIVE_SE_WARNING", 0.0)
    monkeypatch.setattr(keys, "RELATIVE_SE_TARGET", 0.001)  # needs far more than the 256 training samples
    cb, (message,), record = _noisy_messages(tmp_path, "a")
    assert all(w.category is NoisyMeasurementWarning for w in record if "flatness/fisher_trace" in str(w.message))
    value, se = cb.history[0][1]["flatness/fisher_trace"], cb.history[0][1]["flatness/fisher_trace_se"]
    whole = f"{abs(se / value) * (64 / 256) ** 0.5:.0%}"
    assert "more than the 256 samples the training set holds" in message
    assert f"all of them (num_samples=256) would bring it to about {whole}; beyond that, average the value over runs with several seeds" in message
    assert "docs/faq.md" not in message and "help(lightning_flatness.NoisyMeasurementWarning)" in message
    assert "filterwarnings" in NoisyMeasurementWarning.__doc__  # what the pointer leads to, installed


def test_the_noisy_notice_never_reads_20_percent_above_20_percent(tmp_path, monkeypatch):
    """Issue 23, item 10: a relative error just above the threshold printed as "20%, above 20%"."""
    from lightning_flatness import keys

    monkeypatch.setattr(keys, "RELATIVE_SE_WARNING", 0.0)
    cb, _, _ = _noisy_messages(tmp_path, "a")
    row = cb.history[0][1]
    relative = abs(row["flatness/fisher_trace_se"] / row["flatness/fisher_trace"])
    monkeypatch.setattr(keys, "RELATIVE_SE_WARNING", relative - 1e-6)  # above it, but the same when printed
    assert f"{relative:.0%}" == f"{keys.RELATIVE_SE_WARNING:.0%}"
    again, messages, _ = _noisy_messages(tmp_path, "b")
    fisher = ("flatness/fisher_trace", "flatness/fisher_trace_se")
    assert [again.history[0][1][k] for k in fisher] == [row[k] for k in fisher] and messages == []


def test_every_logged_value_has_its_se_except_the_keys_the_readme_names():
    """Issue 23, item 13: the README said every key has a ``_se``; ``flatness/pacgen_curved_fraction``
    has none. The keys without one are ``keys.NO_SE``, and the README's ``<key>_se`` row names them."""
    from pathlib import Path

    from lightning_flatness import keys

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    metrics = resolve_metrics(list(BUILTIN))
    for metric in metrics:
        metric.setup(model)  # BlockCurvature("by_module") names its keys here
    logged = {k for m in metrics for k in m.keys} | {keys.SECONDS}
    logged |= {keys.split_loss(s) for s in ("train", "test")} | {keys.LOSS_GAP}
    values = {k for k in logged if not k.endswith("_se")}
    gap_se = {keys.se(k) for k in values if k.startswith(keys.GAP_PREFIX)}  # the gap's, from GapMeter.derived
    assert {k for k in values if keys.se(k) not in logged | gap_se} == set(keys.NO_SE)
    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `<key>_se` |")]
    assert all(f"`{key}`" in row for key in keys.NO_SE), row
