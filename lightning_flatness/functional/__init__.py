"""Flatness estimators as plain functions of ``(model, batches, loss_fn)``.

See ``SPEC.md`` §2 and ``docs/metrics.md``. Every function evaluates the model in eval mode,
computes in at least float32, and leaves the model exactly as it found it.
"""

from ._losses import BUILTIN_LOSSES, cross_entropy_loss, mse_loss
from ._params import flatten, unflatten
from ._restore import measurement_mode
from .fisher_trace import FisherResult, fisher_trace
from .grad_cosine_regret import RegretResult, grad_cosine_regret
from .hessian_eigenvalues import EigenResult, hessian_eigenvalues, hessian_top_eigenvalue
from .hutchinson import TraceResult, hessian_diagonal, hessian_trace
from .local_entropy import LocalEntropyResult, local_entropy
from .loss_landscape import EigenvectorSlice, LandscapeResult, eigenvector_slice, loss_landscape, normalize_direction
from .pacgen import PACGenResult, estimate_rho, pacgen, pacgen_perturbation_scale

__all__ = [
    "BUILTIN_LOSSES",
    "EigenResult",
    "EigenvectorSlice",
    "LandscapeResult",
    "LocalEntropyResult",
    "FisherResult",
    "PACGenResult",
    "RegretResult",
    "TraceResult",
    "cross_entropy_loss",
    "eigenvector_slice",
    "estimate_rho",
    "fisher_trace",
    "flatten",
    "grad_cosine_regret",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "local_entropy",
    "loss_landscape",
    "measurement_mode",
    "mse_loss",
    "normalize_direction",
    "pacgen",
    "pacgen_perturbation_scale",
    "unflatten",
]
