"""Measure every flatness estimator on a small MLP trained briefly on scikit-learn's digits.

    python examples/functional_quickstart.py

Runs offline in seconds on a CPU and prints each metric with its cost.
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_flatness.functional import (
    fisher_trace,
    grad_cosine_regret,
    hessian_eigenvalues,
    hessian_trace,
    pacgen,
)


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # A fixed measurement subsample of 512 samples in mini-batches of 64.
    sub = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:512]
    batches = list(zip(x[sub].split(64), y[sub].split(64)))
    rows = [
        ("hessian_eigenvalues (k=3)", lambda: hessian_eigenvalues(model, batches, k=3)),
        ("hessian_trace", lambda: hessian_trace(model, batches, num_probes=32)),
        ("grad_cosine_regret", lambda: grad_cosine_regret(model, batches)),
        ("fisher_trace (empirical)", lambda: fisher_trace(model, batches)),
        ("fisher_trace (mc)", lambda: fisher_trace(model, batches, kind="mc")),
        ("pacgen", lambda: pacgen(model, batches, num_train=len(y))),  # n = the training set (the sum normalization)
    ]
    for name, run in rows:
        start = time.perf_counter()
        result = run()
        print(f"{name:28s} {time.perf_counter() - start:6.2f}s  {result}")


if __name__ == "__main__":
    main()
