"""Training set-ups the README's "Works with" table names, each with every default metric finite and the final
weights (and BatchNorm statistics) bit-identical to the same fit without the callback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything

from lightning_flatness import FlatnessCallback
from tests.helpers.lightning_models import Classifier, DataModule, trainer

MEASURED = ("flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/fisher_trace", "flatness/pacgen",
            "gap/train_loss", "gap/test_loss")  # fmt: skip


class ManualClassifier(Classifier):
    """Manual optimization: the step, zeroing and clipping are the module's own."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt.step()
        return loss


class RecurrentClassifier(Classifier):
    """A batch-first GRU over the 8 features read as 4 steps of 2: its per-sample gradients need the loop."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.GRU(2, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.net(x.reshape(x.shape[0], 4, 2))
        return self.head(out[:, -1])


SETUPS = {
    "recurrent_gru": (RecurrentClassifier, {}),
    "gradient_accumulation": (Classifier, dict(accumulate_grad_batches=3, gradient_clip_val=0.5)),
    "manual_optimization": (ManualClassifier, {}),
    "max_steps_mid_epoch": (Classifier, dict(max_steps=11, max_epochs=-1)),
}


def fit(tmp_path, module, callback, **options):
    seed_everything(0)
    model = module()
    callbacks = [] if callback is None else [callback]
    trainer(tmp_path, callbacks, **{"max_epochs": 2, **options}).fit(model, datamodule=DataModule(n_train=128))
    return model


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_every_default_metric_and_bit_identical_training(tmp_path, setup):
    module, options = SETUPS[setup]
    plain = fit(tmp_path / "a", module, None, **options)
    cb = FlatnessCallback(num_samples=32, batch_size=16, gap_num_samples=32, on_error="raise")
    measured = fit(tmp_path / "b", module, cb, **options)
    assert cb.history, "no measurement"
    values = cb.history[-1][1]
    assert all(math.isfinite(values[key]) for key in MEASURED), values
    a, b = plain.state_dict(), measured.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
