"""EntropySGD: a double well (wide vs sharp), Algorithm 1 reference, convex progress, state, errors, Lightning."""

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn

from lightning_flatness import EntropySGD

# ----------------------------------------------------------------------------- double well
SHARP, WIDE = -1.0, 1.0
SHARP_WIDTH, WIDE_WIDTH, WALL = 0.1, 0.5, 0.05


def double_well(x: torch.Tensor) -> torch.Tensor:
    """Two Gaussian wells of equal depth (curvature 100 vs 4) plus a symmetric wall 0.05 x²."""
    sharp = torch.exp(-((x - SHARP) ** 2) / (2 * SHARP_WIDTH**2))
    wide = torch.exp(-((x - WIDE) ** 2) / (2 * WIDE_WIDTH**2))
    return -sharp - wide + WALL * x**2


def barrier() -> float:
    """The local maximum between the wells: the neutral start, where ∇L = 0."""
    xs = torch.linspace(SHARP + 0.05, WIDE - 0.05, 200001, dtype=torch.float64)
    return xs[double_well(xs).argmax()].item()


CHAINS, DATA, BATCH = 32, 256, 16


def train(optimizer: str, steps: int, seed: int = 0) -> torch.Tensor:
    """32 independent 1-D runs at once (the loss is a sum of per-chain losses), from the barrier.

    Per-sample loss ℓ_i(x) = L(x) + z_i x with zero-mean z: mini-batch gradient noise of
    standard deviation ~1/4; every run draws its own mini-batches from one seeded generator.
    """
    x = nn.Parameter(torch.full((CHAINS,), barrier(), dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(CHAINS, DATA, generator=gen, dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)

    def closure():
        idx = torch.randint(0, DATA, (CHAINS, BATCH), generator=gen)
        loss = (double_well(x) + z.gather(1, idx).mean(1) * x).sum()
        loss.backward()
        return loss

    if optimizer == "sgd":
        opt = torch.optim.SGD([x], lr=0.01)
        for _ in range(steps):
            opt.zero_grad()
            closure()
            opt.step()
    else:
        opt = EntropySGD(
            [x], lr=1.0, num_steps=10, sgld_lr=0.1, noise=0.4, gamma=0.1, gamma_growth=0.03, gamma_max=1.0, seed=seed,
            parametrization="paper",
        )
        for _ in range(steps):
            opt.step(closure)
    return x.detach()


def test_double_well_has_equal_depths_and_a_neutral_start():
    depths = double_well(torch.tensor([SHARP, WIDE], dtype=torch.float64))
    assert depths[0].item() == pytest.approx(depths[1].item(), abs=1e-3)
    xb = torch.tensor([barrier()], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(double_well(xb).sum(), xb)
    assert abs(grad.item()) < 1e-3


def test_entropy_sgd_ends_in_the_wide_well_where_sgd_does_not():
    xb = barrier()
    sgd = train("sgd", steps=500)
    esgd = train("entropy-sgd", steps=150)
    # Plain SGD from the barrier: where the mini-batch noise first pushes it; the sharp well
    # (curvature 100) captures a good share of the runs (10 of 32 with this seed).
    in_sharp = (sgd - SHARP).abs() < 0.05
    assert in_sharp.sum() >= CHAINS // 4
    # Entropy-SGD: every run is in the wide well's basin, most near its bottom (0.95 with the wall).
    assert (esgd > xb).all()
    assert ((esgd - WIDE).abs() < 0.4).sum() >= CHAINS * 7 // 8
    # In particular, the runs that SGD took into the sharp well.
    assert (esgd[in_sharp] > xb).all()


# ----------------------------------------------------------------------------- Algorithm 1
def reference_steps(params, closure, steps, *, lr, num_steps, sgld_lr, noise, gamma, gamma_growth, alpha,
                    momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, seed=0,
                    parametrization="paper", gamma_max=None):  # fmt: skip
    """Algorithm 1 of Chaudhari et al. (2017) written out with plain tensors; the authors' outer step drops γ_t."""
    gen = torch.Generator().manual_seed(seed)
    bufs = [None] * len(params)
    for t in range(steps):
        g_t = min(gamma * (1 + gamma_growth) ** t, 1 / sgld_lr if gamma_max is None else gamma_max)
        w = [p.detach().clone() for p in params]
        mu = [p.detach().clone() for p in params]
        for _ in range(num_steps):
            for p in params:
                p.grad = None
            closure()
            with torch.no_grad():
                for p, wi, mi in zip(params, w, mu):
                    d = p.grad + weight_decay * p + g_t * (p - wi)
                    p -= sgld_lr * d
                    p += math.sqrt(sgld_lr) * noise * torch.randn(p.shape, generator=gen, dtype=p.dtype)
                    mi.mul_(1 - alpha).add_(alpha * p)
        with torch.no_grad():
            for i, (p, wi, mi) in enumerate(zip(params, w, mu)):
                d = g_t * (wi - mi) if parametrization == "paper" else wi - mi
                if momentum:
                    bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + (1 - dampening) * d
                    d = d + momentum * bufs[i] if nesterov else bufs[i]
                p.copy_(wi - lr * d)


def quadratic_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    weight = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    bias = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def closure():
        loss = ((a @ weight + bias - b) ** 2).mean() + 0.1 * (weight**4).sum()
        loss.backward()
        return loss

    return [weight, bias], closure


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(momentum=0.5, dampening=0.5),
    ],
    ids=["plain", "momentum", "nesterov_wd", "dampening"],
)
@pytest.mark.parametrize("parametrization", ["paper", "authors"])
def test_matches_algorithm_1_reference(extra, parametrization):
    hyper = dict(lr=0.5, num_steps=5, sgld_lr=0.05, noise=0.1, gamma=0.5, gamma_growth=0.2, alpha=0.25,
                 parametrization=parametrization) | extra  # fmt: skip
    params, closure = quadratic_problem()
    opt = EntropySGD(params, seed=3, **hyper)
    losses = [opt.step(closure) for _ in range(6)]
    ref_params, ref_closure = quadratic_problem()
    reference_steps(ref_params, ref_closure, 6, seed=3, **hyper)
    for p, q in zip(params, ref_params):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    # The returned loss is the one at w (first closure evaluation).
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in losses)
    assert opt.state[params[0]]["step"] == 6


