"""The report over seeds on synthetic TensorBoard event files: grouping, means and intervals, the
bootstrap of the rank correlations, the resolved marks, the sample-size guide, and the bands."""

from __future__ import annotations

import argparse
import csv
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau, spearmanr, t
from torch.utils.tensorboard import SummaryWriter

from lightning_flatness.metrics import samples_needed
from lightning_flatness.study.report import make_report
from lightning_flatness.study.seeds import DEFAULT_NUM_SAMPLES, correlation, rank_correlations, split_seed

torch.set_num_threads(1)

BATCHES = (16, 64, 256, 1024)
SEEDS = (0, 1, 2)
NOISY = {16: (5.0, 1.0, 3.0), 64: (2.0, 4.0, 0.5), 256: (1.0, 5.0, 2.5), 1024: (3.0, 0.5, 4.0)}  # no order


def values(bs: int, seed: int, epoch: int) -> dict[str, float]:
    """At the last epoch (3): the eigenvalue tracks the gap (small seed noise), the cosine runs against it,
    the Fisher trace's seeds scatter more than its configurations differ."""
    scale = epoch / 3
    v = {
        "flatness/hessian_top_eig": (1.0 + math.log2(bs) + 0.1 * seed) * scale,
        "flatness/grad_cosine": 1.0 - 0.1 * math.log2(bs) + 0.01 * seed,
        "flatness/fisher_trace": NOISY[bs][seed],
        "flatness/pacgen_curved_fraction": 1.0,  # the same everywhere: no rank correlation
        "gap/train_loss": 2.0 * (1.1 - scale) + 0.01 * seed,
        "gap/test_loss": 2.2 * (1.1 - scale) + 0.1 * math.log2(bs) + 0.02 * seed,
    }
    v["gap/loss"] = v["gap/test_loss"] - v["gap/train_loss"]
    for key, rel in (("flatness/hessian_top_eig", 0.1), ("flatness/fisher_trace", 0.02), ("gap/train_loss", 0.01),
                     ("gap/test_loss", 0.2)):  # fmt: skip
        v[key + "_se"] = rel * abs(v[key])
    return v


def write_run(root, name: str, bs: int, seed: int, hparams: str | None = None) -> None:
    w = SummaryWriter(log_dir=str(root / name))
    for epoch in range(4):
        for key, value in values(bs, seed, epoch).items():
            w.add_scalar(key, value, epoch)
    w.close()
    if hparams is not None:
        (root / name / "hparams.yaml").write_text(hparams)


HPARAMS = """batch_size: 16
flatness_callback/num_samples: 256
flatness_callback/gap_num_samples: 4000
hidden: !!python/tuple
- 8
study/seed: 0
study/train_size: 1000
study/test_size: 50
"""


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    for seed in SEEDS:
        for bs in BATCHES:
            write_run(root, f"bs{bs}_lr0.1_s{seed}", bs, seed, HPARAMS)
    report = make_report(root, root / "report", plots=False, echo=False, resamples=500)
    return root, report


def f32(x: float) -> float:
    return float(np.float32(x))


def test_runs_are_grouped_by_configuration_over_seeds(seeded, tmp_path):
    assert split_seed("bs64_lr0.1_s12") == ("bs64_lr0.1", 12)
    assert split_seed("bs64_lr0.1_esgd_s0") == ("bs64_lr0.1_esgd", 0)
    assert split_seed("bs64_lr0.1") == ("bs64_lr0.1", None) and split_seed("a/version_0") == ("a/version_0", None)
    _, report = seeded
    assert [c.name for c in report.configurations] == [f"bs{b}_lr0.1" for b in BATCHES]
    assert all(c.seeds == list(SEEDS) for c in report.configurations)
    assert len(report.rows) == 12 and report.rows[0].run == "bs16_lr0.1_s0"
    assert "flatness/hessian_top_eig_se" not in report.keys  # standard errors are not rows of their own
    # A run without a seed suffix (an older log) is a configuration of its own, reported as one seed.
    write_run(tmp_path, "bs16_lr0.1_s0", 16, 0)
    write_run(tmp_path, "bs16_lr0.1_s1", 16, 1)
    write_run(tmp_path, "old_run", 64, 0)
    report = make_report(tmp_path, tmp_path / "o", plots=False, echo=False)
    assert [(c.name, len(c.runs)) for c in report.configurations] == [("bs16_lr0.1", 2), ("old_run", 1)]


