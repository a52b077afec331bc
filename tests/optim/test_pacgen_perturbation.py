"""PACGenPerturbation: gradients at w + u, the optimizer updates the exact clean weights."""

import lightning as L
import pytest
import torch
from torch import nn

from lightning_flatness import EntropySGD, PACGenPerturbation
from lightning_flatness._preflight import LossFnError, UnsupportedStrategyError
from lightning_flatness.functional import pacgen_perturbation_scale

SEED, SCALE, EVERY, NUM_SAMPLES, STEPS = 7, 0.5, 3, 6, 6
OPTIONS = dict(gamma=0.1, eps=0.1, rho=None, num_probes=4, rho_probes=2, normalization="mean")


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.seen: list[list[torch.Tensor]] = []  # the weights each forward ran at

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.seen.append([p.detach().clone() for p in self.parameters()])
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


class Recorder(L.Callback):
    """Clean weights after each optimizer step (a step post-hook) and at on_train_batch_end."""

    def __init__(self):
        self.after_step, self.at_batch_end, self.rng = [], [], []

    def on_train_start(self, trainer, pl_module):
        params = list(pl_module.parameters())
        trainer.optimizers[0].register_step_post_hook(
            lambda *args: self.after_step.append([p.detach().clone() for p in params])
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rng.append(torch.get_rng_state())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at_batch_end.append([p.detach().clone() for p in pl_module.parameters()])


def fit(callbacks, accumulate=1, steps=STEPS, module=None):
    module = module or Module()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accumulate_grad_batches=accumulate, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, loader())
    return module, trainer


def manual_loop(steps=STEPS):
    """The same perturbed-gradient steps written out: estimate σ, perturb, forward/backward, restore, step."""
    module = Module()
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(SEED)
    sigma, estimated_at, fixed, history, step = None, None, None, [], 0
    while step < steps:
        for x, y in loader():
            if step == steps:
                break
            if fixed is None:
                fixed = [(x[:NUM_SAMPLES].clone(), y[:NUM_SAMPLES].clone())]
            if sigma is None or step - estimated_at >= EVERY:
                sigma = pacgen_perturbation_scale(module, fixed, generator=gen, params=params, **OPTIONS)
                estimated_at = step
            clean = [p.detach().clone() for p in params]
            u = torch.randn(sigma.numel(), generator=gen, dtype=torch.float64) * sigma * SCALE
            with torch.no_grad():
                for p, chunk in zip(params, torch.split(u, [p.numel() for p in params])):
                    p.add_(chunk.view_as(p).to(p.dtype))
            opt.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            with torch.no_grad():
                for p, c in zip(params, clean):
                    p.copy_(c)
            opt.step()
            history.append([p.detach().clone() for p in params])
            step += 1
    return history


def callback():
    return PACGenPerturbation(noise_scale=SCALE, every_n_steps=EVERY, num_samples=NUM_SAMPLES, seed=SEED, **OPTIONS)


def test_bit_identical_to_a_manual_perturbed_gradient_loop():
    recorder = Recorder()
    fit([callback(), recorder])
    expected = manual_loop()
    assert len(recorder.at_batch_end) == len(expected) == STEPS
    for got, want in zip(recorder.at_batch_end, expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_weights_are_exactly_what_the_optimizer_set_and_forward_is_perturbed(accumulate):
    recorder, cb = Recorder(), callback()
    module, trainer = fit([cb, recorder], accumulate=accumulate, steps=3)
    assert len(recorder.after_step) == 3 and len(module.seen) == 3 * accumulate
    # After every batch the weights are the clean ones (bit for bit) the optimizer produced:
    ends = recorder.at_batch_end[accumulate - 1 :: accumulate]
    for got, want in zip(ends, recorder.after_step):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not cb.perturbed
    # ... while every forward ran at perturbed weights, of the scale σ·noise_scale.
    clean_before = [[p.detach().clone() for p in Module().parameters()]] + recorder.after_step
    sigma = cb.sigma
    for i, seen in enumerate(module.seen):
        clean = clean_before[i // accumulate]
        u = torch.cat([(s - c).reshape(-1) for s, c in zip(seen, clean)]).double()
        assert (u != 0).all()
        ratio = (u / (sigma * SCALE)).std().item()
        assert 0.6 < ratio < 1.4


def test_global_rng_is_not_consumed():
    before, after = Recorder(), Recorder()
    fit([before, callback(), after], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before.rng, after.rng))


def test_zero_noise_scale_trains_exactly_like_no_callback():
    plain, perturbed = Recorder(), Recorder()
    fit([plain], steps=3)
    fit([PACGenPerturbation(noise_scale=0.0, num_probes=2, rho=0.0), perturbed], steps=3)
    for got, want in zip(perturbed.at_batch_end, plain.at_batch_end):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_uniform_noise_is_bounded_and_state_round_trips():
    cb = PACGenPerturbation(distribution="uniform", noise_scale=2.0, seed=3)
    cb.sigma = torch.full((5,), 0.1, dtype=torch.float64)
    cb.estimated_at = 0
    p = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    state = cb.state_dict()
    cb.perturb([p])
    first = p.detach().clone()
    assert (first.abs() <= 2.0 * 0.1 * 3**0.5).all() and (first != 0).all()
    cb.restore()
    assert torch.equal(p, torch.zeros(5, dtype=torch.float64)) and not cb.perturbed
    other = PACGenPerturbation(distribution="uniform", noise_scale=2.0, seed=99)
    other.load_state_dict(state)
    other.perturb([p])
    assert torch.equal(p.detach(), first)


class EntropyModule(Module):
    def configure_optimizers(self):
        return EntropySGD(self.parameters(), num_steps=2)


def test_rejects_optimizers_that_re_evaluate_the_closure():
    with pytest.raises(ValueError, match="EntropySGD"):
        fit([callback()], steps=1, module=EntropyModule())


class NoForwardModule(Module):
    """Common practice: training_step calls self.net, and the module defines no forward."""

    forward = L.LightningModule.forward

    def training_step(self, batch, batch_idx):
        self.seen.append(batch_idx)
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


class TensorBatchModule(Module):
    """Lightning's BoringModel: every batch is one plain tensor, the loss is computed from the output."""

    def training_step(self, batch, batch_idx):
        self.seen.append(batch_idx)
        return self(batch).square().mean()


def tensor_loader():
    return torch.utils.data.DataLoader(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), batch_size=8)


