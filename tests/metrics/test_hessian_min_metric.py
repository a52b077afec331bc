"""``HessianMinEigenvalue``: λ_min and |λ_min/λ_max| per measurement, the top pair shared or its own, warm
starts across measurements and checkpoints, the unconverged warning; through the callback."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from lightning.pytorch import seed_everything

from lightning_flatness import FlatnessCallback, HessianEigenvalues, HessianMinEigenvalue, keys
from lightning_flatness.metrics import BUILTIN, DEFAULT_METRICS, MeasurementContext
from lightning_flatness.metrics import hessian_min as hessian_min_module
from tests.helpers.lightning_models import Classifier, DataModule, full_and_resumed, trainer
from tests.helpers.models import mlp_batches, tiny_mlp
from tests.helpers.oracles import dense_hessian

torch.set_num_threads(1)
SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=0)


def context(model=None, batches=None, epoch: int = 1) -> MeasurementContext:
    return MeasurementContext(model=model or tiny_mlp(), batches=batches or mlp_batches(), loss_fn="cross_entropy",
                              epoch=epoch, seed=0, num_samples=20)  # fmt: skip


def spy(monkeypatch) -> list[dict]:
    calls = []
    real = hessian_min_module.hessian_eigenvalue_ratio

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append({**kwargs, "result": out})
        return out

    monkeypatch.setattr(hessian_min_module, "hessian_eigenvalue_ratio", record)
    return calls


def test_logs_the_dense_values_with_the_shared_top_pair_or_its_own(monkeypatch):
    calls = spy(monkeypatch)
    model, batches = tiny_mlp(), mlp_batches()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches))
    own = HessianMinEigenvalue(tol=1e-8).compute(context(model, batches))
    ctx = context(model, batches)
    top = HessianEigenvalues(tol=1e-8).compute(ctx)
    shared = HessianMinEigenvalue(tol=1e-8).compute(ctx)
    assert calls[0]["top"] is None and calls[1]["top"][0] == top[keys.HESSIAN_TOP_EIG]
    assert calls[1]["result"].largest.n_hvp == 1  # the shared vector's per-mini-batch quotients
    for row in (own, shared):
        assert set(row) == set(HessianMinEigenvalue().keys)
        assert row[keys.HESSIAN_MIN_EIG] == pytest.approx(exact[0].item(), rel=1e-6)
        assert row[keys.HESSIAN_EIG_RATIO] == pytest.approx(-exact[0].item() / exact[-1].item(), rel=1e-6)
        assert row[keys.se(keys.HESSIAN_EIG_RATIO)] > 0
    assert shared[keys.HESSIAN_EIG_RATIO] == -shared[keys.HESSIAN_MIN_EIG] / top[keys.HESSIAN_TOP_EIG]
    assert shared[keys.se(keys.HESSIAN_EIG_RATIO)] == pytest.approx(own[keys.se(keys.HESSIAN_EIG_RATIO)], rel=1e-4)


def test_warm_start_across_measurements_and_from_a_checkpoint(monkeypatch):
    calls = spy(monkeypatch)
    metric = HessianMinEigenvalue()
    first = metric.compute(context())
    second = metric.compute(context(epoch=2))
    assert calls[0]["init"] is None and calls[0]["top_init"] is None
    assert torch.equal(calls[1]["init"], calls[0]["result"].smallest.vectors)
    assert torch.equal(calls[1]["top_init"], calls[0]["result"].largest.vectors)
    assert calls[1]["result"].n_hvp < calls[0]["result"].n_hvp, (calls[1]["result"].n_hvp, calls[0]["result"].n_hvp)
    assert second[keys.HESSIAN_MIN_EIG] == pytest.approx(first[keys.HESSIAN_MIN_EIG], rel=1e-3)
    resumed = HessianMinEigenvalue()
    resumed.load_state_dict(metric.state_dict())
    assert resumed.compute(context(epoch=3)) == metric.compute(context(epoch=3))
    assert torch.equal(calls[-1]["init"], calls[-2]["init"])  # the same start: the same measurement
    fresh = HessianMinEigenvalue(warm_start=False)
    fresh.load_state_dict(metric.state_dict())
    fresh.compute(context())
    assert calls[-1]["init"] is None


def test_a_value_lanczos_did_not_converge_to_is_logged_with_a_warning_once():
    metric = HessianMinEigenvalue(max_iter=3, verify=False)
    with pytest.warns(UserWarning, match=r"did not converge to λ_min .*max_iter=3"):
        first = metric.compute(context())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metric.compute(context())  # once per metric
    assert math.isfinite(first[keys.HESSIAN_MIN_EIG])


def test_one_mini_batch_logs_the_values_without_error_bars():
    x = torch.cat([b[0] for b in mlp_batches()])
    y = torch.cat([b[1] for b in mlp_batches()])
    row = HessianMinEigenvalue().compute(context(batches=[(x, y)]))
    assert set(row) == {keys.HESSIAN_MIN_EIG, keys.HESSIAN_EIG_RATIO}


@pytest.mark.parametrize(
    "kwargs",
    [{"tol": 0.0}, {"error_ratio": 1.5}, {"max_iter": 0}, {"cache_chunks": -1}, {"warm_start": "yes"}, {"verify": None},
     {"every_n_epochs": 0}],
)  # fmt: skip
def test_options_are_checked_at_construction(kwargs):
    with pytest.raises((ValueError, TypeError), match=next(iter(kwargs))):
        HessianMinEigenvalue(**kwargs)


def test_through_the_callback_opt_in_and_read_beside_the_top_eigenvalue(tmp_path):
    assert "hessian_min_eig" in BUILTIN and "hessian_min_eig" not in DEFAULT_METRICS
    cb = FlatnessCallback(metrics=["hessian_min_eig", "hessian_top_eig"], on_error="raise", **SMALL)
    assert [m.name for m in cb._order][-1] == "hessian_min_eig"  # after the top eigenpair it reads
    seed_everything(0)
    trainer(tmp_path, [cb], max_epochs=2).fit(Classifier(), DataModule())
    for _, row in cb.history:
        assert row[keys.HESSIAN_MIN_EIG] < 0 < row[keys.HESSIAN_EIG_RATIO]
        assert row[keys.HESSIAN_EIG_RATIO] == pytest.approx(-row[keys.HESSIAN_MIN_EIG] / row[keys.HESSIAN_TOP_EIG], rel=1e-6)
        assert row[keys.se(keys.HESSIAN_EIG_RATIO)] > 0 and row[keys.se(keys.HESSIAN_MIN_EIG)] > 0
    saved = cb.state_dict()["metrics"]["hessian_min_eig"]
    assert saved["vectors"].shape[0] == 1 and saved["top_vectors"] is None  # the shared top is not its own


def test_resume_from_a_checkpoint_logs_the_same_values(tmp_path):
    """Alone, the metric solves for λ_max too: both of its warm starts travel in the checkpoint."""

    full, resumed = full_and_resumed(tmp_path, lambda: FlatnessCallback(metrics=["hessian_min_eig"], **SMALL))
    assert [x for x, _ in resumed.history] == [2, 3]
    for (xa, a), (xb, b) in zip(full.history[1:], resumed.history):
        assert xa == xb
        for key in (keys.HESSIAN_MIN_EIG, keys.HESSIAN_EIG_RATIO):
            assert math.isclose(a[key], b[key], rel_tol=1e-9), (key, a[key], b[key])