def test_means_t_intervals_and_within_run_se(seeded):
    root, report = seeded
    md = report.markdown
    path = root / "report" / "configurations.csv"
    table = {r["configuration"] + "|" + r["key"]: r for r in csv.DictReader(path.open())}
    for bs, config in zip(BATCHES, report.configurations):
        for key in ("flatness/hessian_top_eig", "flatness/fisher_trace", "gap/loss"):
            v = np.array([f32(values(bs, s, 3)[key]) for s in SEEDS])
            half = t.ppf(0.975, 2) * v.std(ddof=1) / math.sqrt(3)
            row = table[f"{config.name}|{key}"]
            assert float(row["mean"]) == pytest.approx(v.mean()) and row["seeds"] == "3"
            assert (float(row["low"]), float(row["high"])) == pytest.approx((v.mean() - half, v.mean() + half))
            se = np.array([f32(values(bs, s, 3).get(key + "_se", math.nan)) for s in SEEDS]).mean()
            assert float(row["mean_se"]) == pytest.approx(se, nan_ok=True)
        cell = f"{v.mean():.5g} [{v.mean() - half:.3g}, {v.mean() + half:.3g}]"  # gap/loss: no se logged
        assert f"| {cell} |" in md or f"| {cell}" in md
    assert "| seeds | 3 | 3 | 3 | 3 |" in md and "| epoch | 3 | 3 | 3 | 3 |" in md
    eig = np.array([f32(values(16, s, 3)["flatness/hessian_top_eig_se"]) for s in SEEDS]).mean()
    assert f"(se {eig:.2g})" in md


def test_vectorized_rank_correlations_equal_scipys():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(30, 5)).astype(float)  # ties on purpose
    y = rng.normal(size=(30, 5))
    y[3] = 1.0  # constant: NaN, as scipy
    tau, rho = rank_correlations(x, y)
    for i in range(30):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns about the constant row
            expected = (kendalltau(x[i], y[i]).statistic, spearmanr(x[i], y[i]).statistic)
        assert (tau[i], rho[i]) == pytest.approx(expected, nan_ok=True)


def _loop_bootstrap(configs, key, resamples, seed):
    """The bootstrap written out run by run with scipy: resample seeds per configuration, τ of the means."""
    rng = np.random.default_rng(seed)
    pairs = [np.stack([c.values(key), c.values("gap/loss")], 1) for c in configs]
    idx = [rng.integers(0, len(p), size=(resamples, len(p))) for p in pairs]
    taus = []
    for b in range(resamples):
        means = np.array([p[i[b]].mean(0) for p, i in zip(pairs, idx)])
        taus.append(kendalltau(means[:, 0], means[:, 1]).statistic)
    return np.percentile(taus, 2.5), np.percentile(taus, 97.5)


def test_bootstrap_interval_is_seeded(seeded):
    _, report = seeded
    configs = report.configurations
    a = correlation(configs, "flatness/fisher_trace", resamples=300, seed=7)
    b = correlation(configs, "flatness/fisher_trace", resamples=300, seed=7)
    assert a == b  # the same seed, the same interval
    assert a.tau_interval == pytest.approx(_loop_bootstrap(configs, "flatness/fisher_trace", 300, 7))
    # τ on the means: the means' order against the gap's
    means = [np.mean(c.values("flatness/fisher_trace")) for c in configs]
    gaps = [np.mean(c.values("gap/loss")) for c in configs]
    assert a.tau == pytest.approx(kendalltau(means, gaps).statistic)


