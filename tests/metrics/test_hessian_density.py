"""HessianDensity through the callback: its scalars, and the image, histogram and JSON it logs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_flatness import FlatnessCallback, HessianDensity, keys
from lightning_flatness.functional import hessian_spectral_density
from lightning_flatness.metrics import BUILTIN, DEFAULT_METRICS, measurement_seed
from lightning_flatness.metrics import spectral_density as density_module
from lightning_flatness.metrics.spectral_density import read_final_density
from tests.helpers.lightning_models import Classifier, DataModule, trainer
from tests.helpers.loggers import offline_wandb

torch.set_num_threads(1)
SMALL = {"num_samples": 32, "batch_size": 16, "gap_num_samples": 0}


def fit(tmp_path, metric, logger, **kwargs):
    seed_everything(0)
    cb = FlatnessCallback(metrics=[metric], **SMALL, **kwargs)
    model = Classifier(hidden=8)
    trainer(tmp_path, [cb], logger=logger, max_epochs=3).fit(model, DataModule(n_train=64, n_val=32))
    return cb, model


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_logs_scalars_image_histogram_and_json_at_its_epochs(tmp_path):
    tb, cv = TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")
    metric = HessianDensity(num_probes=3, lanczos_steps=6, every_n_epochs=2)
    cb, model = fit(tmp_path, metric, [tb, cv], measure_at_start=True)
    acc = events(tb.log_dir)
    assert [x for x, v in cb.history if keys.HESSIAN_TRACE_SLQ in v] == [0, 2, 3]  # init, epoch 2, the final weights
    # at Lightning's step and epoch index of the same weights (2 batches an epoch; issue 23, item 12)
    steps, epochs = [0, 3, 5], [-1, 1, 2]
    assert [e.step for e in acc.Images(keys.HESSIAN_DENSITY_IMAGE)] == steps
    histograms = acc.Histograms(keys.HESSIAN_DENSITY_HISTOGRAM)
    assert [e.step for e in histograms] == steps
    assert [e.step for e in acc.Scalars(keys.HESSIAN_TRACE_SLQ)] == steps
    for name in (tb.log_dir, cv.log_dir):
        assert sorted(os.listdir(os.path.join(name, "hessian_density"))) == [f"epoch_{e:06d}.json" for e in epochs]
    # The logged values are the functional ones on the measurement subsample with the metric's seed.
    res = hessian_spectral_density(
        model, cb._data["measure"], num_probes=3, lanczos_steps=6,
        generator=measurement_seed(0, 3, "hessian_density"),
    )  # fmt: skip
    last = cb.history[-1][1]
    assert last[keys.HESSIAN_TRACE_SLQ] == pytest.approx(res.trace()[0], rel=1e-5)
    assert last[keys.se(keys.HESSIAN_TRACE_SLQ)] == pytest.approx(res.trace()[1], rel=1e-4)
    assert last[keys.HESSIAN_DENSITY_NEGATIVE_MASS] == pytest.approx(res.negative_mass(0.01)[0], abs=1e-6)
    final = histograms[-1].histogram_value
    assert final.num == res.num_params and final.sum == pytest.approx(res.trace()[0], rel=1e-4)
    assert sum(final.bucket) == pytest.approx(res.num_params, rel=1e-6)
    saved = read_final_density(tb.log_dir)
    assert (saved["epoch"], saved["step"], saved["epochs_completed"]) == (2, 5, 3)
    assert saved["num_params"] == res.num_params
    assert torch.allclose(torch.tensor(saved["nodes"], dtype=torch.float64), res.nodes, atol=1e-4)
    grid = torch.tensor(saved["grid"])
    assert torch.trapezoid(torch.tensor(saved["density"]), grid).item() == pytest.approx(1.0, abs=1e-4)


def test_failing_figure_warns_once_and_keeps_the_scalars(tmp_path, monkeypatch):
    monkeypatch.setattr(density_module, "density_figure", lambda *a: 1 / 0)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    with pytest.warns(UserWarning, match="hessian_density's figures failed") as record:
        cb, _ = fit(tmp_path, HessianDensity(num_probes=2, lanczos_steps=3), tb)
    assert sum("hessian_density's figures" in str(w.message) for w in record) == 1
    assert [x for x, v in cb.history if keys.HESSIAN_TRACE_SLQ in v] == [1, 2, 3]
    with pytest.raises(ZeroDivisionError):
        fit(tmp_path, HessianDensity(num_probes=2, lanczos_steps=3), tb, on_error="raise")


def test_log_density_false_logs_scalars_only(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    cb, _ = fit(tmp_path, HessianDensity(num_probes=1, lanczos_steps=3, log_density=False, every_n_epochs=5), tb)
    acc = events(tb.log_dir)
    assert acc.Tags()["images"] == [] and acc.Tags()["histograms"] == []
    assert not os.path.exists(os.path.join(tb.log_dir, "hessian_density"))
    assert [x for x, v in cb.history if keys.HESSIAN_TRACE_SLQ in v] == [3]  # only the final weights
    assert keys.se(keys.HESSIAN_TRACE_SLQ) not in cb.history[-1][1]  # one probe: no standard error


def test_registered_opt_in_and_bad_arguments():
    assert BUILTIN["hessian_density"] is HessianDensity and "hessian_density" not in DEFAULT_METRICS
    assert FlatnessCallback(metrics=["hessian_density"]).metrics[0].lanczos_steps == 64
    for kwargs, name in (({"num_probes": 0}, "num_probes"), ({"lanczos_steps": -1}, "lanczos_steps"),
                         ({"probes": "sphere"}, "probes"), ({"sigma": 0.0}, "sigma"), ({"cache_chunks": -1}, "cache_chunks"),
                         ({"log_density": "yes"}, "log_density"), ({"negative_threshold": -0.1}, "negative_threshold"),
                         ({"negative_threshold": 2.0}, "negative_threshold"), ({"every_n_epochs": 0}, "every_n_epochs")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            HessianDensity(**kwargs)


def test_wandb_offline_gets_image_and_histogram_at_epochs(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    wb, experiment, logged = offline_wandb(tmp_path, monkeypatch)
    try:
        fit(tmp_path, HessianDensity(num_probes=2, lanczos_steps=3, every_n_epochs=2), wb)
    finally:
        experiment.finish()
    rows = [r for r in logged if keys.HESSIAN_DENSITY_IMAGE in r]
    assert [(r["epoch"], r["trainer/global_step"]) for r in rows] == [(1, 3), (2, 5)]
    assert all(isinstance(r[keys.HESSIAN_DENSITY_IMAGE], wandb.Image) for r in rows)
    assert all(isinstance(r[keys.HESSIAN_DENSITY_HISTOGRAM], wandb.Histogram) for r in rows)


def test_training_is_bit_identical_with_the_metric_and_its_figures(tmp_path):
    seed_everything(0)
    plain = Classifier(hidden=8)
    trainer(tmp_path / "a", max_epochs=3).fit(plain, DataModule(n_train=64, n_val=32))
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    _, measured = fit(tmp_path / "b", HessianDensity(num_probes=2, lanczos_steps=4, probes="gaussian"), tb,
                      measure_at_start=True)  # fmt: skip
    a, b = plain.state_dict(), measured.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit_on_two_processes(tmp_path) -> tuple[Classifier, DataModule]:
    seed_everything(0)
    model = Classifier(dropout=0.0)
    dm = DataModule(shuffle=False)
    cb = FlatnessCallback([HessianDensity(num_probes=2, lanczos_steps=5)], num_samples=96, batch_size=16,
                          gap_num_samples=0, every_n_epochs=0)  # fmt: skip
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer(tmp_path, [cb], logger=logger, max_epochs=1, strategy="ddp_spawn", devices=2).fit(model, dm)
    return model, dm


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_single_process_and_rank_zero_writes(tmp_path):
    from torch.multiprocessing import ProcessExitedException

    from tests.callback.test_callback_ddp import subsample

    try:
        model, dm = _fit_on_two_processes(tmp_path)
    except ProcessExitedException as err:
        # A spawned process sometimes aborts at interpreter exit, after the fit, with no Python frame ("terminate
        # called without an active exception": gloo's threads at C++ teardown), in about 1 run in 10 after other
        # tests of the session, the same at the commit before issue 23. One more fit, in a fresh folder.
        if err.signal_name != "SIGABRT":
            raise
        tmp_path = tmp_path / "again"
        model, dm = _fit_on_two_processes(tmp_path)
    [version] = os.listdir(os.path.join(tmp_path, "csv"))  # only rank 0 wrote
    assert os.listdir(os.path.join(tmp_path, "csv", version, "hessian_density")) == ["epoch_000000.json"]
    saved = read_final_density(os.path.join(tmp_path, "csv", version))
    res = hessian_spectral_density(model, subsample(dm.train_set, 0, 96, 16), num_probes=2, lanczos_steps=5,
                                   generator=measurement_seed(0, 1, "hessian_density"))  # fmt: skip
    assert torch.allclose(torch.tensor(saved["nodes"], dtype=torch.float64), res.nodes, rtol=1e-4, atol=1e-6)
