"""FlatnessCallback: values, schedule, side effects, faults and resume (CPU, tiny models)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, seed_everything
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection

from lightning_flatness import (
    FisherTrace,
    FlatnessCallback,
    GradCosineRegret,
    HessianEigenvalues,
    LandscapeOptions,
    LocalEntropy,
    PACGen,
)
from lightning_flatness.functional import (
    fisher_trace,
    grad_cosine_regret,
    hessian_eigenvalues,
    pacgen,
)
from lightning_flatness.metrics import hessian as hessian_metric_module
from lightning_flatness.metrics import measurement_seed
from lightning_flatness.metrics import pacgen as pacgen_metric_module
from tests.helpers.lightning_models import (
    Classifier,
    DataModule,
    Stream,
    full_and_resumed,
    make_data,
    trainer,
)

SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=96)


def fit(tmp_path, cb=None, dm=None, model=None, seed=0, **kwargs):
    seed_everything(seed)
    model = model or Classifier()
    dm = dm or DataModule()
    t = trainer(tmp_path, [cb] if cb is not None else [], **kwargs)
    t.fit(model, dm)
    return t, model, dm


def subsample(dataset, seed, num, batch_size):
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    return [
        (torch.stack([dataset[i][0] for i in idx[s : s + batch_size]]), torch.tensor([int(dataset[i][1]) for i in idx[s : s + batch_size]]))
        for s in range(0, len(idx), batch_size)
    ]


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def test_values_equal_functional_api_on_the_same_subsample(tmp_path):
    metrics = [HessianEigenvalues(tol=1e-7, max_iter=300), "grad_cosine_regret", "fisher_trace", "pacgen"]
    cb = FlatnessCallback(metrics, measure_at_start=True, **SMALL)
    t, model, dm = fit(tmp_path, cb)
    assert [x for x, _ in cb.history] == [0, 1, 2]
    x, last = cb.history[-1]
    batches = subsample(dm.train_set, 0, 64, 16)
    assert torch.equal(cb._indices["measure"], torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64])
    eig = hessian_eigenvalues(model, batches, tol=1e-7, max_iter=300)
    assert close(last["flatness/hessian_top_eig"], eig.values[0].item(), 1e-5)
    reg = grad_cosine_regret(model, batches)
    assert close(last["flatness/grad_cosine_regret"], reg.regret, 1e-6)
    assert close(last["flatness/grad_cosine"], reg.cosine, 1e-6)
    assert close(last["flatness/fisher_trace"], fisher_trace(model, batches).value, 1e-6)
    # n = the training set's 256 samples; the diagonal screened by twice the top eigenvalue
    bound = 2 * last["flatness/hessian_top_eig"]
    pac = pacgen(model, batches, num_train=256, hessian_max=bound, generator=measurement_seed(0, x, "pacgen"))
    assert close(last["flatness/pacgen"], pac.value, 1e-6)
    assert close(last["flatness/pacgen_se"], pac.se, 1e-6) and close(last["flatness/pacgen_curved_fraction"], pac.curved_fraction, 1e-6)
    # the gap: eval-mode loss / accuracy on fixed subsamples of the train and val sets
    model.eval()
    with torch.no_grad():
        for split, ds, off in (("train", dm.train_set, 1), ("test", dm.val_set, 2)):
            (xs, ys), = subsample(ds, off, 96, 96)
            logits = model(xs)
            assert close(last[f"gap/{split}_loss"], F.cross_entropy(logits, ys).item(), 1e-5)
            assert close(last[f"gap/{split}_acc"], (logits.argmax(1) == ys).float().mean().item(), 1e-6)
    assert close(last["gap/loss"], last["gap/test_loss"] - last["gap/train_loss"], 1e-6)
    assert close(last["gap/acc"], last["gap/train_acc"] - last["gap/test_acc"], 1e-6)
    assert last["flatness/seconds"] > 0
    # torchmetrics objects and trainer.callback_metrics hold the same values
    assert isinstance(cb.values, MetricCollection)
    assert close(float(cb.values["flatness/fisher_trace"].compute()), last["flatness/fisher_trace"], 1e-6)
    assert close(float(t.callback_metrics["flatness/hessian_top_eig"]), last["flatness/hessian_top_eig"], 1e-6)


def test_final_weights_bit_identical_with_and_without_callback(tmp_path):
    _, plain, _ = fit(tmp_path / "a", None, max_epochs=3)
    # with the loss-landscape views too (1-D, 2-D and eigenvector slices at every measurement)
    views = LandscapeOptions(every_n_epochs=1, steps=3, two_d=True, steps_2d=2)
    cb = FlatnessCallback(measure_at_start=True, landscape=views, **SMALL)
    _, measured, _ = fit(tmp_path / "b", cb, max_epochs=3)
    assert len(cb.history) == 4 and len(cb._landscape.views) == 4
    a, b = plain.state_dict(), measured.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # weights and BatchNorm statistics
        assert torch.equal(a[key], b[key]), key


def test_warm_start_from_previous_eigenvectors(tmp_path, monkeypatch):
    calls = []
    real = hessian_metric_module.hessian_eigenvalues

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs.get("init"), out.vectors.clone()))
        return out

    monkeypatch.setattr(hessian_metric_module, "hessian_eigenvalues", spy)
    fit(tmp_path, FlatnessCallback(metrics=[HessianEigenvalues(k=2)], **SMALL), max_epochs=3)
    assert calls[0][0] is None
    for (init, _), (_, previous) in zip(calls[1:], calls[:-1]):
        assert init is not None and torch.equal(init, previous)


def test_k_greater_than_one_logs_each_eigenvalue(tmp_path):
    cb = FlatnessCallback(metrics=[HessianEigenvalues(k=2)], **SMALL)
    fit(tmp_path, cb, max_epochs=1)
    values = cb.history[-1][1]
    assert values["flatness/hessian_eig_1"] == values["flatness/hessian_top_eig"] >= values["flatness/hessian_eig_2"]


@pytest.mark.parametrize(
    ("every", "epochs", "expected"),
    [(1, 3, [1, 2, 3]), (2, 3, [2, 3]), (2, 4, [2, 4]), (0, 2, [2])],
)
def test_schedule_and_final_measurement(tmp_path, every, epochs, expected):
    cb = FlatnessCallback(metrics=["fisher_trace"], every_n_epochs=every, **SMALL)
    fit(tmp_path, cb, max_epochs=epochs)
    assert [x for x, _ in cb.history] == expected


def test_final_measurement_after_early_stop(tmp_path):
    class StopAfterSecondEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    cb = FlatnessCallback(metrics=["fisher_trace"], every_n_epochs=5, **SMALL)
    seed_everything(0)
    t = trainer(tmp_path, [cb, StopAfterSecondEpoch()], max_epochs=10)
    t.fit(Classifier(), DataModule())
    assert [x for x, _ in cb.history] == [2]


def test_max_overhead_budget_skips_measurements(tmp_path):
    cb = FlatnessCallback(metrics=["fisher_trace"], max_overhead=1e-9, **SMALL)
    fit(tmp_path, cb, max_epochs=4)
    assert [x for x, _ in cb.history] == [1, 4]  # first epoch, then only the final weights
    cb = FlatnessCallback(metrics=["fisher_trace"], max_overhead=1.0, **SMALL)
    fit(tmp_path, cb, max_epochs=3)
    assert [x for x, _ in cb.history] == [1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(metrics=["hessian_top_eig", "sharpness"]), "metrics"),
        (dict(metrics="nope"), "metrics"),
        (dict(num_samples=-1), "num_samples"),
        (dict(batch_size=0), "batch_size"),
        (dict(gap_num_samples=-5), "gap_num_samples"),
        (dict(num_samples=100, batch_size=64), "num_samples"),
        (dict(source="test"), "source"),
        (dict(loss_fn="hinge"), "loss_fn"),
        (dict(loss_fn=3), "loss_fn"),
        (dict(every_n_epochs=-1), "every_n_epochs"),
        (dict(max_overhead=1.5), "max_overhead"),
        (dict(on_error="ignore"), "on_error"),
        (dict(measure_at_start=1), "measure_at_start"),
        (dict(metrics=["fisher_trace", "fisher_trace"]), "twice"),
        (dict(metrics=[HessianEigenvalues(), "hessian_top_eig"]), "twice"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FlatnessCallback(**kwargs)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: HessianEigenvalues(k=0), "k"),
        (lambda: HessianEigenvalues(tol=0.0), "tol"),
        (lambda: HessianEigenvalues(k=3, max_iter=2), "max_iter"),
        (lambda: HessianEigenvalues(cache_chunks=-1), "cache_chunks"),
        (lambda: FisherTrace(kind="true"), "kind"),
        (lambda: PACGen(eps=0), "eps"),
        (lambda: PACGen(rho=-1.0), "rho"),
        (lambda: PACGen(screen=1), "screen"),
        (lambda: GradCosineRegret(every_n_epochs=0), "every_n_epochs"),
    ],
)
def test_invalid_metric_options_raise_at_construction(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_regret_off_allows_small_num_samples():
    FlatnessCallback(metrics=["fisher_trace"], num_samples=10, batch_size=64)


def nan_loss(model, batch):
    x, y = batch
    losses = F.cross_entropy(model(x), y, reduction="none")
    return losses * float("nan") if not model.training else losses


def test_failing_metric_warns_once_and_training_goes_on(tmp_path):
    cb = FlatnessCallback(loss_fn=nan_loss, **SMALL)
    with pytest.warns(UserWarning, match="failed and is skipped") as record:
        t, _, _ = fit(tmp_path, cb, max_epochs=3)
    messages = [str(w.message) for w in record if "failed and is skipped" in str(w.message)]
    assert len(messages) == 6  # once per metric (5) and the gap, not once per epoch
    assert t.current_epoch == 3
    assert all(set(v) == {"flatness/seconds"} for _, v in cb.history)


def test_on_error_raise_reraises(tmp_path):
    cb = FlatnessCallback(loss_fn=nan_loss, on_error="raise", **SMALL)
    with pytest.raises(Exception, match="non-finite"):
        fit(tmp_path, cb, max_epochs=1)


def test_frozen_parameters_are_not_measured(tmp_path):
    model = Classifier()
    model.net[0].requires_grad_(False)
    cb = FlatnessCallback(metrics=["hessian_top_eig"], **SMALL)
    fit(tmp_path, cb, model=model, max_epochs=1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cb.metrics[0].vectors.shape == (1, trainable) and trainable < sum(p.numel() for p in model.parameters())


def test_no_validation_data_logs_train_side_and_warns(tmp_path):
    cb = FlatnessCallback(metrics=["fisher_trace"], **SMALL)
    with pytest.warns(UserWarning, match="no validation data"):
        fit(tmp_path, cb, dm=DataModule(val=False), max_epochs=2)
    for _, values in cb.history:
        assert "gap/train_loss" in values and "gap/train_acc" in values and "gap/test_loss" not in values


def test_source_val_draws_from_validation_set(tmp_path):
    cb = FlatnessCallback(metrics=["fisher_trace"], source="val", **SMALL)
    _, model, dm = fit(tmp_path, cb, max_epochs=1)
    batches = subsample(dm.val_set, 0, 64, 16)
    assert close(cb.history[-1][1]["flatness/fisher_trace"], fisher_trace(model, batches).value, 1e-6)


def test_iterable_dataset_copies_first_training_batches(tmp_path):
    class StreamModule(DataModule):
        def train_dataloader(self):
            return DataLoader(Stream(256), batch_size=32)

    cb = FlatnessCallback(metrics=["fisher_trace", "grad_cosine_regret"], **SMALL)
    _, model, _ = fit(tmp_path, cb, dm=StreamModule(), max_epochs=2)
    data = make_data(256)
    batches = [(data.tensors[0][s : s + 16], data.tensors[1][s : s + 16]) for s in range(0, 64, 16)]
    assert [x for x, _ in cb.history] == [1, 2]
    assert close(cb.history[-1][1]["flatness/fisher_trace"], fisher_trace(model, batches).value, 1e-6)


def test_bf16_mixed_precision_measures_in_float32(tmp_path):
    cb = FlatnessCallback(metrics=[HessianEigenvalues(tol=1e-7, max_iter=300), "fisher_trace"], **SMALL)
    _, model, dm = fit(tmp_path, cb, max_epochs=1, precision="bf16-mixed")
    batches = subsample(dm.train_set, 0, 64, 16)
    assert close(cb.history[-1][1]["flatness/hessian_top_eig"], hessian_eigenvalues(model, batches, tol=1e-7, max_iter=300).values[0].item(), 1e-5)


def test_resume_from_checkpoint_logs_the_same_values(tmp_path):
    full, resumed = full_and_resumed(tmp_path, lambda: FlatnessCallback(metrics=["hessian_top_eig", "pacgen"], **SMALL))
    assert [x for x, _ in resumed.history] == [2, 3]
    for (xa, a), (xb, b) in zip(full.history[1:], resumed.history):
        assert xa == xb
        for key in ("flatness/hessian_top_eig", "flatness/pacgen"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6), (key, a[key], b[key])
    state = resumed.state_dict()
    assert torch.equal(state["indices"]["measure"], full.state_dict()["indices"]["measure"])


class NoisyData(torch.utils.data.Dataset):
    """Random augmentation in __getitem__: reading samples consumes the global RNGs."""

    def __init__(self, n=256):
        self.data = make_data(n)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.data[i]
        return x + 0.1 * torch.randn_like(x) + 0.01 * random.random() + 0.01 * float(np.random.rand()), y


def test_drawing_the_subsample_consumes_no_training_rng(tmp_path):
    class NoisyModule(DataModule):
        def train_dataloader(self):
            return DataLoader(NoisyData(), batch_size=32, shuffle=True)

    _, plain, _ = fit(tmp_path / "a", None, dm=NoisyModule(), max_epochs=2)
    cb = FlatnessCallback(measure_at_start=True, **SMALL)
    _, measured, _ = fit(tmp_path / "b", cb, dm=NoisyModule(), max_epochs=2)
    assert len(cb.history) == 3
    for key, value in plain.state_dict().items():
        assert torch.equal(value, measured.state_dict()[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_mixed_bit_identical_and_float32_values(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for deterministic=True
    gpu = dict(max_epochs=2, accelerator="gpu", devices=1, precision="bf16-mixed")
    _, plain, _ = fit(tmp_path / "a", None, **gpu)
    metrics = [HessianEigenvalues(tol=1e-7, max_iter=300), "grad_cosine_regret", "fisher_trace", "pacgen"]
    cb = FlatnessCallback(metrics, measure_at_start=True, **SMALL)
    _, measured, dm = fit(tmp_path / "b", cb, **gpu)
    assert [x for x, _ in cb.history] == [0, 1, 2]
    assert cb._data["measure"][0][0].device.type == "cuda"  # the subsample is kept on the device
    for key, value in plain.state_dict().items():  # dropout draws from the CUDA RNG: restored too
        assert torch.equal(value, measured.state_dict()[key]), key
    batches = subsample(dm.train_set, 0, 64, 16)
    want = hessian_eigenvalues(measured.cpu().float(), batches, tol=1e-7, max_iter=300).values[0].item()
    assert close(cb.history[-1][1]["flatness/hessian_top_eig"], want, 1e-4)
    assert close(cb.history[-1][1]["flatness/fisher_trace"], fisher_trace(measured, batches).value, 1e-4)


def test_local_entropy_is_opt_in_and_equals_the_functional_api(tmp_path):
    from lightning_flatness.functional import local_entropy

    assert "local_entropy" not in [m.name for m in FlatnessCallback().metrics]
    cb = FlatnessCallback(metrics=[LocalEntropy(gamma=50.0, noise=0.05, num_steps=8, step_size=0.002)], **SMALL)
    _, model, dm = fit(tmp_path, cb, max_epochs=1)
    x, last = cb.history[-1]
    batches = subsample(dm.train_set, 0, 64, 16)
    whole = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    ent = local_entropy(
        model, whole, gamma=50.0, noise=0.05, num_steps=8, step_size=0.002,
        generator=measurement_seed(0, x, "local_entropy"),
    )  # fmt: skip
    assert close(last["flatness/local_entropy"], ent.value, 1e-6)


@pytest.mark.parametrize("name", ["gamma", "noise", "step_size"])
def test_local_entropy_options_are_validated(name):
    with pytest.raises(ValueError, match=name):
        LocalEntropy(**{name: 0.0})
    with pytest.raises(ValueError, match="num_steps"):
        LocalEntropy(num_steps=2)


@pytest.mark.parametrize("screen", [True, False])
def test_pacgen_gets_twice_the_top_eigenvalue_as_its_diagonal_bound(tmp_path, monkeypatch, screen):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["hessian_max"])
        return pacgen(*args, **kwargs)

    monkeypatch.setattr(pacgen_metric_module, "pacgen", spy)
    # pacgen listed first still runs after the eigenvalue that bounds its diagonal
    cb = FlatnessCallback(metrics=(PACGen(screen=screen, eps=3.0, num_probes=16), "hessian_top_eig"), **SMALL)
    _, model, dm = fit(tmp_path, cb, max_epochs=1)
    x, last = cb.history[-1]
    assert len(seen) == 1
    if not screen:
        assert seen[0] is None
        return
    assert seen[0] == 2 * last["flatness/hessian_top_eig"] > 0
    # eps = 3 puts the floor 1/N_i² below the bound, so the diagonal is estimated after ρ
    batches = subsample(dm.train_set, 0, 64, 16)
    seed = measurement_seed(0, x, "pacgen")
    expected = pacgen(model, batches, num_train=256, eps=3.0, num_probes=16, hessian_max=seen[0], generator=seed)
    assert expected.n_hvp == 16 + 6
    assert close(last["flatness/pacgen"], expected.value, 1e-6)


def test_kept_graphs_leave_the_eigenvalue_unchanged(tmp_path):
    values = []
    for cache_chunks in (0, 4):  # SMALL: 64 samples in 4 mini-batches of 16
        cb = FlatnessCallback(metrics=(HessianEigenvalues(cache_chunks=cache_chunks),), **SMALL)
        fit(tmp_path, cb, max_epochs=1)
        values.append(cb.history[-1][1]["flatness/hessian_top_eig"])
    assert values[0] == values[1]


def test_eigenvalue_on_one_mini_batch_logs_its_value_without_an_error_bar(tmp_path):
    # One mini-batch leaves no spread to measure: the value is logged, its se is not (never NaN).
    cb = FlatnessCallback(metrics=["hessian_top_eig"], num_samples=16, batch_size=16, gap_num_samples=0)
    fit(tmp_path, cb, max_epochs=1)
    row = cb.history[-1][1]
    assert math.isfinite(row["flatness/hessian_top_eig"]) and row["flatness/hessian_top_eig"] > 0
    assert "flatness/hessian_top_eig_se" not in row


def test_every_builtin_metric_at_once_leaves_training_bit_identical(tmp_path):
    # The opt-in measures too (cheap settings), with their figures and files: nothing fails, every
    # key is logged at the final weights, and the weights and BatchNorm statistics are untouched.
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_flatness import (
        AdaptiveSharpness, AdversarialRobustness, BlockCurvature, HessianDensity, HessianMinEigenvalue, LocalEntropy,
    )  # fmt: skip
    from lightning_flatness.metrics import BUILTIN, DEFAULT_METRICS

    _, plain, _ = fit(tmp_path / "a", None, max_epochs=2)
    opt_in = [
        LocalEntropy(num_steps=4), BlockCurvature(blocks="by_module", trace_probes=4, max_iter=5),
        HessianDensity(num_probes=2, lanczos_steps=4), AdaptiveSharpness(num_draws=4), "fisher_rao_norm",
        AdversarialRobustness(steps=2), "flatness_ratio", HessianMinEigenvalue(max_iter=10),
    ]  # fmt: skip
    cb = FlatnessCallback(metrics=[*DEFAULT_METRICS, *opt_in], on_error="raise", **SMALL)
    assert {m.name for m in cb.metrics} == set(BUILTIN)
    t, measured, _ = fit(tmp_path / "b", cb, max_epochs=2, logger=TensorBoardLogger(str(tmp_path), name="tb"))
    final = cb.history[-1][1]
    missing = [key for m in cb.metrics for key in m.keys if key not in final]
    assert not missing, missing
    a, b = plain.state_dict(), measured.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_seconds_include_the_metrics_measured_only_at_the_final_weights(tmp_path):
    """Issue 23, item 11: a metric on its own schedule measured in ``on_train_end`` was not counted
    (``HessianDensity(every_n_epochs=20)``: 0.55 s logged, 21 s spent)."""
    from lightning.pytorch.loggers import CSVLogger

    from tests.helpers.custom_metrics import SlowMetric

    cb = FlatnessCallback(metrics=["fisher_trace", SlowMetric(0.4, every_n_epochs=2)], **SMALL)
    logger = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, cb, max_epochs=1, logger=logger)  # epoch 1: not due; the final weights: due
    (x, row), = cb.history
    assert x == 1 and "flatness/slow" in row
    assert row["flatness/seconds"] >= 0.4
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as f:
        logged = [float(r["flatness/seconds"]) for r in csv.DictReader(f) if r.get("flatness/seconds")]
    assert logged[-1] == pytest.approx(row["flatness/seconds"], rel=1e-6)  # the row's last write: the total
