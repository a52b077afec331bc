"""Batches the callback must measure without stopping training (issue 23, item 7).

Sequence-first batches ``x: (T, B), y: (B,)`` (``sample_dims``), several training loaders (a
combined batch), and failures inside the hooks: apart from a configuration refused before the
first training step with a message that names the argument, nothing the callback does may stop
training.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, seed_everything
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_flatness import ConfigurationError, FlatnessCallback, PACGen
from lightning_flatness import _subsample
from lightning_flatness._logging import LoggerWriter
from lightning_flatness.functional import fisher_trace
from tests.helpers.lightning_models import Classifier, DataModule, Stream, trainer

DEFAULT_KEYS = ("flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/fisher_trace", "flatness/pacgen",
                "flatness/grad_noise_scale", "gap/train_loss", "gap/test_loss", "gap/train_acc")  # fmt: skip
MEASURED = tuple(key for key in DEFAULT_KEYS if key != "flatness/grad_noise_scale")  # that one logs nothing where
# its subsample does not resolve |G|² (warned); 32 samples resolve it at the measurement of the recurrent runs below
SMALL = dict(num_samples=32, batch_size=8, gap_num_samples=32)


# --------------------------------------------------------------------------- sequence-first batches
def tokens(n: int = 64, steps: int = 5, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 7, (n, steps), generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, -1]) % 3)


def sequence_first(items):
    """Collates samples ``(T,)`` into ``x: (T, B)``, as ``nn.LSTM(batch_first=False)`` takes them."""
    return torch.stack([x for x, _ in items], dim=1), torch.stack([y for _, y in items])


class Tokens(IterableDataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return iter(zip(*self.data.tensors))


class Recurrent(LightningModule):
    """Embedding -> LSTM -> Linear over token sequences; ``forward`` takes ``x: (T, B)``."""

    def __init__(self, sequence_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn, self.out = nn.Embedding(7, 4), nn.LSTM(4, 5), nn.Linear(5, 3)
        self.sequence_first = sequence_first
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x))
        return self.out(h[-1])

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self(x if self.sequence_first else x.T), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loss_sequence_first(model, batch):
    x, y = batch  # x: (T, B)
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y


def loss_batch_first(model, batch):
    x, y = batch  # x: (B, T)
    return loss_sequence_first(model, (x.T, y))


def fit_recurrent(tmp_path, first: bool, stream: bool, **options):
    seed_everything(0)
    collate = sequence_first if first else None
    train = Tokens(tokens()) if stream else tokens()
    val = tokens(48, seed=1)
    loaders = DataLoader(train, batch_size=8, collate_fn=collate), DataLoader(val, batch_size=16, collate_fn=collate)
    model = Recurrent(first)
    cb = FlatnessCallback(**SMALL, **options)
    trainer(tmp_path, [cb], max_epochs=1).fit(model, *loaders)
    return cb, model


@pytest.mark.parametrize("stream", [False, True], ids=["map_style", "iterable"])
def test_sequence_first_batches_with_sample_dims_give_the_values_of_batch_first_ones(tmp_path, stream):
    """The same model and data, collated ``(T, B)`` with ``sample_dims=(1, 0)`` or ``(B, T)``: the same values."""
    n = {"metrics": ["hessian_top_eig", "grad_cosine_regret", "fisher_trace", PACGen(num_train=64), "grad_noise_scale"]}
    first, _ = fit_recurrent(tmp_path, True, stream, loss_fn=loss_sequence_first, sample_dims=(1, 0), **n)
    flat, _ = fit_recurrent(tmp_path, False, stream, loss_fn=loss_batch_first, **n)
    got, expected = first.history[-1][1], flat.history[-1][1]
    assert set(got) == set(expected) and set(DEFAULT_KEYS) <= set(got)
    for key in got:
        assert math.isfinite(got[key]), key
        if key != "flatness/seconds":
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert first.hparams()["sample_dims"] == (1, 0)


def test_a_sequence_first_model_with_a_builtin_loss_and_sample_dims(tmp_path):
    cb, _ = fit_recurrent(tmp_path, True, False, sample_dims=(1, 0), metrics=["hessian_top_eig", "fisher_trace"])
    values = cb.history[-1][1]
    assert values["flatness/fisher_trace"] > 0 and values["flatness/hessian_top_eig"] > 0
    assert 0 <= values["gap/train_acc"] <= 1  # the built-in cross-entropy's own accuracy, through the layout


def test_sequence_first_batches_without_sample_dims_are_refused_at_start_naming_it(tmp_path):
    with pytest.raises(ConfigurationError, match=r"cannot count the samples of a batch: its tensors hold \[5, 8\] "
                                                 r"entries along dim 0.*sample_dims.*\(1, 0\)") as info:  # fmt: skip
        fit_recurrent(tmp_path, True, False, loss_fn=loss_sequence_first)
    assert "docs/faq.md" in str(info.value)


@pytest.mark.parametrize(
    "sample_dims, match",
    [((1, 0, 0), r"does not match the batches' structure"), (3, r"a tensor of shape \(5, 8\) has no dim 3")],
    ids=["structure", "dim"],
)
def test_sample_dims_that_do_not_fit_the_batches_are_refused_at_start(tmp_path, sample_dims, match):
    module = Recurrent(True)
    loaders = DataLoader(tokens(), batch_size=8, collate_fn=sequence_first)
    cb = FlatnessCallback(loss_fn=loss_sequence_first, sample_dims=sample_dims, **SMALL)
    with pytest.raises(ConfigurationError, match=match):
        trainer(tmp_path, [cb], max_epochs=1).fit(module, loaders)
    assert module.steps == 0


@pytest.mark.parametrize("value", [-1, 1.0, True, (), (0, "1"), {"x": None}, None])
def test_invalid_sample_dims_are_refused_at_construction(value):
    with pytest.raises(ValueError, match=r"sample_dims must be an integer >= 0 .*as torch.func.vmap's in_dims"):
        FlatnessCallback(sample_dims=value)


def test_sample_dims_accepts_a_list_for_tuple_batches_and_dicts():
    layout = _subsample.SampleLayout([1, {"mask": 1, "lengths": 0}])
    batch = (torch.zeros(5, 3), {"mask": torch.zeros(5, 3, 2), "lengths": torch.zeros(3)})
    first = layout.first(batch)
    assert first[0].shape == (3, 5) and first[1]["mask"].shape == (3, 5, 2) and first[1]["lengths"].shape == (3,)
    assert layout.count(first) == 3
    back = layout.native(first)
    assert back[0].shape == (5, 3) and back[1]["mask"].shape == (5, 3, 2)


# -------------------------------------------------------------------------------- several loaders
class TwoLoaders(Classifier):
    def training_step(self, batch, batch_idx):
        return sum(F.cross_entropy(self(x), y) for x, y in batch)


def test_two_training_loaders_measure_the_first_ones_share_of_the_combined_batch(tmp_path):
    """``[DataLoader(IterableDataset, batch_size=16), DataLoader(map-style, batch_size=8)]``: the subsample
    is copied from the first loader's share of each combined batch."""
    dm = DataModule()
    metrics = ["hessian_top_eig", "grad_cosine_regret", "fisher_trace", PACGen(num_train=256), "grad_noise_scale"]
    cb = FlatnessCallback(metrics=metrics, num_samples=64, batch_size=16, gap_num_samples=64)
    model = TwoLoaders()
    loaders = [DataLoader(Stream(), batch_size=16), DataLoader(dm.train_set, batch_size=8)]
    seed_everything(0)
    trainer(tmp_path, [cb], max_epochs=1).fit(model, loaders, dm.val_dataloader())
    values = cb.history[-1][1]
    assert set(MEASURED) <= set(values) and all(math.isfinite(v) for v in values.values())
    stream = Stream().data.tensors
    first = [(stream[0][s : s + 16], stream[1][s : s + 16]) for s in range(0, 64, 16)]  # its first 64 samples
    assert values["flatness/fisher_trace"] == pytest.approx(fisher_trace(model, first).value, rel=1e-6)