def test_resolved_marks_and_the_rule(seeded):
    root, report = seeded
    corr = report.correlations
    assert corr["flatness/hessian_top_eig"].resolved is True and corr["flatness/hessian_top_eig"].tau_interval[0] > 0
    assert corr["flatness/grad_cosine"].resolved is True and corr["flatness/grad_cosine"].tau_interval[1] < 0
    assert corr["flatness/fisher_trace"].resolved is False
    lo, hi = corr["flatness/fisher_trace"].tau_interval
    assert lo <= 0 <= hi
    assert corr["flatness/hessian_top_eig"].per_seed_tau == (1.0, 1.0)
    md = report.markdown
    assert "| flatness/hessian_top_eig | 1 | [1, 1] | 1 … 1 | 1 | [1, 1] | **yes**, positive |" in md
    assert "| flatness/grad_cosine | -1 |" in md and "**yes**, negative |" in md
    assert "| flatness/fisher_trace | -0.33333 | [" in md and md.count("| no |") == 2  # and the (tied) train loss
    assert "| flatness/pacgen_curved_fraction | — | — | — | — | — | — |" in md
    assert "**Resolved**: the 95% bootstrap interval of τ excludes 0" in md and "(500 times, seeded)" in md
    assert "1/24 for 4" in md
    rows = {r["key"]: r for r in csv.DictReader((root / "report" / "correlations.csv").open())}
    assert rows["flatness/fisher_trace"]["resolved"] == "False"
    assert rows["flatness/hessian_top_eig"]["resolved"] == "True"


def test_sample_size_guide(seeded, tmp_path):
    _, report = seeded
    guide = {g.key: g for g in report.guide}
    assert list(guide) == ["flatness/hessian_top_eig", "flatness/fisher_trace", "gap/train_loss", "gap/test_loss"]
    # n from hparams.yaml: the measurement subsample, the gap's capped at each split's size
    assert [guide[k].measured_on for k in guide] == [256, 256, 1000, 50]
    for i, (bs, config) in enumerate(zip(BATCHES, report.configurations)):
        for key, g in guide.items():
            value = np.mean([f32(values(bs, s, 3)[key]) for s in SEEDS])
            se = np.mean([f32(values(bs, s, 3)[key + "_se"]) for s in SEEDS])
            assert g.relative[i] == pytest.approx(se / value)
            assert g.needed[i] == samples_needed(g.measured_on, value, se, 0.05)
    assert guide["flatness/fisher_trace"].needed == [41] * 4  # 2% relative: 256 · (0.02/0.05)² = 40.96
    md = report.markdown
    assert "Sample-size guide" in md and "| flatness/fisher_trace | 256 | 1000 | 2.0% → 41 | 2.0% → 41 |" in md
    test = guide["gap/test_loss"].needed
    assert f"| gap/test_loss | 50 | 50 | 20.0% → {test[0]} |" in md
    assert f"| no: about {max(test)}, more than the 50 the data set holds |" in md
    assert "Where more samples than the data set holds would be needed: average the value over runs" in md
    assert "| gap/train_loss | 1000 | 1000 | 1.0% → 41 |" in md
    # A run of the callback outside the sweep: its own subsample sizes, no split sizes to cap them.
    from pathlib import Path

    from lightning_flatness.study.runs import Run
    from lightning_flatness.study.seeds import measured_on

    own = Run("r", Path("."), {}, {"flatness_callback/num_samples": 128, "flatness_callback/gap_num_samples": 2048})
    assert [measured_on(own, k) for k in guide] == [128, 128, 2048, 2048]
    # Without hparams.yaml: the sweep's defaults.
    write_run(tmp_path, "bs16_lr0.1_s0", 16, 0)
    write_run(tmp_path, "bs64_lr0.1_s0", 64, 0)
    plain = make_report(tmp_path, tmp_path / "o", plots=False, echo=False)
    assert [g.measured_on for g in plain.guide] == [DEFAULT_NUM_SAMPLES, DEFAULT_NUM_SAMPLES, 4000, 1000]
    assert f"{f32(values(16, 0, 3)['flatness/hessian_top_eig']):.5g} ± " in plain.markdown  # one seed: value ± se


