"""``torch.compile`` (issue 25, item 1): a LightningModule that holds compiled submodules, or is compiled whole, is
measured through its original eager modules (same parameters): values equal to an uncompiled model's, training
bit-identical to a compiled run without the callback, and no graph compiled for the measurement.

``backend="aot_eager"`` runs the same Dynamo capture and AOTAutograd graphs as the default backend (whose double
backward is what fails) without a C++ build, to keep the test fast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from torch import nn

from lightning_flatness import FlatnessCallback
from lightning_flatness.functional import fisher_trace, hessian_eigenvalues, pacgen
from tests.helpers.lightning_models import Classifier, DataModule, trainer

BACKEND = "aot_eager"
MEASURED = ("flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/fisher_trace", "flatness/pacgen",
            "gap/train_loss", "gap/test_loss")  # fmt: skip


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.net = inner

    def forward(self, x):
        return self.net(x)


def test_compiled_submodules_are_measured_eagerly_with_the_uncompiled_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
               for _ in range(3)]  # fmt: skip
    eager, compiled = Wrapper(net), Wrapper(torch.compile(net, backend=BACKEND))
    in_place = Wrapper(copy.deepcopy(net))
    in_place.net.compile(backend=BACKEND)  # nn.Module.compile: the module itself, compiled
    for model in (compiled, in_place):
        model(batches[0][0]).sum().backward()  # the compiled graph exists, as in training
        model.zero_grad(set_to_none=True)
    for estimate in (
        lambda m: hessian_eigenvalues(m, batches, tol=1e-10).values[0].item(),
        lambda m: fisher_trace(m, batches).value,
        lambda m: pacgen(m, batches, num_train=100, generator=0).value,
    ):
        want = estimate(eager)
        assert estimate(compiled) == pytest.approx(want, rel=1e-6) and estimate(in_place) == pytest.approx(want, rel=1e-6)
    assert isinstance(compiled.net, torch._dynamo.eval_frame.OptimizedModule)  # put back after measuring
    assert "forward" in compiled.net.__dict__ and in_place.net._compiled_call_impl is not None


class Unlogged(Classifier):
    """The classifier without ``self.log`` in its steps (Dynamo cannot trace Lightning's logging when the whole
    LightningModule is compiled, with or without the callback)."""

    def __init__(self) -> None:
        super().__init__(batchnorm=False, dropout=0.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass


class CompiledClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__(batchnorm=False, dropout=0.0)
        self.net = torch.compile(self.net, backend=BACKEND)


def fit(tmp_path, module_fn, callback):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    seed_everything(0)
    model = module_fn()
    trainer(tmp_path, [] if callback is None else [callback], max_epochs=2).fit(model, datamodule=DataModule(n_train=96))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return model, graphs


@pytest.mark.parametrize("whole", [False, True], ids=["compiled_submodule", "compiled_module"])
def test_training_is_bit_identical_and_the_measurement_compiles_nothing(tmp_path, whole):
    module_fn = (lambda: torch.compile(Unlogged(), backend=BACKEND)) if whole else CompiledClassifier
    plain, plain_graphs = fit(tmp_path / "a", module_fn, None)
    cb = FlatnessCallback(num_samples=32, batch_size=16, gap_num_samples=32, on_error="raise")
    measured, measured_graphs = fit(tmp_path / "b", module_fn, cb)
    values = cb.history[-1][1]
    assert all(math.isfinite(values[key]) for key in MEASURED), values
    assert plain_graphs > 0 and measured_graphs == plain_graphs  # no graph compiled for the measurement
    a, b = plain.state_dict(), measured.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_forward_user_code_set_on_a_compiled_module_is_measured_as_it_is():
    """Found by review: a ``forward`` replaced after compiling was swapped for the compiled module's original one."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3).double()
    compiled = torch.compile(net, backend=BACKEND)
    compiled.forward = lambda x: 2 * net(x)  # noqa: E731 - user code, after torch.compile
    x = torch.randn(5, 4, dtype=torch.float64)
    from lightning_flatness.functional._restore import eager_modules

    with eager_modules(compiled):
        inside = compiled(x)
    assert torch.equal(inside, 2 * net(x))