def test_a_dict_of_training_loaders_measures_the_first(tmp_path):
    class Named(Classifier):
        def training_step(self, batch, batch_idx):
            return sum(F.cross_entropy(self(x), y) for x, y in batch.values())

    dm = DataModule()
    cb = FlatnessCallback(metrics=["fisher_trace", PACGen(num_train=256)], num_samples=32, batch_size=16)
    loaders = {"stream": DataLoader(Stream(), batch_size=16), "map": DataLoader(dm.train_set, batch_size=8)}
    trainer(tmp_path, [cb], max_epochs=1).fit(Named(), loaders, dm.val_dataloader())
    assert math.isfinite(cb.history[-1][1]["flatness/pacgen"])


# ------------------------------------------------------------------------- failures in the hooks
def test_a_failing_draw_of_the_subsample_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the dataset cannot be read")

    monkeypatch.setattr(_subsample, "collate_indices", broken)
    model = Classifier()
    cb = FlatnessCallback(metrics=["fisher_trace"], num_samples=32, batch_size=16)
    t = trainer(tmp_path, [cb], max_epochs=2)
    with pytest.warns(UserWarning) as record:
        t.fit(model, DataModule())
    assert t.current_epoch == 2 and cb.history == []
    failures = [str(w.message) for w in record if "FlatnessCallback" in str(w.message)]
    assert len(failures) == 1 and "drawing the measurement subsample failed" in failures[0]
    assert "the dataset cannot be read" in failures[0]


