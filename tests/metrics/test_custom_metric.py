"""A user-defined metric, the one in docs/extending.md, runs under the callback's guarantees."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything

from lightning_flatness import FlatnessCallback
from lightning_flatness.functional import Objective, measurement_mode
from lightning_flatness.metrics import FlatnessMetric, MeasurementContext
from tests.helpers.lightning_models import Classifier, DataModule, trainer

SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=0)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def docs_example() -> dict:
    """Run the first Python block of docs/extending.md; its namespace."""
    block = re.search(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(block, str(DOCS), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def fit(tmp_path, callbacks, epochs=2):
    seed_everything(0)
    model = Classifier()
    trainer(tmp_path, callbacks, max_epochs=epochs).fit(model, DataModule())
    return model


def test_the_documented_metric_runs_and_equals_a_direct_computation(tmp_path):
    example = docs_example()
    assert isinstance(example["callback"], FlatnessCallback)
    metric = example["PerturbedLoss"](scale=0.05)
    cb = FlatnessCallback(metrics=["fisher_trace", metric], **SMALL)
    model = fit(tmp_path, [cb])
    x, last = cb.history[-1]
    with measurement_mode(model):
        objective = Objective(model, cb._data["measure"])
        noise = torch.randn(objective.num_params, generator=torch.Generator().manual_seed(
            MeasurementContext(model, [], "cross_entropy", x, 0, 0).seed_for("perturbed_loss")), dtype=torch.float64)
        want = (objective.loss(at=objective.w0 + 0.05 * noise.to(objective.w0)) - objective.loss()).item()
    assert last["flatness/perturbed_loss"] == pytest.approx(want, rel=1e-6) and want != 0
    assert cb.hparams()["perturbed_loss.scale"] == 0.05
    with pytest.raises(ValueError, match="scale"):
        example["PerturbedLoss"](scale=-1.0)


class Rude(FlatnessMetric):
    """Does everything a metric must not get away with: global RNG draws, train mode, gradients, writes."""

    name = "rude"

    def __init__(self) -> None:
        super().__init__()
        self.keys = ("flatness/rude",)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        torch.rand(3), random.random(), np.random.rand()  # noqa: B018
        ctx.model.train()
        x, y = ctx.batches[0]
        F.cross_entropy(ctx.model(x), y).backward()  # BatchNorm statistics and .grad change
        with torch.no_grad():
            next(ctx.model.parameters()).add_(1.0)
        return {"flatness/rude": 1.0}


def test_a_misbehaving_metric_leaves_training_bit_identical(tmp_path):
    plain = fit(tmp_path / "a", [], epochs=3)
    cb = FlatnessCallback(metrics=[Rude()], measure_at_start=True, **SMALL)
    measured = fit(tmp_path / "b", [cb], epochs=3)
    assert [x for x, _ in cb.history] == [0, 1, 2, 3]
    for key, value in plain.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(value, measured.state_dict()[key]), key


class Broken(FlatnessMetric):
    name = "broken"

    def __init__(self, value: float = float("nan")) -> None:
        super().__init__()
        self.value = value
        self.keys = ("flatness/broken",)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        if self.value == 0:
            raise RuntimeError("unsupported layer")
        return {"flatness/broken": self.value}


@pytest.mark.parametrize("value, match", [(float("nan"), "non-finite"), (0.0, "unsupported layer")])
def test_a_failing_metric_warns_once_and_the_others_go_on(tmp_path, value, match):
    cb = FlatnessCallback(metrics=[Broken(value), "fisher_trace"], **SMALL)
    with pytest.warns(UserWarning, match=f"broken failed and is skipped.*{match}") as record:
        fit(tmp_path, [cb], epochs=3)
    assert sum("broken failed" in str(w.message) for w in record) == 1
    assert all("flatness/fisher_trace" in v and "flatness/broken" not in v for _, v in cb.history)
    with pytest.raises(Exception, match=match):
        fit(tmp_path, [FlatnessCallback(metrics=[Broken(value)], on_error="raise", **SMALL)], epochs=1)


def test_undeclared_keys_are_an_error(tmp_path):
    class Sloppy(Broken):
        name = "sloppy"

        def compute(self, ctx):
            return {"flatness/other": 1.0}

    cb = FlatnessCallback(metrics=[Sloppy()], on_error="raise", **SMALL)
    with pytest.raises(KeyError, match="flatness/other"):
        fit(tmp_path, [cb], epochs=1)
