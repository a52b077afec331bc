"""probe_loss and check_strategy: one clear error, before training, for setups the callbacks cannot measure."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import nn

from lightning_flatness._preflight import LossFnError, UnsupportedStrategyError, check_strategy, probe_loss
from tests.helpers.lightning_models import Classifier, DataModule, trainer


class NoForward(L.LightningModule):
    """Common practice: training_step calls a submodule, and there is no forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def pair(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def net_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model.net(x), y, reduction="none")


# ----------------------------------------------------------------------------- probe_loss
@pytest.mark.parametrize("who", ["FlatnessCallback", "PACGenPerturbation"])
def test_a_module_without_forward_gets_one_message_with_what_to_do(who):
    with pytest.raises(LossFnError) as info:
        probe_loss(NoForward(), pair(), "cross_entropy", who)
    message = str(info.value)
    assert message.startswith(f"{who}: ")
    assert "Module [NoForward] is missing the required \"forward\" function" in message
    assert "define forward" in message and f"{who}(loss_fn=loss_fn)" in message
    assert 'F.cross_entropy(model.net(x), y, reduction="none")' in message
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_a_batch_that_is_not_a_pair_gets_one_message_naming_it():
    batch = torch.randn(8, 32)  # Lightning's BoringModel: the batch is a plain tensor
    model = nn.Linear(32, 2)
    with pytest.raises(LossFnError, match=r"pairs \(inputs, targets\).*a Tensor of shape \(8, 32\)") as info:
        probe_loss(model, batch, "mse", "FlatnessCallback")
    assert 'loss_fn="mse"' in str(info.value) and "FlatnessCallback(loss_fn=loss_fn)" in str(info.value)
    with pytest.raises(LossFnError, match=r"a list of 1 element\(s\)"):
        probe_loss(model, [batch], "cross_entropy", "FlatnessCallback")


@pytest.mark.parametrize(
    "loss_fn, got",
    [
        (lambda m, b: F.cross_entropy(m.net(b[0]), b[1]), r"got shape \(\)"),  # reduced to a scalar
        (lambda m, b: F.cross_entropy(m.net(b[0]), b[1], reduction="none")[:, None], r"got shape \(2, 1\)"),
        (lambda m, b: 1.0, "got float"),
    ],
    ids=["mean", "column", "float"],
)
def test_a_loss_that_is_not_per_sample_is_reported(loss_fn, got):
    with pytest.raises(LossFnError, match=rf"PACGenPerturbation: loss_fn must return per-sample losses.*{got}"):
        probe_loss(NoForward(), pair(), loss_fn, "PACGenPerturbation")


def test_other_errors_propagate_unchanged():
    def broken(model, batch):
        raise RuntimeError("boom")

    def unimplemented(model, batch):
        raise NotImplementedError("a custom layer without a double backward")

    with pytest.raises(RuntimeError, match="^boom$"):
        probe_loss(NoForward(), pair(), broken, "FlatnessCallback")
    with pytest.raises(NotImplementedError, match="^a custom layer") as info:
        probe_loss(NoForward(), pair(), unimplemented, "FlatnessCallback")
    assert not isinstance(info.value, LossFnError)


def test_a_working_loss_is_evaluated_on_two_samples_in_eval_mode_and_leaves_no_trace():
    model = NoForward().train()
    model.net[1].eval()  # a mixed mode, restored as it was
    seen = []

    def loss_fn(model, batch):
        seen.append((len(batch[0]), model.training, torch.is_grad_enabled()))
        torch.randn(3)  # consumes the global RNG, which must be restored
        return net_loss(model, batch)

    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    probe_loss(model, pair(), loss_fn, "FlatnessCallback")
    assert seen == [(2, False, False)]
    assert model.training and model.net[0].training and not model.net[1].training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_evaluates_like_the_estimators_a_bfloat16_model_on_float_batches():
    model = nn.Sequential(nn.Linear(4, 3)).to(torch.bfloat16)
    probe_loss(model, pair(), "cross_entropy", "FlatnessCallback")  # measured in float32, no dtype error