def test_single_seed_runs_have_no_interval(tmp_path):
    for bs in BATCHES:
        write_run(tmp_path, f"bs{bs}_lr0.1_s0", bs, 0)
    report = make_report(tmp_path, tmp_path / "o", plots=False, echo=False)
    c = report.correlations["flatness/hessian_top_eig"]
    assert (c.tau, c.tau_interval, c.per_seed_tau, c.resolved) == (1.0, None, None, None)
    assert "| key | bs16_lr0.1 | bs64_lr0.1 | bs256_lr0.1 | bs1024_lr0.1 | Kendall τ | Spearman ρ |" in report.markdown
    assert "run the sweep with `--seeds 3` or more" in report.markdown


def test_band_over_seeds_and_the_plots(tmp_path):
    from lightning_flatness.study.plots import band

    x, mean, low, high = band([[(0, 0.0), (2, 2.0), (4, 4.0)], [(0, 2.0), (3, 5.0)]])
    assert list(x) == [0, 2, 3]  # every x inside the range both curves cover
    assert list(mean) == [1.0, 3.0, 4.0] and list(low) == [0.0, 2.0, 3.0] and list(high) == [2.0, 4.0, 5.0]
    x, *_ = band([[(0.1, 1.0), (1.0, 2.0)], [(0.01, 0.0), (0.1, 0.0), (1.0, 4.0)]], log_x=True)
    assert list(x) == [0.1, 1.0]
    assert band([[(0, 1.0)], [(1, 1.0)]]) is None
    # The report draws a band per configuration (two keys keep this fast).
    root = tmp_path / "runs"
    for seed in (0, 1):
        for bs in (16, 64):
            w = SummaryWriter(log_dir=str(root / f"bs{bs}_lr0.1_s{seed}"))
            for epoch in range(4):
                v = values(bs, seed, epoch)
                w.add_scalar("flatness/hessian_top_eig", v["flatness/hessian_top_eig"], epoch)
                w.add_scalar("gap/train_loss", v["gap/train_loss"], epoch)
            w.close()
    with pytest.warns(UserWarning, match="no rank correlations"):
        make_report(root, tmp_path / "plots", echo=False)
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["flatness_hessian_top_eig_vs_epoch.png", "flatness_hessian_top_eig_vs_train_loss.png",
                    "gap_train_loss_vs_epoch.png", "overview.png"]  # fmt: skip


def test_seeds_option_and_argument_checks():
    from lightning_flatness.study.sweep import SweepConfig, add_arguments, config_from_args

    parser = add_arguments(argparse.ArgumentParser(exit_on_error=False))
    assert config_from_args(parser.parse_args(["--seeds", "3", "--seed", "4"])).seeds == 3
    assert config_from_args(parser.parse_args([])).seeds == 1
    for argv, message in ((["--seeds", "0"], "must be an integer >= 1, got 0"), (["--seed", "-1"], ">= 0"),
                          (["--lr", "nan"], "finite number > 0"), (["--pacgen-noise", "-1"], ">= 0"),
                          (["--seeds", "two"], "invalid literal")):  # fmt: skip
        with pytest.raises(argparse.ArgumentError, match=message):
            parser.parse_args(argv)
    with pytest.raises(ValueError, match="seeds must be an integer >= 1"):
        SweepConfig(seeds=0)
    from lightning_flatness.study.report import add_arguments as report_arguments

    report = report_arguments(argparse.ArgumentParser(exit_on_error=False))
    with pytest.raises(argparse.ArgumentError, match="finite number > 0, got -1"):
        report.parse_args(["logs", "--at-train-loss", "-1"])  # the same rule, from the same module
    assert SweepConfig().num_samples == DEFAULT_NUM_SAMPLES  # the guide's fallback is the sweep's default
