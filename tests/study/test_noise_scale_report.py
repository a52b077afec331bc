"""The report reads the gradient noise scale against each configuration's batch size, and shows any
other logged key (e.g. a future ``flatness/adaptive_sharpness``) without being told about it."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_flatness.study.report import make_report
from lightning_flatness.study.runs import Run, batch_size_of

torch.set_num_threads(1)

NOISE = "flatness/grad_noise_scale"
RUNS = {"bs16_lr0.1": 16, "bs256_lr0.1": 256}


def logged(bs: int, epoch: int) -> dict[str, float]:
    train = 2.0 * math.exp(-epoch * 16 / bs)
    return {
        "gap/train_loss": train, "gap/test_loss": train + 0.01 * bs ** 0.5, "gap/loss": 0.01 * bs ** 0.5,
        NOISE: 50.0 * (1 + epoch), NOISE + "_se": 5.0, "flatness/adaptive_sharpness": 0.1 * epoch + bs / 1000,
    }  # fmt: skip


@pytest.fixture
def logdir(tmp_path):
    for name, bs in RUNS.items():
        w = SummaryWriter(log_dir=str(tmp_path / "runs" / name))
        for epoch in range(4):
            for key, value in logged(bs, epoch).items():
                w.add_scalar(key, value, epoch)
        w.close()
    return tmp_path / "runs"


def test_noise_scale_table_and_figure_mark_the_batch_sizes(logdir, tmp_path):
    report = make_report(logdir, tmp_path / "out", echo=False)
    assert NOISE in report.keys and "flatness/adaptive_sharpness" in report.keys  # data-driven rows
    assert "| flatness/adaptive_sharpness |" in report.markdown
    table = report.markdown.split("Gradient noise scale")[1]
    # compared point: epoch 3, noise scale 200 ± 5 in both runs; 16/200 = 0.08 below it, 256/200 = 1.28 above
    assert "| bs16_lr0.1 | 16 | 50 | 200 ± 5 | 0.08 | below it: noise-dominated |" in table
    assert "| bs256_lr0.1 | 256 | 50 | 200 ± 5 | 1.28 | above it |" in table
    names = {f.name for f in report.files}
    assert {"flatness_grad_noise_scale_vs_epoch.png", "flatness_adaptive_sharpness_vs_epoch.png"} <= names


def test_batch_size_from_hparams_else_the_run_name(tmp_path):
    def run(name, hp):
        return Run(name, tmp_path, {}, hp)

    assert batch_size_of(run("whatever", {"batch_size": 32})) == 32
    assert batch_size_of(run("bs64_lr0.1_s2", {})) == 64
    assert batch_size_of(run("sweep/bs8_lr0.3", {})) == 8
    assert batch_size_of(run("abs64", {})) is None and batch_size_of(run("resnet", {})) is None


def test_noise_scale_footnote_says_when_the_batch_size_is_unknown(tmp_path):
    """Issue 23, item 13: a run not made by the sweep (no ``batch_size`` hyperparameter, no ``bs<B>``
    in its name) had its missing ratio blamed on an unresolved gradient."""
    w = SummaryWriter(log_dir=str(tmp_path / "runs" / "my_run"))
    for epoch in range(3):
        for key, value in logged(32, epoch).items():
            w.add_scalar(key, value, epoch)
    w.close()
    table = make_report(tmp_path / "runs", tmp_path / "out", echo=False, plots=False).markdown.split("Gradient noise")[1]
    assert "| my_run | unknown | 50 | 150 ± 5 | — | batch size unknown |" in table
    assert "Batch size unknown: the run's hparams.yaml has no `batch_size`" in table
    assert "did not resolve the mean gradient" not in table  # it was resolved at every measurement