# ----------------------------------------------------------------------------- check_strategy
def trainer_with(strategy):
    return SimpleNamespace(strategy=strategy)


@pytest.mark.parametrize(
    "strategy",
    [SingleDeviceStrategy(device=torch.device("cpu")), DDPStrategy(), DDPStrategy(start_method="spawn")],
    ids=["single_device", "ddp", "ddp_spawn"],
)
def test_single_device_and_ddp_are_supported(strategy):
    check_strategy(trainer_with(strategy), "FlatnessCallback")


def test_a_real_trainer_on_one_cpu_is_supported():
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    check_strategy(trainer, "FlatnessCallback")


@pytest.mark.parametrize(
    "strategy",
    [
        FSDPStrategy(),
        ModelParallelStrategy(),
        DeepSpeedStrategy.__new__(DeepSpeedStrategy),  # a DDPStrategy subclass; constructing it needs deepspeed
        SimpleNamespace(),  # any other strategy
    ],
    ids=["fsdp", "model_parallel", "deepspeed", "other"],
)
def test_sharded_model_parallel_and_unknown_strategies_are_refused(strategy):
    with pytest.raises(UnsupportedStrategyError) as info:
        check_strategy(trainer_with(strategy), "PACGenPerturbation")
    message = str(info.value)
    assert message.startswith(f"PACGenPerturbation does not support {type(strategy).__name__}:")
    assert "Supported: a single device" in message and '"ddp_spawn"' in message and "docs/faq.md" in message
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------- FlatnessCallback wiring
class _NoForwardClassifier(Classifier):
    """The common way without ``forward``: training_step calls the submodule."""

    forward = nn.Module.forward

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        pass


def test_flatness_callback_reports_a_module_without_forward_once_before_training(tmp_path):
    from lightning_flatness import FlatnessCallback

    module = _NoForwardClassifier()
    cb = FlatnessCallback(num_samples=64, batch_size=16, gap_num_samples=0)
    with pytest.raises(LossFnError, match=r"FlatnessCallback: .*\"forward\".*define forward") as info:
        trainer(tmp_path, [cb], max_epochs=1).fit(module, DataModule())
    assert module.steps == 0 and "loss_fn" in str(info.value)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model.net(x), y, reduction="none")

    cb = FlatnessCallback(metrics=["fisher_trace"], loss_fn=loss_fn, num_samples=64, batch_size=16, gap_num_samples=0)
    trainer(tmp_path, [cb], max_epochs=1).fit(_NoForwardClassifier(), DataModule())
    assert cb.history and "flatness/fisher_trace" in cb.history[-1][1]


def test_flatness_callback_refuses_sharded_strategies_in_setup():
    from lightning_flatness import FlatnessCallback

    fake = SimpleNamespace(strategy=FSDPStrategy(), is_global_zero=True, loggers=[])
    with pytest.raises(UnsupportedStrategyError, match="FlatnessCallback does not support FSDPStrategy.*DDP"):
        FlatnessCallback().setup(fake, Classifier(), "fit")


# ------------------------------------------------- refused at start, before the first training step (issue 23)
class _OneOutput(Classifier):
    """One output unit, trained with a binary loss: cross-entropy over it would be 0 for every sample."""

    def __init__(self) -> None:
        super().__init__(classes=1, batchnorm=False)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y.float())

    def validation_step(self, batch, batch_idx):
        pass


def _binary_loader(labels: str):
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers.lightning_models import make_data

    data = make_data(64, classes=2)
    y = data.tensors[1][:, None]
    return DataLoader(TensorDataset(data.tensors[0], y.float() if labels == "float" else y), batch_size=16)


