"""Dict batches under the built-in pair losses (issue 25, item 4): the recognized key pairs need nothing,
other names one option, ``batch_keys``; ambiguous or unknown dicts are refused at start, naming it."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, Dataset

from lightning_flatness import FlatnessCallback
from lightning_flatness._preflight import LossFnError, probe_loss
from lightning_flatness.functional import DICT_KEYS, BuiltinLoss, fisher_trace
from lightning_flatness.functional._losses import BuiltinLossError
from tests.helpers.lightning_models import Classifier, make_data, trainer


class Named(Dataset):
    """``make_data``'s samples as dicts ``{inputs_key: x, targets_key: y}`` (plus any ``extra`` entries)."""

    def __init__(self, n: int, keys: tuple[str, str], seed: int = 0, **extra) -> None:
        self.data, self.keys, self.extra = make_data(n, seed=seed), keys, extra

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        x, y = self.data[i]
        return {self.keys[0]: x, self.keys[1]: y, **self.extra}


class DictClassifier(Classifier):
    def __init__(self, keys: tuple[str, str]) -> None:
        super().__init__()
        self.keys = keys

    def training_step(self, batch, batch_idx):
        return super().training_step((batch[self.keys[0]], batch[self.keys[1]]), batch_idx)

    def validation_step(self, batch, batch_idx):
        pass


def fit(tmp_path, keys, cb):
    seed_everything(0)
    model = DictClassifier(keys)
    loaders = DataLoader(Named(128, keys), batch_size=16, shuffle=True), DataLoader(Named(64, keys, seed=1), batch_size=32)
    trainer(tmp_path, [cb], max_epochs=1).fit(model, *loaders)
    return cb.history[-1][1]


@pytest.mark.parametrize(("keys", "batch_keys"), [(("image", "label"), None), (("features", "class"), ("features", "class"))])
def test_dict_batches_get_every_default_metric_with_the_values_of_pair_batches(tmp_path, keys, batch_keys):
    options = dict(num_samples=32, batch_size=8, gap_num_samples=32, on_error="raise")
    values = fit(tmp_path / "dict", keys, FlatnessCallback(batch_keys=batch_keys, **options))
    for key in ("flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/fisher_trace", "flatness/pacgen",
                "gap/train_loss", "gap/test_loss", "gap/train_acc"):  # fmt: skip
        assert math.isfinite(values[key]), (key, values)
    # the same samples as pairs give the same values
    seed_everything(0)
    model, data = Classifier(), make_data(128)
    loaders = DataLoader(data, batch_size=16, shuffle=True), DataLoader(make_data(64, seed=1), batch_size=32)
    cb = FlatnessCallback(**options)
    trainer(tmp_path / "pair", [cb], max_epochs=1).fit(model, *loaders)
    pairs = cb.history[-1][1]
    for key in ("flatness/hessian_top_eig", "flatness/fisher_trace", "gap/train_loss", "gap/train_acc"):
        assert values[key] == pytest.approx(pairs[key], rel=1e-6), key


@pytest.mark.parametrize("keys", DICT_KEYS)
def test_each_recognized_key_pair_reads_the_inputs_and_targets(keys):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    batch = {keys[0]: x, keys[1]: y, "index": torch.arange(4)}
    expected = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    assert torch.equal(BuiltinLoss("cross_entropy")(model, batch), expected)
    assert fisher_trace(model, [batch]).value == pytest.approx(fisher_trace(model, [(x, y)]).value, rel=1e-6)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"features": torch.ones(2, 8), "class": torch.zeros(2, dtype=torch.long)},
         r"none of the recognized key pairs .* among its keys \['class', 'features'\].*batch_keys=\(inputs_key, targets_key\)"),
        ({"x": torch.ones(2, 8), "y": torch.zeros(2, dtype=torch.long), "image": torch.ones(2, 8),
          "label": torch.zeros(2, dtype=torch.long)},
         r"several of the recognized key pairs.*ambiguous.*batch_keys="),
    ],
)  # fmt: skip
def test_a_dict_without_exactly_one_recognized_pair_is_refused_at_start_naming_batch_keys(batch, match):
    with pytest.raises(LossFnError, match=rf"^FlatnessCallback: .*{match}"):
        probe_loss(torch.nn.Linear(8, 3), batch, "cross_entropy", "FlatnessCallback")


def test_batch_keys_missing_from_the_batch_are_refused_naming_them():
    batch = {"image": torch.ones(2, 8), "label": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(LossFnError, match=r"batch_keys=\('pixels', 'label'\): the batch has no key\(s\) \['pixels'\]"):
        probe_loss(torch.nn.Linear(8, 3), batch, BuiltinLoss("cross_entropy", ("pixels", "label")), "FlatnessCallback")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(batch_keys="image"), r"batch_keys must be None .*a pair of two different strings"),
        (dict(batch_keys=("x", "x")), r"batch_keys must be None"),
        (dict(batch_keys=("x", "y"), loss_fn=lambda model, batch: model(batch[0]).sum(1)),
         r"batch_keys=\('x', 'y'\) names the dict entries a built-in loss reads; loss_fn is a callable"),
        (dict(batch_keys=("x", "y"), loss_fn="hf_causal_lm"), r'loss_fn="hf_causal_lm" reads the targets under "labels"'),
    ],
)  # fmt: skip
def test_invalid_batch_keys_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlatnessCallback(**kwargs)


def test_mc_fisher_on_dict_batches_says_to_use_the_empirical_one():
    batch = {"x": torch.ones(2, 8), "y": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(ValueError, match=r'kind="mc" needs batches that are pairs'):
        fisher_trace(torch.nn.Linear(8, 3), [batch], kind="mc")
    with pytest.raises(BuiltinLossError):
        BuiltinLoss("cross_entropy")(torch.nn.Linear(8, 3), {"a": torch.ones(2, 8)})
