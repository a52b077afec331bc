"""``lightning-flatness report`` on synthetic TensorBoard event files (independent of the callback)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau, spearmanr
from torch.utils.tensorboard import SummaryWriter

from lightning_flatness.study import cli
from lightning_flatness.study.report import ReportError, load_runs, main, make_report

torch.set_num_threads(1)

KEYS = (
    "flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/grad_cosine", "flatness/fisher_trace",
    "flatness/pacgen", "gap/train_loss", "gap/test_loss", "gap/loss", "gap/train_acc", "gap/test_acc", "gap/acc",
    "flatness/seconds",
)  # fmt: skip
RUNS = {"bs16_lr0.1": 16, "bs64_lr0.1": 64, "bs256_lr0.1": 256}


def synthetic(bs: int, epoch: int) -> dict[str, float]:
    """Logged values: training loss falls faster for small batches; sharpness and gap grow with the batch size."""
    train = 2.3 * math.exp(-epoch * 16 / bs)
    test = train + 0.1 * math.log2(bs) * (1 - math.exp(-epoch / 3)) + 0.01
    v = {
        "flatness/hessian_top_eig": 1.0 + 0.5 * math.log2(bs) + 0.1 * epoch,
        "flatness/grad_cosine_regret": 0.3 + 0.001 * epoch + 0.01 * (bs == 64),
        "flatness/grad_cosine": 0.5 - 0.2 * math.log2(bs) / 8,   # decreases with bs: tau = -1
        "flatness/fisher_trace": 10.0 + (epoch % 3),              # equal across runs at equal epochs
        "flatness/pacgen": 1000.0 * math.log2(bs) + epoch,
        "gap/train_loss": train,
        "gap/test_loss": test,
        "gap/train_acc": 1.0 - train / 3,
        "gap/test_acc": 0.6 - 0.01 * math.log2(bs),
        "flatness/seconds": 0.5,
    }
    v["gap/loss"] = v["gap/test_loss"] - v["gap/train_loss"]
    v["gap/acc"] = v["gap/train_acc"] - v["gap/test_acc"]
    return v


EPOCHS = {16: [0, 1, 2, 3, 4], 64: [0, 2, 4, 6, 8], 256: [0, 4, 8, 12, 16, 20]}


@pytest.fixture
def logdir(tmp_path):
    root = tmp_path / "runs"
    for name, bs in RUNS.items():
        w = SummaryWriter(log_dir=str(root / name))
        for epoch in EPOCHS[bs]:
            for key, value in synthetic(bs, epoch).items():
                w.add_scalar(key, value, epoch)
            w.add_scalar("train/loss", 9.0, 1000 + epoch)  # not a callback key: ignored
        w.close()
    return root


def f32(x: float) -> float:
    return float(np.float32(x))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_end_of_training_table_equals_logged_values(logdir, tmp_path):
    report = make_report(logdir, tmp_path / "out", plots=False, echo=False)
    assert [r.run for r in report.rows] == ["bs16_lr0.1", "bs64_lr0.1", "bs256_lr0.1"]  # natural order
    assert report.keys == list(KEYS)
    rows = read_csv(tmp_path / "out" / "summary.csv")
    for row, csv_row in zip(report.rows, rows):
        bs = RUNS[row.run]
        last = EPOCHS[bs][-1]
        expected = synthetic(bs, last)
        assert row.epoch == last and csv_row["epoch"] == str(last) and csv_row["run"] == row.run
        for key in KEYS:
            assert row.values[key] == f32(expected[key]), key  # TensorBoard stores float32
            assert float(csv_row[key]) == f32(expected[key]), key
    md = (tmp_path / "out" / "summary.md").read_text()
    assert f"{f32(synthetic(256, 20)['flatness/pacgen']):.5g}" in md
    assert "| epoch | 4 | 8 | 20 |" in md


def test_rank_correlations_with_the_loss_gap(logdir, tmp_path):
    report = make_report(logdir, tmp_path / "out", plots=False, echo=False)
    gap = [r.values["gap/loss"] for r in report.rows]
    assert gap == sorted(gap)  # the synthetic gap grows with the batch size
    c = report.correlations["flatness/hessian_top_eig"]
    assert (c.tau, c.rho, c.configurations) == pytest.approx((1.0, 1.0, 3))
    assert c.tau_interval is None and c.resolved is None  # one seed: no interval
    c = report.correlations["flatness/grad_cosine"]
    assert (c.tau, c.rho) == pytest.approx((-1.0, -1.0))
    for key in ("flatness/grad_cosine_regret", "flatness/fisher_trace", "gap/test_acc"):
        xs = [r.values[key] for r in report.rows]
        expected = (kendalltau(xs, gap).statistic, spearmanr(xs, gap).statistic)
        c = report.correlations[key]
        assert (c.tau, c.rho) == pytest.approx(expected, nan_ok=True)
    assert "gap/loss" not in report.correlations and "flatness/seconds" not in report.correlations
    corr = {r["key"]: r for r in read_csv(tmp_path / "out" / "correlations.csv")}
    assert float(corr["flatness/pacgen"]["kendall_tau"]) == pytest.approx(1.0)
    assert corr["flatness/pacgen"]["configurations"] == "3" and corr["flatness/pacgen"]["tau_low"] == ""
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| flatness/hessian_top_eig |" in md and md.count("Kendall τ") == 1


def test_at_train_loss_picks_the_first_measurement_below(logdir, tmp_path):
    x = 0.7
    report = make_report(logdir, tmp_path / "out", at_train_loss=x, plots=False, echo=False)
    for row in report.rows:
        bs = RUNS[row.run]
        reached = [e for e in EPOCHS[bs] if f32(synthetic(bs, e)["gap/train_loss"]) <= x]
        assert row.epoch == reached[0]
        assert row.values["gap/train_loss"] <= x
        for key in KEYS:
            assert row.values[key] == f32(synthetic(bs, reached[0])[key])
    # A stricter target that bs256 never reaches: its row is excluded and explained.
    report = make_report(logdir, tmp_path / "out2", at_train_loss=0.5, plots=False, echo=False)
    assert [r.epoch for r in report.rows[:2]] == [2, 8]
    row = report.rows[-1]
    assert row.run == "bs256_lr0.1" and row.epoch is None and math.isnan(row.values["gap/loss"])
    assert report.correlations["flatness/pacgen"].configurations == 2
    assert "never reached train loss <= 0.5 (lowest 0.6" in report.markdown
    assert read_csv(tmp_path / "out2" / "summary.csv")[-1]["epoch"] == ""


def test_pngs_per_metric_vs_epoch_and_vs_train_loss(tmp_path):
    # A few keys keep this fast (~0.3 s a figure); the per-key logic is the same for every key.
    keys = ("flatness/hessian_top_eig", "gap/train_loss", "gap/loss", "flatness/seconds")
    root = tmp_path / "runs"
    for name, bs in list(RUNS.items())[:2]:
        w = SummaryWriter(log_dir=str(root / name))
        for epoch in EPOCHS[bs]:
            for key in keys:
                w.add_scalar(key, synthetic(bs, epoch)[key], epoch)
        w.close()
    out = tmp_path / "plots"
    report = make_report(root, out, echo=False)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "flatness_hessian_top_eig_vs_epoch.png", "flatness_hessian_top_eig_vs_train_loss.png",
        "gap_loss_vs_epoch.png", "gap_loss_vs_train_loss.png", "gap_train_loss_vs_epoch.png", "overview.png",
    ]  # fmt: skip  (no plot of the measurement time, nor of the training loss against itself)
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    expected = {out / "summary.md", out / "summary.csv", out / "correlations.csv", out / "overview.png"}
    assert set(report.files) >= expected


def test_cli_prints_the_table(logdir, tmp_path, capsys):
    assert cli.main(["report", str(logdir), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| key | bs16_lr0.1 | bs64_lr0.1 | bs256_lr0.1 | Kendall τ | Spearman ρ |" in printed
    assert f"{f32(synthetic(64, 8)['gap/test_loss']):.5g}" in printed
    assert (tmp_path / "o" / "summary.csv").exists() and not list((tmp_path / "o").glob("*.png"))


def test_default_out_dir_and_version_dirs(tmp_path):
    root = tmp_path / "logs"
    for name in ("a/version_0", "b/version_0", "b/version_1"):
        w = SummaryWriter(log_dir=str(root / name))
        w.add_scalar("gap/loss", 1.0, 0)
        w.close()
    runs = load_runs(root)
    assert [r.name for r in runs] == ["a", "b/version_0", "b/version_1"]
    make_report(root, plots=False, echo=False)
    assert (root / "report" / "summary.md").exists()


def test_extra_eigenvalue_keys_follow_the_top_one_and_se_keys_are_not_rows(tmp_path):
    w = SummaryWriter(log_dir=str(tmp_path / "r" / "run"))
    for key in ("gap/loss", "flatness/hessian_eig_2", "flatness/hessian_eig_1", "flatness/hessian_top_eig", "zz/x",
                "flatness/pacgen_curved_fraction", "flatness/pacgen", "flatness/pacgen_se", "flatness/seconds"):  # fmt: skip
        w.add_scalar(key, 1.0, 3)
    w.close()
    report = make_report(tmp_path / "r", tmp_path / "o", plots=False, echo=False)
    assert report.keys == ["flatness/hessian_top_eig", "flatness/hessian_eig_1", "flatness/hessian_eig_2",
                           "flatness/pacgen", "flatness/pacgen_curved_fraction", "gap/loss", "flatness/seconds"]  # fmt: skip


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no TensorBoard event files"):
        make_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="is not a directory"):
        make_report(tmp_path / "missing")
    with pytest.raises(SystemExit, match="lightning-flatness report: error: no TensorBoard event files"):
        main([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="error: no TensorBoard"):
        cli.main(["report", str(tmp_path / "empty")])


def test_runs_without_the_metrics_are_a_clear_error(tmp_path):
    w = SummaryWriter(log_dir=str(tmp_path / "plain" / "run0"))
    w.add_scalar("train/loss", 1.0, 0)
    w.close()
    with pytest.raises(ReportError, match="logged flatness/\\*, gap/\\* or robust/\\* scalars; train them with"):
        make_report(tmp_path / "plain")
    # Mixed: the run without metrics is skipped with a warning.
    w = SummaryWriter(log_dir=str(tmp_path / "plain" / "run1"))
    w.add_scalar("flatness/pacgen", 2.0, 1)
    w.close()
    with pytest.warns(UserWarning, match="skipped run"):
        report = make_report(tmp_path / "plain", tmp_path / "o", plots=False, echo=False)
    assert [r.run for r in report.rows] == ["run1"]
    with pytest.raises(ReportError, match="--at-train-loss needs gap/train_loss"):
        make_report(tmp_path / "plain", tmp_path / "o", at_train_loss=0.1, plots=False, echo=False)


def test_landscape_overlays_from_the_runs_json_files(tmp_path):
    from lightning_flatness.landscape import LandscapeViews, write_json
    from lightning_flatness.metrics import LogPosition

    root = tmp_path / "runs"
    a = [-1.0, 0.0, 1.0]
    for name, bs in list(RUNS.items())[:2]:
        w = SummaryWriter(log_dir=str(root / name))
        w.add_scalar("flatness/hessian_top_eig", float(bs), 3)
        w.close()
        for epoch in (1, 3):  # the latest is drawn
            s = bs / 16 * epoch
            write_json(root / name, LandscapeViews(
                epoch=epoch, coordinates=a, loss_1d=[s, 0.1, s], eig_coordinates=a, eig_train_loss=[s, 0.1, s],
                eig_val_loss=[s + 1, 0.5, s + 1], eigenvalue=float(bs), loss_2d=[[s] * 3] * 3, coordinates_2d=a,
            ), LogPosition(epoch, step=8 * epoch - 1))  # fmt: skip
    (root / "bs16_lr0.1" / "landscape" / "epoch_000004.json").write_text("{not json")  # skipped: epoch 3 is used
    third = root / "bs256_lr0.1"  # a run without landscape files is left out
    w = SummaryWriter(log_dir=str(third))
    w.add_scalar("flatness/hessian_top_eig", 256.0, 3)
    w.close()
    from lightning_flatness.landscape import read_final

    assert read_final(root / "bs16_lr0.1").epoch == 3 and read_final(third) is None
    out = tmp_path / "out"
    report = make_report(root, out, echo=False)
    for png in ("landscape_1d.png", "landscape_eigenvector.png"):
        assert out / png in report.files
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_logged_at_lightnings_step_are_read_by_epochs_completed():
    """Issue 23, item 12: rows go to Lightning's step (``val_loss``'s for the same weights) with
    ``flatness_callback/epochs_completed``; the report reads epochs from it, also where two rows
    share a step (the initialization and the end of a one-batch first epoch, both at step 0) and
    where the final row re-logs ``flatness/seconds`` with its total."""
    from types import SimpleNamespace as Event

    from lightning_flatness.study.runs import by_epochs_completed

    x = "flatness_callback/epochs_completed"
    events = {  # (step, value, wall_time): init and epoch 1 at step 0; epoch 2 at step 1, then the final metrics
        x: [Event(step=0, value=0, wall_time=10.0), Event(step=0, value=1, wall_time=20.0),
            Event(step=1, value=2, wall_time=30.0), Event(step=1, value=2, wall_time=40.0)],
        "gap/test_loss": [Event(step=0, value=2.3, wall_time=10.0), Event(step=0, value=1.1, wall_time=20.001),
                          Event(step=1, value=0.7, wall_time=30.0)],
        "flatness/seconds": [Event(step=1, value=0.5, wall_time=30.0), Event(step=1, value=2.5, wall_time=40.0)],
    }  # fmt: skip
    assert by_epochs_completed(events) == {"gap/test_loss": {0: 2.3, 1: 1.1, 2: 0.7}, "flatness/seconds": {2: 2.5}}
    # logs written before: no epochs_completed, the step was the epochs completed
    old = {"gap/test_loss": [Event(step=0, value=2.3, wall_time=1.0), Event(step=3, value=0.7, wall_time=2.0)]}
    assert by_epochs_completed(old) == {"gap/test_loss": {0: 2.3, 3: 0.7}}


def test_sample_size_guide_uses_the_size_drawn_not_the_size_asked(tmp_path):
    """Issue 23, item 9: with ``gap_num_samples=2048`` and a 1000-sample validation set the guide said
    ``gap/test_loss`` was "measured on 2048" (asking for about 3492 samples); it was measured on 1000."""
    from lightning.pytorch import seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_flatness import FlatnessCallback
    from lightning_flatness.metrics import samples_needed
    from tests.helpers.lightning_models import Classifier, DataModule, trainer

    seed_everything(0)
    cb = FlatnessCallback(metrics=["fisher_trace"], num_samples=64, batch_size=16, gap_num_samples=2048)
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="mine")  # not a sweep run: no study/*_size
    trainer(tmp_path, [cb], logger=logger, max_epochs=1).fit(Classifier(), DataModule(n_train=256, n_val=1000))
    report = make_report(tmp_path / "runs", tmp_path / "out", plots=False, echo=False)
    guide = {g.key: g for g in report.guide}
    assert guide["gap/test_loss"].measured_on == 1000
    assert [(guide[k].measured_on, guide[k].available) for k in ("flatness/fisher_trace", "gap/train_loss", "gap/test_loss")] == [
        (64, 256), (256, 256), (1000, 1000)]  # fmt: skip
    assert cb.sample_sizes() == {"measure": 64, "gap_train": 256, "gap_val": 1000}
    row = cb.history[-1][1]
    want = samples_needed(1000, row["gap/test_loss"], row["gap/test_loss_se"], 0.05)
    assert guide["gap/test_loss"].needed == [pytest.approx(want, abs=1)]  # from the float32-logged value and se
    assert "| gap/test_loss | 1000 | 1000 |" in report.markdown
