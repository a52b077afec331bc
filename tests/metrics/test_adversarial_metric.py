"""AdversarialRobustness in the callback (issue 26, item 1): the functional's values on the gap's held-out
subsample, consistent with the gap's clean accuracy, training untouched, DDP equal to one process, and
setups it can never measure refused before the first step."""

from __future__ import annotations

import csv
import glob
import itertools
import os

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_flatness import AdversarialRobustness, ConfigurationError, FlatnessCallback
from lightning_flatness.functional import adversarial_accuracy
from lightning_flatness.functional.adversarial import BlockDraws, attack_options, attack_statistics
from lightning_flatness.functional.objective import CrossProcess, cross_process_reduction
from lightning_flatness.metrics import MeasurementContext, measurement_seed
from tests.helpers.lightning_models import Classifier, DataModule, trainer

SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=96)
NAME = AdversarialRobustness.name


def fit(tmp_path, cb, dm=None, epochs=1, model=None, **kwargs):
    seed_everything(0)
    model = model or Classifier()
    trainer(tmp_path, [cb] if cb else [], max_epochs=epochs, **kwargs).fit(model, dm or DataModule())
    return model


def per_sample_generators(epoch: int, batches) -> list[BlockDraws]:
    """The metric's draws: each sample's random start by its place in the whole subsample."""
    block = lambda b: torch.Generator().manual_seed(measurement_seed(0, epoch, f"{NAME}/{b}"))  # noqa: E731
    starts = [0, *itertools.accumulate(len(y) for _, y in batches)][:-1]
    return [BlockDraws(block, start) for start in starts]


def test_logs_the_functional_values_on_the_held_out_subsample(tmp_path):
    metric = AdversarialRobustness(epsilon=0.5, steps=4)
    cb = FlatnessCallback(metrics=[metric], on_error="raise", **SMALL)
    model = fit(tmp_path, cb)
    held_out = cb._data["gap_val"]
    final = cb.history[-1][1]
    fgsm = adversarial_accuracy(model, held_out, attack="fgsm", epsilon=0.5)
    assert final["robust/fgsm_acc"] == pytest.approx(fgsm.accuracy, abs=1e-7)
    assert final["robust/fgsm_loss"] == pytest.approx(fgsm.loss, rel=1e-6)
    assert final["robust/fgsm_acc_se"] == pytest.approx(fgsm.accuracy_se, rel=1e-6)
    opts = attack_options(("pgd",), "linf", 0.5, 4, None, True)
    pgd = attack_statistics(model, held_out, "cross_entropy", opts, per_sample_generators(1, held_out))["pgd"]
    assert final["robust/pgd_acc"] == pytest.approx(pgd.accuracy, abs=1e-7)
    assert final["robust/pgd_loss"] == pytest.approx(pgd.loss, rel=1e-6)
    # the drop is from the gap's own clean accuracy, on the same samples; the attack lowers it
    for attack in ("fgsm", "pgd"):
        assert final[f"robust/{attack}_drop"] == pytest.approx(final["gap/test_acc"] - final[f"robust/{attack}_acc"], abs=1e-6)
    assert final["robust/pgd_acc"] <= final["robust/fgsm_acc"] < final["gap/test_acc"]
    assert final["robust/pgd_loss"] >= final["robust/fgsm_loss"] > final["gap/test_loss"]


def test_values_do_not_depend_on_how_the_held_out_subsample_is_batched():
    """Regression: PGD's random starts were drawn per mini-batch, and the gap's held-out mini-batches are sized
    by the number of processes (100 validation samples: one mini-batch on one process, two of 50 on two), so
    two processes logged another robust/pgd_loss than one (0.95125 against 0.95093 on the DDP test's setup)."""
    torch.manual_seed(0)
    model = Classifier(dropout=0.0)
    x, y = torch.randn(100, 8), torch.randint(0, 3, (100,))
    metric = AdversarialRobustness(epsilon=0.5, steps=3)

    def compute(held_out, offsets, total=None):
        ctx = MeasurementContext(model, [], "cross_entropy", 1, 0, 0, held_out=held_out, held_out_offsets=offsets)
        with cross_process_reduction(CrossProcess(sum=lambda t: t if total is None else total(t))):
            return metric.compute(ctx)

    one = compute([(x, y)], None)
    assert compute([(x[:30], y[:30]), (x[30:], y[30:])], None) == pytest.approx(one, rel=1e-12)
    # two processes: the second attacks samples 50-99, the first 0-49, and their sums are added
    other = []
    compute([(x[50:], y[50:])], [50], lambda t: other.append(t.clone()) or t)
    two = compute([(x[:50], y[:50])], [0], lambda t: t + other[0])
    assert two == pytest.approx(one, rel=1e-12)