def test_paper_form_is_the_authors_form_with_lr_times_gamma():
    """With a constant scope, lr_paper = lr_authors / γ gives the same steps (momentum included)."""
    gamma, hyper = 0.4, dict(num_steps=3, sgld_lr=0.05, noise=0.1, gamma_growth=0.0, momentum=0.9, seed=1)
    params, closure = quadratic_problem()
    authors = EntropySGD(params, lr=0.2, gamma=gamma, parametrization="authors", **hyper)
    for _ in range(4):
        authors.step(closure)
    paper_params, paper_closure = quadratic_problem()
    paper = EntropySGD(paper_params, lr=0.2 / gamma, gamma=gamma, parametrization="paper", **hyper)
    for _ in range(4):
        paper.step(paper_closure)
    for p, q in zip(params, paper_params):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    # p.grad is the direction before momentum: (w − μ), and γ (w − μ) in the paper's form.
    for p, q in zip(params, paper_params):
        assert torch.allclose(gamma * p.grad, q.grad, rtol=0, atol=1e-12) and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- convex progress
def least_squares(seed=0):
    """A linear model on 256 x 8 least squares, y = X w* + noise: the issue's example (loss ~14 at the start)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x @ (1.2 * torch.randn(8, 1, generator=g)) + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(8, 1)

    def loss():
        return nn.functional.mse_loss(model(x), y)

    def closure():
        value = loss()
        value.backward()
        return value

    return model, closure, loss


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(lr=0.01), dict(lr=0.03), dict(lr=0.1)], ids=["defaults", "lr0.01", "lr0.03", "lr0.1"]
)
def test_defaults_and_sgd_like_learning_rates_halve_a_convex_loss_in_50_steps(kwargs):
    model, closure, loss = least_squares()
    opt = EntropySGD(model.parameters(), **kwargs)
    start = opt.step(closure).item()
    for _ in range(49):
        opt.step(closure)
    end = loss().item()
    assert end <= start / 2
    if not kwargs:  # lr=1 moves w onto the anchor: the defaults solve it (the noise floor is 0.01)
        assert end < 0.02


def test_the_paper_form_with_an_sgd_like_lr_barely_moves():
    """Why the default is the authors' form: Algorithm 1's step lr·γ_t·(w − μ) is 0.03·lr of the way."""
    model, closure, loss = least_squares()
    opt = EntropySGD(model.parameters(), lr=0.05, parametrization="paper")
    start = opt.step(closure).item()
    for _ in range(49):
        opt.step(closure)
    assert loss().item() > 0.8 * start


def test_the_sweep_keeps_its_algorithm_1_trajectory():
    from lightning_flatness.study.training import Classifier

    module = Classifier(4, [6], 3, lr=0.1, batch_size=8, optimizer="entropy-sgd")
    reference = copy.deepcopy(module)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)

    def closure_of(model):
        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    opt = module.configure_optimizers()
    assert opt.param_groups[0]["gamma_max"] == 1.0
    for _ in range(3):
        opt.step(closure_of(module))
    ref_params = list(reference.parameters())
    reference_steps(ref_params, closure_of(reference), 3, lr=1.0, num_steps=5, sgld_lr=0.1, noise=1e-4, gamma=0.5,
                    gamma_growth=1e-3, alpha=0.25, gamma_max=1.0)  # fmt: skip
    for p, q in zip(module.parameters(), ref_params):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
    assert not torch.equal(next(module.parameters()), next(Classifier(4, [6], 3, 0.1, 8).parameters()))


def test_scoping_is_capped_and_closure_count():
    params, closure = quadratic_problem()
    calls = []

    def counted():
        calls.append(1)
        return closure()

    opt = EntropySGD(params, num_steps=4, gamma=0.5, gamma_growth=1.0, sgld_lr=0.1, gamma_max=2.0)
    for _ in range(3):
        opt.step(counted)
    assert len(calls) == 12
    group = opt.param_groups[0]
    assert [opt.scoped_gamma(group, t) for t in range(4)] == [0.5, 1.0, 2.0, 2.0]


def test_state_dict_round_trip_reproduces_the_trajectory():
    params, closure = quadratic_problem()
    opt = EntropySGD(params, momentum=0.9, noise=0.1, sgld_lr=0.05, num_steps=3, seed=5)
    for _ in range(2):
        opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    for _ in range(2):
        opt.step(closure)
    after = [p.detach().clone() for p in params]

    params2, closure2 = quadratic_problem()
    with torch.no_grad():
        for p, s in zip(params2, saved_params):
            p.copy_(s)
    opt2 = EntropySGD(params2, momentum=0.9, noise=0.1, sgld_lr=0.05, num_steps=3, seed=99)
    opt2.load_state_dict(saved)
    for _ in range(2):
        opt2.step(closure2)
    assert all(torch.equal(a, b) for a, b in zip(after, params2))


def test_global_rng_untouched_and_unused_params_left_alone():
    params, closure = quadratic_problem()
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = EntropySGD(params + [unused], noise=0.1)
    rng = torch.get_rng_state()
    opt.step(closure)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(unused, torch.ones(2, dtype=torch.float64)) and unused.grad is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-0.1), "lr"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(sgld_lr=0.0), "sgld_lr"),
        (dict(noise=-1.0), "noise"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma_growth=-0.1), "gamma_growth"),
        (dict(gamma_max=25.0), "gamma_max \\* sgld_lr"),
        (dict(gamma=5.0, gamma_max=1.0), "gamma must be <= gamma_max"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(momentum=1.0), "momentum"),
        (dict(nesterov=True), "nesterov"),
        (dict(momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(lr=float("nan")), "lr"),
        (dict(seed=-1), "seed"),
        (dict(parametrization="local_entropy"), r"parametrization.*\['authors', 'paper'\]"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EntropySGD([nn.Parameter(torch.zeros(2))], **kwargs)


def test_a_state_dict_saved_before_the_parametrization_option_resumes_in_the_paper_form():
    params, closure = quadratic_problem()
    saved = EntropySGD(params).state_dict()
    del saved["param_groups"][0]["parametrization"]
    opt = EntropySGD(params)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["parametrization"] == "paper"
    opt.step(closure)


def test_closure_is_required():
    opt = EntropySGD([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="closure"):
        opt.step()


class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return EntropySGD(self.parameters(), lr=1.0, num_steps=3, gamma=0.1, noise=1e-3)


def test_runs_under_lightning_automatic_optimization():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    module = TinyModule()
    before = module.net.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 4
    assert not torch.equal(before, module.net.weight)
    assert torch.isfinite(module.net.weight).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_are_reproducible_and_leave_the_cuda_rng():
    def run():
        params, closure = quadratic_problem()
        params = [nn.Parameter(p.detach().cuda()) for p in params]
        a, b = torch.randn(5, 3, dtype=torch.float64).cuda(), torch.randn(5, dtype=torch.float64).cuda()

        def cuda_closure():
            loss = ((a @ params[0] + params[1] - b) ** 2).mean()
            loss.backward()
            return loss

        opt = EntropySGD(params, momentum=0.9, nesterov=True, noise=0.1, num_steps=4, seed=2)
        rng = torch.cuda.get_rng_state()
        for _ in range(3):
            opt.step(cuda_closure)
        assert torch.equal(torch.cuda.get_rng_state(), rng)
        return [p.detach().cpu() for p in params]

    torch.manual_seed(0)
    first = run()
    torch.manual_seed(0)
    assert all(torch.equal(x, y) for x, y in zip(first, run()))
