"""Entropy-SGD against plain SGD at equal gradient evaluations.

    python examples/entropy_sgd_vs_sgd.py      # about 13 minutes on 2 shared CPU cores (mostly the MLP), offline

Each optimizer trains the same initialization for the same number of gradient evaluations
(forward + backward passes; an Entropy-SGD step costs ``num_steps`` of them) on two problems:

* least squares: ``nn.Linear(8, 1)`` on 256 samples, ``y = X w* + 0.1 noise``, full batch, mean
  squared error; the table shows the *excess* loss over the least-squares minimum;
* the study's MLP (mnist1d, 40-256-256-10, cross-entropy, mini-batches of 64, a seeded shuffle
  per epoch), with two closures for Entropy-SGD: ``same batch``, as under Lightning's automatic
  optimization (every closure call of one step sees that step's mini-batch), and ``fresh
  batches``, as in the paper (every closure call draws the next mini-batch).

It prints the loss on the whole training set after each budget, and the *factor*: how many
times SGD's evaluations Entropy-SGD needs to reach SGD's loss at the reference budget
(log-linear interpolation between budgets; ``>`` when it does not get there within the
largest budget). The numbers are quoted in docs/flatness_training.md.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.optim import EntropySGD
from lightning_flatness.study.data import load_dataset
from lightning_flatness.study.training import mlp

Batch = tuple[Tensor, Tensor]
Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

SGD_LR = 0.1
SGD = (f"SGD(lr={SGD_LR})", lambda p: torch.optim.SGD(p, lr=SGD_LR), False)
DEFAULTS = ("EntropySGD()", lambda p: EntropySGD(p), False)
SWEEP = ("the sweep's (paper form)", lambda p: EntropySGD(
    p, lr=1.0, num_steps=5, sgld_lr=SGD_LR, noise=1e-4, gamma=0.5, gamma_growth=1e-3, gamma_max=1.0,
    parametrization="paper"), False)  # fmt: skip
# (label, optimizer factory, fresh batch per closure call)
LEAST_SQUARES_RUNS = [
    SGD, DEFAULTS,
    *[(f"EntropySGD(lr={lr})", lambda p, lr=lr: EntropySGD(p, lr=lr), False) for lr in (0.1, 0.03, 0.01)],
    ("EntropySGD(lr=0.05, paper)", lambda p: EntropySGD(p, lr=0.05, parametrization="paper"), False),
    SWEEP,
]  # fmt: skip
MLP_RUNS = [
    SGD,
    ("EntropySGD(), fresh batches", DEFAULTS[1], True),
    ("EntropySGD(), same batch", DEFAULTS[1], False),
    ("EntropySGD(num_steps=5), same", lambda p: EntropySGD(p, num_steps=5), False),
    ("EntropySGD(lr=0.1), same batch", lambda p: EntropySGD(p, lr=0.1), False),
    SWEEP,
]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch], loss: Callable,
          evals: int, fresh: bool) -> None:  # fmt: skip
    """``evals`` gradient evaluations: one per SGD step, ``num_steps`` per Entropy-SGD step."""
    per_step = optimizer.param_groups[0].get("num_steps", 1)
    for _ in range(evals // per_step):
        batch = None if fresh else next(batches)

        def closure() -> Tensor:
            x, y = batch or next(batches)
            optimizer.zero_grad()
            value = loss(model(x), y)
            value.backward()
            return value

        optimizer.step(closure)


def curve(problem: dict, make_opt: Factory, fresh: bool, budgets: list[int]) -> list[float]:
    """Excess full-training-set loss after each budget of gradient evaluations (one run, continued)."""
    model = problem["make_model"]()
    optimizer, batches, done, out = make_opt(list(model.parameters())), problem["make_batches"](), 0, []
    x, y = problem["full"]
    for budget in budgets:
        train(model, optimizer, batches, problem["loss"], budget - done, fresh)
        done = budget
        with torch.no_grad():
            out.append(problem["loss"](model(x), y).item() - problem["floor"])
    return out


def factor(budgets: list[int], losses: list[float], target: float, reference: int) -> str:
    """Gradient evaluations to reach ``target``, relative to ``reference`` (log-linear interpolation)."""
    for i, value in enumerate(losses):
        if value <= target:
            if i == 0:
                return f"<={budgets[0] / reference:.2f}"
            hi, lo = math.log(losses[i - 1]), math.log(max(value, 1e-300))
            frac = (hi - math.log(target)) / (hi - lo) if hi > lo else 1.0
            return f"{budgets[i - 1] * (budgets[i] / budgets[i - 1]) ** frac / reference:.2f}"
    return f">{budgets[-1] / reference:.0f}"


def report(title: str, problem: dict, runs: list, budgets: list[int], reference: int) -> None:
    print(f"\n{title}: loss on the whole training set after n gradient evaluations")
    print(f"{'optimizer':32s}" + "".join(f"{b:>10d}" for b in budgets) + "    factor")
    curves = [(label, curve(problem, make, fresh, budgets)) for label, make, fresh in runs]
    target = curves[0][1][budgets.index(reference)]  # runs[0] is SGD
    for label, losses in curves:
        print(f"{label:32s}" + "".join(f"{v:10.2e}" for v in losses) + f"    {factor(budgets, losses, target, reference)}")


def least_squares() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ (1.2 * torch.randn(8, 1, generator=g)) + 0.1 * torch.randn(256, 1, generator=g)
    design = torch.cat([x, torch.ones(256, 1)], 1).double()
    best = design @ torch.linalg.lstsq(design, y.double()).solution

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(8, 1)

    def make_batches() -> Iterator[Batch]:
        while True:
            yield x, y

    return dict(make_model=make_model, make_batches=make_batches, loss=F.mse_loss, full=(x, y),
                floor=F.mse_loss(best, y.double()).item())  # fmt: skip


def study_mlp(batch_size: int = 64) -> dict:
    data = load_dataset("mnist1d")

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return mlp(data.in_features, [256, 256], data.num_classes)

    def make_batches() -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from data.loader("train", batch_size, shuffle=True, seed=epoch)
            epoch += 1

    return dict(make_model=make_model, make_batches=make_batches, loss=F.cross_entropy,
                full=(data.x_train, data.y_train), floor=0.0)  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    report("least squares (256 x 8, full batch; excess loss)", least_squares(), LEAST_SQUARES_RUNS,
           [20, 40, 100, 200, 400, 1000], 40)  # fmt: skip
    report("study MLP (mnist1d, batch 64)", study_mlp(), MLP_RUNS, [1000, 2000, 4000, 8000, 16000], 4000)


if __name__ == "__main__":
    main()