@pytest.mark.parametrize("explicit", [False, True], ids=["first_batch", "batches"])
def test_a_module_without_forward_fails_before_the_first_training_step(explicit):
    module = NoForwardModule()
    batches = [next(iter(loader()))] if explicit else None
    with pytest.raises(LossFnError, match=r"PACGenPerturbation: .*NoForwardModule.* \"forward\".*define forward"):
        fit([PACGenPerturbation(batches=batches)], steps=2, module=module)
    assert module.seen == []


def test_batches_that_are_not_pairs_fail_before_the_first_training_step():
    module = TensorBatchModule()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[PACGenPerturbation()],
    )  # fmt: skip
    with pytest.raises(LossFnError, match=r"pairs \(inputs, targets\).*Tensor of shape \(8, 4\).*loss_fn=loss_fn"):
        trainer.fit(module, tensor_loader())
    assert module.seen == []


def test_a_custom_loss_fn_trains_a_module_without_forward():
    def loss_fn(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model.net(x), y, reduction="none")

    module = NoForwardModule()
    _, trainer = fit([PACGenPerturbation(loss_fn=loss_fn, num_probes=2, rho=0.0)], steps=2, module=module)
    assert trainer.global_step == 2 and module.seen == [0, 1]


def test_sharded_strategies_are_refused_in_setup():
    class FakeTrainer:
        strategy = L.pytorch.strategies.FSDPStrategy()

    with pytest.raises(UnsupportedStrategyError, match="PACGenPerturbation does not support FSDPStrategy"):
        callback().setup(FakeTrainer(), Module(), "fit")
    callback().setup(FakeTrainer(), Module(), "validate")  # PACGen does nothing outside fit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_scale=-1.0), "noise_scale"),
        (dict(every_n_steps=0), "every_n_steps"),
        (dict(num_samples=0), "num_samples"),
        (dict(batches=[]), "batches"),
        (dict(loss_fn="hinge"), "loss_fn"),
        (dict(eps=0.0), "eps"),
        (dict(gamma=-1.0), "gamma"),
        (dict(rho=-1.0), "rho"),
        (dict(num_probes=0), "num_probes"),
        (dict(distribution="laplace"), "distribution"),
        (dict(seed=-1), "seed"),
        (dict(normalization="median"), "normalization"),
        (dict(num_train=0), "num_train"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PACGenPerturbation(**kwargs)


@pytest.mark.parametrize("num_train", [None, 1000])
def test_sum_normalization_sizes_sigma_by_the_training_set(num_train):
    """``normalization="sum"``: σ of n × the loss, n = the training dataset's length unless given."""
    options = dict(OPTIONS, eps=1.0, normalization="sum", num_train=num_train)  # a wide box: n moves σ off N_i
    cb = PACGenPerturbation(noise_scale=SCALE, every_n_steps=100, num_samples=NUM_SAMPLES, seed=SEED, **options)
    fit([cb], steps=1)  # σ is estimated at the initial weights, before the first step
    module = Module()
    fixed = [(x[:NUM_SAMPLES], y[:NUM_SAMPLES]) for x, y in [next(iter(loader()))]]
    gen, params = torch.Generator().manual_seed(SEED), list(module.parameters())
    expected_n = num_train or len(loader().dataset)
    expected = pacgen_perturbation_scale(module, fixed, generator=gen, params=params, **dict(options, num_train=expected_n))
    assert torch.equal(cb.sigma, expected)
    for n in (6, 33):  # the estimation batch's size, or any other n, gives another σ
        gen = torch.Generator().manual_seed(SEED)
        other = pacgen_perturbation_scale(module, fixed, generator=gen, params=params, **dict(options, num_train=n))
        assert not torch.equal(cb.sigma, other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weights_exact_after_each_step_and_cuda_rng_untouched():
    class CudaRecorder(Recorder):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rng.append(torch.cuda.get_rng_state())
            assert all(p.is_cuda for p in pl_module.parameters())

    before, after, cb = CudaRecorder(), CudaRecorder(), callback()
    module = Module()
    trainer = L.Trainer(
        max_steps=4, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[before, cb, after],
    )  # fmt: skip
    trainer.fit(module, loader())
    assert len(after.after_step) == 4
    for got, want in zip(after.at_batch_end, after.after_step):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(before.rng, after.rng))
    assert cb.sigma.is_cuda  # Lightning moves the module back to the CPU at teardown