def test_a_failure_while_logging_a_measurement_follows_on_error(tmp_path, monkeypatch):
    def broken(self, trainer, values, x):
        raise RuntimeError("the logger is gone")

    monkeypatch.setattr(LoggerWriter, "write", broken)
    cb = FlatnessCallback(metrics=["fisher_trace"], num_samples=32, batch_size=16)
    t = trainer(tmp_path, [cb], max_epochs=2)
    with pytest.warns(UserWarning, match="the measurement failed .*the logger is gone"):
        t.fit(Classifier(), DataModule())
    assert t.current_epoch == 2
    cb = FlatnessCallback(metrics=["fisher_trace"], num_samples=32, batch_size=16, on_error="raise")
    with pytest.raises(RuntimeError, match="the logger is gone"):
        trainer(tmp_path, [cb], max_epochs=2).fit(Classifier(), DataModule())


def test_a_recurrent_model_gets_every_default_metric_with_errors_raised(tmp_path, monkeypatch):
    """Issue 25, item 3: the per-sample path is chosen once, when training starts (tried once in the whole
    fit), and logged with the hyperparameters; with ``on_error="raise"`` nothing is skipped. (This
    sequence-first LSTM takes ``vmap``; a batch-first GRU's loop is in ``test_works_with.py``.)"""
    import importlib

    per_sample = importlib.import_module("lightning_flatness.functional._per_sample")
    tries, logged = [], {}
    real_try = per_sample._try_paths
    monkeypatch.setattr(per_sample, "_try_paths", lambda *a: tries.append(a) or real_try(*a))
    real_write = LoggerWriter.write_hyperparams
    monkeypatch.setattr(LoggerWriter, "write_hyperparams", lambda self, t, c: logged.update(c) or real_write(self, t, c))
    cb, _ = fit_recurrent(tmp_path, False, False, loss_fn=loss_batch_first, on_error="raise")
    values = cb.history[-1][1]
    assert all(math.isfinite(values[key]) for key in MEASURED), values
    assert logged["fisher_trace.per_sample_path"] == logged["grad_noise_scale.per_sample_path"] == "ghost+vmap"
    assert len(tries) == 1 and len(cb.history) >= 1
