"""Flatness estimators as plain functions of ``(model, batches, loss_fn)``, and the engine beneath them.

Every estimator evaluates the model in eval mode (:func:`measurement_mode`), computes in at
least float32, and leaves the model exactly as it found it. The math, convergence criteria
and variance of each one are in ``docs/metrics.md``.

The engine is public: :class:`Objective` (the loss over a data set, evaluated functionally,
chunk by chunk, reduced over processes), its curvature operator :class:`HessianOperator`, and
the algorithms that take any :class:`CurvatureOperator` (:func:`lanczos`,
:func:`hutchinson_trace`, :func:`hutchinson_diagonal`), so a new estimator is built from the
same parts.
"""

from ._losses import (
    BUILTIN_LOSSES,
    DICT_KEYS,
    BuiltinLoss,
    bce_with_logits_loss,
    cross_entropy_loss,
    hf_causal_lm_loss,
    hf_sequence_classification_loss,
    hf_token_classification_loss,
    mse_loss,
)
from ._params import flatten, unflatten
from ._per_sample import per_sample_sq_norms
from ._restore import measurement_mode
from .adaptive_sharpness import AdaptiveSharpnessResult, adaptive_sharpness, without_normalization
from .block_curvature import BlockCurvatureResult, block_curvature, resolve_blocks
from .fisher_rao import FisherRaoResult, fisher_rao_norm
from .adversarial import AdversarialResult, adversarial_accuracy, adversarial_examples
from .fisher_trace import FisherResult, choose_per_sample_path, fisher_trace
from .flatness_ratio import FlatnessRatioResult, flatness_ratio
from .grad_cosine_regret import RegretResult, grad_cosine_regret
from .grad_noise_scale import GradNoiseScaleResult, grad_noise_scale
from .hessian_eigenvalues import EigenResult, hessian_eigenvalues, hessian_top_eigenvalue
from .hessian_min_eigenvalue import EigenRatioResult, hessian_eigenvalue_ratio, hessian_min_eigenvalue
from .hutchinson import TraceResult, hessian_diagonal, hessian_trace, hutchinson_diagonal, hutchinson_trace
from .lanczos import LanczosResult, lanczos, lanczos_tridiagonal
from .local_entropy import LocalEntropyResult, local_entropy
from .loss_landscape import ConvexityMap, EigenvectorSlice, LandscapeResult, eigenvector_slice, loss_landscape, normalize_direction
from .objective import CrossProcess, HessianOperator, Objective, cross_process_reduction
from .operator import CurvatureOperator, DenseOperator, NegatedOperator
from .pacgen import PACGenResult, estimate_rho, pacgen, pacgen_perturbation_scale
from .spectral_density import SpectralDensityResult, hessian_spectral_density, spectral_density

__all__ = [
    "AdversarialResult",
    "adversarial_accuracy",
    "adversarial_examples",
    "BUILTIN_LOSSES",
    "BuiltinLoss",
    "DICT_KEYS",
    "CrossProcess",
    "CurvatureOperator",
    "DenseOperator",
    "EigenResult",
    "EigenvectorSlice",
    "FisherResult",
    "GradNoiseScaleResult",
    "HessianOperator",
    "LanczosResult",
    "LandscapeResult",
    "LocalEntropyResult",
    "Objective",
    "PACGenResult",
    "RegretResult",
    "TraceResult",
    "bce_with_logits_loss",
    "choose_per_sample_path",
    "cross_entropy_loss",
    "cross_process_reduction",
    "eigenvector_slice",
    "estimate_rho",
    "fisher_trace",
    "flatten",
    "grad_cosine_regret",
    "grad_noise_scale",
    "hf_causal_lm_loss",
    "hf_sequence_classification_loss",
    "hf_token_classification_loss",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "lanczos",
    "local_entropy",
    "loss_landscape",
    "measurement_mode",
    "mse_loss",
    "normalize_direction",
    "pacgen",
    "pacgen_perturbation_scale",
    "per_sample_sq_norms",
    "unflatten",
    "BlockCurvatureResult",
    "block_curvature",
    "resolve_blocks",
    "SpectralDensityResult",
    "hessian_spectral_density",
    "spectral_density",
    "lanczos_tridiagonal",
    "AdaptiveSharpnessResult",
    "adaptive_sharpness",
    "without_normalization",
    "FisherRaoResult",
    "fisher_rao_norm",
    "FlatnessRatioResult",
    "flatness_ratio",
    "ConvexityMap",
    "EigenRatioResult",
    "NegatedOperator",
    "hessian_eigenvalue_ratio",
    "hessian_min_eigenvalue",
]
