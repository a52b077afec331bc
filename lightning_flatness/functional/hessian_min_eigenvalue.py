"""The bottom of the Hessian spectrum: ``λ_min`` and the ratio ``|λ_min / λ_max|`` (Li et al. 2018)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..validation import check_float
from ._graph_cache import CacheChunks
from ._losses import LossArg
from ._restore import measurement_mode
from ._stats import MeanAccumulator
from .hessian_eigenvalues import (
    ChunkRayleighQuotients,
    EigenResult,
    _solve,
    cache_options,
    initial_vector,
    observed_lanczos,
    observes_batches,
    solver_options,
)
from .objective import HessianOperator, Objective


def hessian_min_eigenvalue(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    k: int = 1,
    tol: float = 1e-4,
    atol: float | None = None,
    max_iter: int = 100,
    init: Tensor | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | int | None = None,
    cache_chunks: CacheChunks = "auto",
    cache_bytes: int | None = None,
    verify: bool = True,
    error_ratio: float | None = None,
) -> EigenResult:
    r"""The ``k`` algebraically smallest eigenvalues of :math:`\nabla^2 L(w)`, ascending, and their eigenvectors.

    Lanczos on :math:`-\nabla^2 L` (:class:`~lightning_flatness.functional.NegatedOperator`):
    its largest eigenpairs are the Hessian's smallest, so everything
    :func:`hessian_eigenvalues` says holds unchanged (partial reorthogonalization, the
    ``tol`` and ``error_ratio`` rules, the check in the complement with ``verify``, the warm
    start ``init``, the kept gradient graphs ``cache_chunks``), and ``se`` is the standard error
    of each value over the draw of the mini-batches from the per-mini-batch Rayleigh quotients of
    its Ritz vector. ``λ_min`` is negative at a saddle point and 0 or above where the Hessian is
    positive semi-definite; the ``tol`` rule is relative to ``|λ_min|`` itself, which may be 0
    there (a null space): ``atol`` (e.g. ``tol·λ_max``, as :func:`hessian_eigenvalue_ratio`
    passes) stops instead once each value's residual and last change are at most ``atol``, so
    an eigenvalue lies within ``atol`` of it (keep it above the products' rounding, about
    ``√ε·‖H‖`` in float32, or Lanczos runs on to ``max_iter``). The cold start is a Gaussian vector from
    ``generator``: the gradient, which lies mostly in the top eigenspace, would not help here.

    Cost: ``n_hvp`` Hessian-vector products (one per Lanczos iteration, the check's included);
    the bottom of a network's spectrum is a dense bulk near 0, which converges more slowly than
    the top (on the test MLP about twice the products of :func:`hessian_eigenvalues`).

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import hessian_min_eigenvalue
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> result = hessian_min_eigenvalue(model, batches)
        >>> result.values.shape, bool(result.values[0] < 0), result.converged
        (torch.Size([1]), True, True)
    """
    return _solve(
        model, batches, loss_fn, k=k, init=init, start="random", gradient=None, params=params, dtype=dtype,
        solver=solver_options(tol, max_iter, verify, error_ratio, generator), cache=cache_options(cache_chunks, cache_bytes),
        smallest=True, atol=None if atol is None else check_float("atol", atol, inclusive=False),
    )  # fmt: skip


@dataclass(frozen=True)
class EigenRatioResult:
    """``ratio = max(−λ_min, 0) / λ_max`` (``|λ_min/λ_max|`` where ``λ_min < 0``; 0 where the Hessian is
    positive semi-definite; NaN unless ``λ_max > 0``) and its standard error ``se`` over the draw of the
    mini-batches (NaN with one mini-batch).

    ``smallest``: ``λ_min``'s :class:`EigenResult`; ``largest``: ``λ_max``'s (for a given ``top``, its
    value and vector, with ``n_hvp`` the one product that measured its per-mini-batch quotients).
    """

    ratio: float
    se: float
    smallest: EigenResult
    largest: EigenResult

    @property
    def n_hvp(self) -> int:
        """Every Hessian-vector product made: both solves' (or ``λ_min``'s and the given top's one)."""
        return self.smallest.n_hvp + self.largest.n_hvp

    @property
    def converged(self) -> bool:
        return self.smallest.converged and self.largest.converged


def hessian_eigenvalue_ratio(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    top: tuple[float, Tensor] | None = None,
    init: Tensor | None = None,
    top_init: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 100,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | int | None = None,
    cache_chunks: CacheChunks = "auto",
    cache_bytes: int | None = None,
    verify: bool = True,
    error_ratio: float | None = None,
    gradient: Tensor | None = None,
) -> EigenRatioResult:
    r"""``|λ_min / λ_max|`` of :math:`\nabla^2 L(w)`: how much negative curvature there is next to the positive.

    Li et al. (NeurIPS 2018) map this ratio over a loss surface: small (dark) where the surface
    is convex, large where it is not. Here ``ratio = max(−λ_min, 0)/λ_max``: 0 where the
    Hessian is positive semi-definite. ``λ_max`` is solved for by :func:`hessian_eigenvalues`
    (warm-started from ``top_init``, cold from the gradient, or ``gradient`` if given) unless
    ``top = (λ_max, its eigenvector)`` is given (e.g. this measurement's top eigenpair); then
    ``λ_min`` by :func:`hessian_min_eigenvalue` (from ``init``) with ``atol = tol·λ_max``
    (at least ``√ε·λ_max``, ``ε`` of the compute dtype: 3.4e-4 in float32, 1.5e-8 in float64,
    what a product's rounding allows): the ratio's own error is at most about that. Both on one Hessian operator, so kept gradient
    graphs serve both.

    ``se``: the delta method with both values measured on the same mini-batches, paired: to
    first order a redrawn subsample moves the ratio by ``(Δλ_min − R·Δλ_max)/λ_max``
    (``R = λ_min/λ_max``), whose per-mini-batch values ``(a_b − R·c_b)/λ_max`` come from the
    per-mini-batch Rayleigh quotients ``a_b``, ``c_b`` of the two Ritz vectors; their weighted
    batch means give the error ``s`` of ``−R``. The ratio clamps ``−R`` at 0, so ``se`` is the
    standard deviation of ``max(X, 0)`` for a normal ``X`` of mean ``−R`` and deviation ``s``:
    ``s`` where ``λ_min`` is well below 0, about 0 where it is well above (a positive definite
    Hessian's ratio is 0 on every redraw), ``0.58·s`` at ``λ_min = 0``.

    Cost: ``n_hvp`` Hessian-vector products: both Lanczos runs' (each with its check when
    ``verify``), plus 1 gradient on a cold start of ``λ_max``; with ``top`` given, ``λ_min``'s
    run and one product that measures the top vector's per-mini-batch quotients (none with one
    mini-batch, which has no standard error).

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import hessian_eigenvalue_ratio
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> result = hessian_eigenvalue_ratio(model, batches)
        >>> 0 < result.ratio < 1, result.se > 0, result.converged
        (True, True, True)
    """
    solver, cache = solver_options(tol, max_iter, verify, error_ratio, generator), cache_options(cache_chunks, cache_bytes)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        operator = objective.hessian_operator(**cache)
        return extreme_ratio(objective, operator, top=top, init=init, top_init=top_init, gradient=gradient, **solver)


def extreme_ratio(
    objective: Objective, operator: HessianOperator, *, top: tuple[float, Tensor] | None = None,
    init: Tensor | None = None, top_init: Tensor | None = None, gradient: Tensor | None = None, start: str = "gradient",
    **solver: Any,
) -> EigenRatioResult:  # fmt: skip
    """:func:`hessian_eigenvalue_ratio` on ``operator`` (``objective``'s Hessian, at ``w0`` or elsewhere);
    ``start``: ``λ_max``'s cold start (``"random"`` away from ``w0``, where ``objective``'s gradient is not
    that of the point); ``solver``: :func:`solver_options`."""
    gen = solver["generator"]
    if top is None:
        vector, n_grad = initial_vector(objective, 1, top_init, start, gen, gradient)
        out, observed = observed_lanczos(objective, operator, vector, k=1, **solver)
        largest, c = _with_quotients(out, observed, objective, n_grad)
    else:
        largest, c = _given_top(objective, operator, *top)
    lam_max = largest.values[0].item()
    vector, _ = initial_vector(objective, 1, init, "random", gen, None)
    # No tighter than the rounding of a product allows (float32: 30-1000 ε‖H‖ measured): an unattainable
    # target ran Lanczos to P iterations, where a float32 basis can lose its orthogonality.
    reachable = math.sqrt(torch.finfo(objective.dtype).eps)
    atol = max(solver["tol"], reachable) * abs(lam_max) if lam_max != 0 else None
    out, observed = observed_lanczos(objective, operator, vector, k=1, smallest=True, atol=atol, **solver)
    smallest, a = _with_quotients(out, observed, objective, 0)
    ratio, se = _ratio_and_error(smallest.values[0].item(), lam_max, a, c, observed, objective)
    return EigenRatioResult(ratio, se, smallest, largest)


def _with_quotients(
    out: Any, observed: ChunkRayleighQuotients | None, objective: Objective, n_grad: int
) -> tuple[EigenResult, Tensor | None]:
    """The solve as an :class:`EigenResult` (with ``se``) and its Ritz vector's per-mini-batch quotients ``(M,)``."""
    se, quotients = torch.full_like(out.values, math.nan), None
    if observed is not None:
        se = observed.standard_error(out.coefficients, objective.reduce_sum, objective.device).to(out.values)
        quotients = observed.quotients(out.coefficients)[:, 0]
    return EigenResult(out.values, out.vectors, out.n_products, out.converged, n_grad, se, out.residuals), quotients


def _given_top(objective: Objective, operator: HessianOperator, value: float, vector: Tensor) -> tuple[EigenResult, Tensor | None]:
    """A given top eigenpair, and its vector's per-mini-batch quotients: one product, none with one mini-batch."""
    vector = vector.detach().reshape(-1).to(objective.w0)
    if vector.numel() != objective.num_params or not torch.isfinite(vector).all() or vector.norm() == 0:
        raise ValueError(f"top must be (λ_max, a finite nonzero vector of {objective.num_params} entries); "
                         f"got a vector of shape {tuple(vector.shape)}.")  # fmt: skip
    vector = vector / vector.norm()
    values = torch.tensor([float(value)], dtype=vector.dtype, device=vector.device)
    if not observes_batches(objective):
        return EigenResult(values, vector[None], 0, True, se=torch.full_like(values, math.nan)), None
    operator.chunk_observer = observed = ChunkRayleighQuotients()
    try:
        operator @ vector
    finally:
        operator.chunk_observer = None
    unit = torch.ones(1, 1, dtype=torch.float64)  # the vector itself: the first (only) row of the basis
    se = observed.standard_error(unit, objective.reduce_sum, objective.device).to(values)
    return EigenResult(values, vector[None], 1, True, se=se), observed.quotients(unit)[:, 0]


def _ratio_and_error(
    lam_min: float, lam_max: float, a: Tensor | None, c: Tensor | None, observed: ChunkRayleighQuotients | None,
    objective: Objective,
) -> tuple[float, float]:  # fmt: skip
    """``max(−λ_min, 0)/λ_max`` and its paired delta-method standard error (NaN where there is none)."""
    if not lam_max > 0:
        return math.nan, math.nan  # no positive curvature to compare with: the ratio means nothing
    r = lam_min / lam_max
    if a is None or c is None or observed is None:
        return max(-r, 0.0), math.nan
    acc = MeanAccumulator(1)
    acc.add((a - r * c) / lam_max, torch.tensor(observed.sizes, dtype=torch.float64))
    se = acc.result(lambda sums: objective.reduce_sum(sums.to(objective.device)).cpu())[1].item()
    return max(-r, 0.0), _clamped_sd(-r, se)


def _clamped_sd(mean: float, sd: float) -> float:
    """The standard deviation of ``max(X, 0)`` for a normal ``X`` of that mean and ``sd``: ``sd`` well above 0,
    0 well below (a positive definite Hessian's ratio is 0 on every redraw), ``0.58·sd`` at 0."""
    if not sd > 0:
        return sd
    z = mean / sd
    cdf, pdf = 0.5 * math.erfc(-z / math.sqrt(2)), math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    first = mean * cdf + sd * pdf
    second = (mean * mean + sd * sd) * cdf + mean * sd * pdf
    return math.sqrt(max(second - first * first, 0.0))