def test_training_is_bit_identical_with_it_on(tmp_path):
    plain = fit(tmp_path / "a", None, epochs=2)
    measured = fit(tmp_path / "b", FlatnessCallback(metrics=[AdversarialRobustness(steps=3)], measure_at_start=True,
                                                    on_error="raise", **SMALL), epochs=2)  # fmt: skip
    for key, value in plain.state_dict().items():
        assert torch.equal(value, measured.state_dict()[key]), key


def test_without_validation_data_the_fit_is_refused_naming_what_to_change(tmp_path):
    with pytest.raises(ConfigurationError, match=r"validation data and FlatnessCallback\(gap_num_samples=\) > 0"):
        fit(tmp_path, FlatnessCallback(metrics=[AdversarialRobustness()], **SMALL), DataModule(val=False))
    with pytest.raises(ConfigurationError, match="gap_num_samples"):
        fit(tmp_path, FlatnessCallback(metrics=[AdversarialRobustness()], num_samples=64, batch_size=16, gap_num_samples=0))


class TokenData(DataModule):
    def val_dataloader(self):
        ids = TensorDataset(torch.randint(0, 5, (64, 8)), torch.randint(0, 3, (64,)))
        return DataLoader(ids, batch_size=64)


class TokenClassifier(Classifier):
    def forward(self, x):
        return self.net(x.float())  # integer ids, as an embedding would take them


def test_token_ids_are_refused_before_the_first_step(tmp_path):
    with pytest.raises(ConfigurationError, match=r"floating point.*token ids"):
        fit(tmp_path, FlatnessCallback(metrics=[AdversarialRobustness()], **SMALL), TokenData(), model=TokenClassifier())


@pytest.mark.parametrize(
    "kwargs, name",
    [({"attacks": ("cw",)}, "attack"), ({"attacks": ()}, "attacks"), ({"attacks": ("pgd", "pgd")}, "attacks"),
     ({"norm": "l1"}, "norm"), ({"epsilon": -0.1}, "epsilon"), ({"steps": 0}, "steps"), ({"step_size": 0}, "step_size"),
     ({"random_start": "yes"}, "random_start")],
)  # fmt: skip
def test_bad_options_are_refused_at_construction(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        AdversarialRobustness(**kwargs)


def test_one_attack_logs_only_its_keys():
    metric = AdversarialRobustness(attacks="fgsm")
    assert metric.keys == ("robust/fgsm_acc", "robust/fgsm_loss", "robust/fgsm_drop",
                           "robust/fgsm_acc_se", "robust/fgsm_loss_se", "robust/fgsm_drop_se")  # fmt: skip
    assert metric.hparams()["attacks"] == ("fgsm",)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_one_process(tmp_path):
    seed_everything(0)
    model = Classifier(dropout=0.0)
    dm = DataModule(shuffle=False)
    cb = FlatnessCallback([AdversarialRobustness(epsilon=0.5, steps=3)], num_samples=96, batch_size=16,
                          gap_num_samples=100, on_error="raise")  # fmt: skip
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer(tmp_path, [cb], logger=logger, max_epochs=1, strategy="ddp_spawn", devices=2).fit(model, dm)
    (written,) = glob.glob(os.path.join(str(tmp_path), "csv", "*", "metrics.csv"))
    with open(written) as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("robust/pgd_acc")]
    # the gap's held-out subsample as one process draws it: 100 validation samples in one mini-batch (two
    # processes draw 2 mini-batches of 50, one per rank)
    idx = torch.randperm(len(dm.val_set), generator=torch.Generator().manual_seed(2))[:100]
    held_out = [(dm.val_set.tensors[0][idx], dm.val_set.tensors[1][idx])]
    opts = attack_options(("fgsm", "pgd"), "linf", 0.5, 3, None, True)
    want = attack_statistics(model, held_out, "cross_entropy", opts, per_sample_generators(1, held_out))
    for attack, r in want.items():
        for field, key in (("accuracy", "acc"), ("loss", "loss"), ("drop", "drop")):
            for suffix, value in (("", getattr(r, field)), ("_se", getattr(r, f"{field}_se"))):
                got = float(row[f"robust/{attack}_{key}{suffix}"])
                assert got == pytest.approx(value, rel=1e-6, abs=1e-7), (attack, key, suffix, got, value)
