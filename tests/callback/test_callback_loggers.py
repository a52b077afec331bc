"""FlatnessCallback with TensorBoard, CSV and W&B loggers, hyperparameters, progress and LightningCLI."""

from __future__ import annotations

import csv
import logging
import os

import pytest
import yaml
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_flatness import FlatnessCallback
from tests.helpers.lightning_models import Classifier, DataModule, trainer
from tests.helpers.loggers import offline_wandb

SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=96)
ALL_KEYS = {
    "flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/grad_cosine", "flatness/fisher_trace",
    "flatness/pacgen", "gap/train_loss", "gap/test_loss", "gap/loss", "gap/train_acc", "gap/test_acc", "gap/acc",
    "flatness/seconds",
}  # fmt: skip


def fit(tmp_path, cb, logger, **kwargs):
    seed_everything(0)
    t = trainer(tmp_path, [cb], logger=logger, **kwargs)
    t.fit(Classifier(), DataModule())
    return t


def read_tensorboard(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tensorboard_and_csv_one_value_per_measured_epoch(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    cv = CSVLogger(str(tmp_path), name="csv")
    cb = FlatnessCallback(measure_at_start=True, every_n_epochs=2, **SMALL)
    fit(tmp_path, cb, [tb, cv], max_epochs=3)
    expected = [0, 2, 3]  # initialization, epoch 2, and the final weights (epoch 3 not on the schedule)
    assert [x for x, _ in cb.history] == expected
    # where Lightning logs its own metrics of the same weights: 8 batches an epoch, an epoch's end at
    # the index of its last batch, the initialization at step 0 and epoch -1
    steps, epochs = [0, 15, 23], [-1, 1, 2]
    scalars = read_tensorboard(tb.log_dir)
    assert ALL_KEYS <= set(scalars)
    for key in ALL_KEYS:
        assert [step for step, _ in scalars[key]] == steps, key
        for (step, value), (x, values) in zip(scalars[key], cb.history):
            assert value == pytest.approx(values[key], rel=1e-6, abs=1e-7), key
    assert [v for _, v in scalars["flatness_callback/epochs_completed"]] == expected
    rows = [r for r in read_csv_rows(os.path.join(cv.log_dir, "metrics.csv")) if r.get("flatness/hessian_top_eig")]
    assert [int(r["step"]) for r in rows] == steps
    assert [int(r["epoch"]) for r in rows] == epochs
    assert [int(r["flatness_callback/epochs_completed"]) for r in rows] == expected
    for row, (_, values) in zip(rows, cb.history):
        for key in ALL_KEYS:
            assert float(row[key]) == pytest.approx(values[key], rel=1e-6, abs=1e-7), key


def test_lightning_metrics_and_the_callbacks_share_epoch_and_step(tmp_path, monkeypatch):
    """Issue 23, item 12: ``val_loss`` (the LightningModule's) sat at x = 0 and ``gap/test_loss`` of the
    same weights at x = 1. Both now carry the same ``epoch`` and ``step`` in CSV and in W&B."""
    pytest.importorskip("wandb")
    wb, experiment, logged = offline_wandb(tmp_path, monkeypatch)
    cv = CSVLogger(str(tmp_path), name="csv")
    cb = FlatnessCallback(metrics=["fisher_trace"], measure_at_start=True, **SMALL)
    try:
        fit(tmp_path, cb, [cv, wb], max_epochs=2)
    finally:
        experiment.finish()
    rows = read_csv_rows(os.path.join(cv.log_dir, "metrics.csv"))
    lightning = [(r["epoch"], r["step"]) for r in rows if r.get("val_loss")]
    ours = [(r["epoch"], r["step"]) for r in rows if r.get("gap/test_loss")]
    assert lightning == [("0", "7"), ("1", "15")]
    assert ours == [("-1", "0"), *lightning]  # the initialization, then the same weights as val_loss
    x = "trainer/global_step"
    lightning = [(r["epoch"], r[x]) for r in logged if "val_loss" in r]
    ours = [(r["epoch"], r[x]) for r in logged if "gap/test_loss" in r]
    assert lightning == [(0, 7), (1, 15)]
    assert ours == [(-1, 0), *lightning]


def test_hyperparameters_are_logged(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    cv = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, FlatnessCallback(metrics=["fisher_trace"], seed=7, **SMALL), [tb, cv], max_epochs=1)
    for logger in (tb, cv):
        with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
            hparams = yaml.safe_load(f)
        assert hparams["flatness_callback/seed"] == 7
        assert hparams["flatness_callback/num_samples"] == 64
        assert hparams["flatness_callback/metrics"] == "fisher_trace"


def test_no_logger(tmp_path):
    cb = FlatnessCallback(metrics=["fisher_trace"], **SMALL)
    fit(tmp_path, cb, False, max_epochs=1)
    assert [x for x, _ in cb.history] == [1]


def test_wandb_offline_rows_carry_lightnings_step_and_epoch(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wb, experiment, logged = offline_wandb(tmp_path, monkeypatch)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    defined, real_define = [], experiment.define_metric
    monkeypatch.setattr(experiment, "define_metric", lambda *a, **k: defined.append((a, k)) or real_define(*a, **k))
    cb = FlatnessCallback(metrics=["hessian_top_eig", "fisher_trace"], measure_at_start=True, **SMALL)
    try:
        fit(tmp_path, cb, [wb, tb], max_epochs=2)
    finally:
        experiment.finish()
    # no axis of our own: the keys follow Lightning's "*" -> trainer/global_step, like its own metrics
    assert not [d for d in defined if d[0][0].startswith(("flatness", "gap"))]
    rows = [r for r in logged if "flatness/hessian_top_eig" in r]
    assert [r["epoch"] for r in rows] == [-1, 0, 1]
    assert [r["trainer/global_step"] for r in rows] == [0, 7, 15]
    assert [r["flatness_callback/epochs_completed"] for r in rows] == [0, 1, 2]
    for row, (_, values) in zip(rows, cb.history):
        assert row["flatness/fisher_trace"] == values["flatness/fisher_trace"]
        assert row["gap/train_loss"] == values["gap/train_loss"]
    # the TensorBoard logger next to it got the same steps
    assert [s for s, _ in read_tensorboard(tb.log_dir)["flatness/fisher_trace"]] == [0, 7, 15]


def test_progress_status_line(tmp_path, caplog, monkeypatch):
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    postfixes = []
    real = Tqdm.set_postfix_str
    monkeypatch.setattr(Tqdm, "set_postfix_str", lambda self, s="", refresh=True: postfixes.append(s) or real(self, s, refresh))
    from lightning.pytorch.callbacks import TQDMProgressBar

    cb = FlatnessCallback(metrics=["hessian_top_eig", "fisher_trace"], **SMALL)
    with caplog.at_level(logging.INFO, logger="lightning_flatness"):
        seed_everything(0)
        t = trainer(tmp_path, [cb, TQDMProgressBar()], max_epochs=1, enable_progress_bar=True)
        t.fit(Classifier(), DataModule())
    assert "flatness: epoch 1: hessian_top_eig (1/2)" in postfixes
    assert any(p.startswith("flatness: epoch 1 measured in") for p in postfixes)
    assert "flatness: epoch 1: fisher_trace (2/2)" in caplog.text


def test_lightning_cli_configures_callback_from_yaml(tmp_path):
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
            "enable_checkpointing": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": [{
                "class_path": "lightning_flatness.FlatnessCallback",
                "init_args": {
                    "metrics": [
                        {"class_path": "lightning_flatness.metrics.HessianEigenvalues", "init_args": {"k": 2}},
                        "fisher_trace",
                        {"class_path": "lightning_flatness.metrics.PACGen", "init_args": {"rho": 0.0, "eps": 0.5}},
                    ],
                    "num_samples": 64, "batch_size": 16, "gap_num_samples": 96, "every_n_epochs": 1,
                    "max_overhead": 0.5, "loss_fn": "cross_entropy", "source": "val", "on_error": "raise",
                    "landscape": {"class_path": "lightning_flatness.LandscapeOptions", "init_args": {"steps": 3}},
                },
            }],
        },
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(Classifier, DataModule, args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True})
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, FlatnessCallback)]
    assert [type(m).__name__ for m in cb.metrics] == ["HessianEigenvalues", "FisherTrace", "PACGen"]
    assert cb.metrics[0].k == 2 and (cb.metrics[2].rho, cb.metrics[2].eps) == (0.0, 0.5)
    assert cb.config["max_overhead"] == 0.5 and cb.config["source"] == "val"
    assert cb._landscape.options.steps == 3 and cb._landscape.options.every_n_epochs == -1
    assert [x for x, _ in cb.history] == [1]
    assert {"flatness/hessian_eig_2", "flatness/pacgen"} <= set(cb.history[0][1])


def test_progress_status_on_rich_progress_bar(tmp_path, monkeypatch):
    pytest.importorskip("rich")
    from lightning.pytorch.callbacks import RichProgressBar

    bar = RichProgressBar()
    descriptions = []

    class Spy(FlatnessCallback):
        def measure(self, trainer, pl_module, x, **kwargs):
            real_update = bar.progress.update
            monkeypatch.setattr(
                bar.progress, "update", lambda task, **kw: descriptions.append(kw.get("description")) or real_update(task, **kw)
            )
            return super().measure(trainer, pl_module, x, **kwargs)

    seed_everything(0)
    t = trainer(tmp_path, [Spy(metrics=["fisher_trace"], **SMALL), bar], max_epochs=1, enable_progress_bar=True)
    t.fit(Classifier(), DataModule())
    assert any(d and d.endswith(" | flatness: epoch 1: fisher_trace (1/1)") for d in descriptions), descriptions
