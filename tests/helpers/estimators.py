"""Every functional estimator as ``fn(model, batches) -> Tensor``, at small fixed settings.

One table for the tests that hold for all of them (split invariance, no side effects, CUDA
equals CPU, errors on bad input).
"""

from __future__ import annotations

import torch

from lightning_flatness.functional import (
    adaptive_sharpness,
    fisher_rao_norm,
    fisher_trace,
    flatness_ratio,
    grad_cosine_regret,
    hessian_diagonal,
    hessian_eigenvalue_ratio,
    hessian_eigenvalues,
    hessian_min_eigenvalue,
    hessian_trace,
    pacgen,
)

# Estimators of the objective over the union of the batches (independent of how it is split).
ESTIMATORS = {
    "eigen": lambda m, b: hessian_eigenvalues(m, b, k=2, tol=1e-10).values,
    "trace": lambda m, b: torch.tensor(hessian_trace(m, b, num_probes=5, generator=1).value),
    "diagonal": lambda m, b: hessian_diagonal(m, b, num_probes=5, generator=1),
    "fisher": lambda m, b: torch.tensor(fisher_trace(m, b).value),
    "pacgen": lambda m, b: torch.tensor(pacgen(m, b, num_probes=5, generator=1).value),
    "adaptive_sharpness": lambda m, b: torch.tensor(adaptive_sharpness(m, b, num_draws=4, generator=1).value),
    "fisher_rao": lambda m, b: torch.tensor(fisher_rao_norm(m, b).value),
    "min_eigen": lambda m, b: hessian_min_eigenvalue(m, b, k=2, tol=1e-10).values,
    "eig_ratio": lambda m, b: torch.tensor(hessian_eigenvalue_ratio(m, b, tol=1e-10).ratio),
}
# ... and every estimator, including those that depend on the mini-batches or draw labels.
ALL_ESTIMATORS = dict(
    ESTIMATORS,
    regret=lambda m, b: torch.tensor(grad_cosine_regret(m, b).regret),
    fisher_mc=lambda m, b: torch.tensor(fisher_trace(m, b, kind="mc", num_samples=3, generator=1).value),
    flatness_ratio=lambda m, b: torch.tensor(flatness_ratio(m, b, generator=1).value),
)
# The plain functions, for argument checks.
FUNCTIONS = [hessian_eigenvalues, hessian_trace, hessian_diagonal, grad_cosine_regret, fisher_trace, pacgen]
FUNCTIONS += [adaptive_sharpness, fisher_rao_norm, hessian_min_eigenvalue, hessian_eigenvalue_ratio]