@pytest.mark.parametrize("labels", ["float", "int"])
def test_one_output_unit_under_the_default_cross_entropy_is_refused_at_start(tmp_path, labels):
    from lightning_flatness import FlatnessCallback

    module = _OneOutput()
    with pytest.raises(LossFnError) as info:
        trainer(tmp_path, [FlatnessCallback(num_samples=32, batch_size=16)], max_epochs=1).fit(module, _binary_loader(labels))
    message = str(info.value)
    assert message.startswith('FlatnessCallback: loss_fn="cross_entropy" needs one logit per class')
    assert '"bce_with_logits"' in message and '"mse"' in message
    assert module.steps == 0


def test_bce_with_logits_measures_the_one_output_model(tmp_path):
    from lightning_flatness import FlatnessCallback

    cb = FlatnessCallback(loss_fn="bce_with_logits", num_samples=32, batch_size=16, gap_num_samples=32)
    trainer(tmp_path, [cb], max_epochs=1).fit(_OneOutput(), _binary_loader("int"))
    values = cb.history[-1][1]
    for key in ("flatness/hessian_top_eig", "flatness/fisher_trace", "gap/train_loss"):
        assert values[key] > 1e-4, key  # measured, not the 0 of cross-entropy over one logit
    assert {"flatness/pacgen", "flatness/grad_noise_scale", "flatness/grad_cosine_regret"} <= set(values)


def test_a_loss_that_is_zero_for_every_probed_sample_is_warned_about_at_start():
    model = nn.Sequential(nn.Linear(4, 3))

    def zero(model, batch):
        return model(batch[0]).sum(1) * 0

    with pytest.warns(UserWarning, match=r"FlatnessCallback: the loss is exactly 0 for each of the 2 samples probed"):
        probe_loss(model, pair(), zero, "FlatnessCallback")


def test_a_loss_that_returns_logits_for_correct_is_refused_with_the_expected_form():
    def logits_instead(model, batch):
        logits = model.net(batch[0])
        return F.cross_entropy(logits, batch[1], reduction="none"), logits

    with pytest.raises(LossFnError, match=r"correct must be a bool tensor of the losses' shape \(2,\).*torch.float32 of shape \(2, 3\)"):
        probe_loss(NoForward(), pair(), logits_instead, "FlatnessCallback")


def test_pacgen_sum_on_an_iterable_training_set_is_refused_at_start(tmp_path):
    from torch.utils.data import DataLoader

    from lightning_flatness import ConfigurationError, FlatnessCallback, PACGen
    from tests.helpers.lightning_models import Stream

    module = _NoForwardClassifier()
    cb = FlatnessCallback(metrics=[PACGen()], loss_fn=net_loss, num_samples=32, batch_size=16, gap_num_samples=0)
    with pytest.raises(ConfigurationError, match=r'PACGen\(normalization="sum"\) needs .*PACGen\(num_train=\.\.\.\)'):
        trainer(tmp_path, [cb], max_epochs=1).fit(module, DataLoader(Stream(), batch_size=16))
    assert module.steps == 0
    cb = FlatnessCallback(metrics=[PACGen(num_train=256)], loss_fn=net_loss, num_samples=32, batch_size=16, gap_num_samples=0)
    trainer(tmp_path, [cb], max_epochs=1).fit(_NoForwardClassifier(), DataLoader(Stream(), batch_size=16))
    assert "flatness/pacgen" in cb.history[-1][1]


def test_monte_carlo_fisher_with_a_callable_loss_is_refused_at_start(tmp_path):
    from lightning_flatness import ConfigurationError, FisherTrace, FlatnessCallback

    module = _NoForwardClassifier()
    cb = FlatnessCallback(metrics=[FisherTrace(kind="mc")], loss_fn=net_loss, num_samples=32, batch_size=16)
    with pytest.raises(ConfigurationError, match=r'FisherTrace: kind="mc" samples labels .*kind="empirical"'):
        trainer(tmp_path, [cb], max_epochs=1).fit(module, DataModule())
    assert module.steps == 0
