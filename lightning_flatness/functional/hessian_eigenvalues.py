"""Top eigenvalues of the loss Hessian by Lanczos iteration (Lanczos 1950; Yao et al. 2018)."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..validation import check_bool, check_cache_chunks, check_choice, check_float, check_generator, check_int
from ._graph_cache import CacheChunks
from ._losses import LossArg
from ._restore import measurement_mode
from ._rows import Rows
from ._stats import MeanAccumulator
from .lanczos import ErrorTarget, LanczosResult, lanczos
from .objective import HessianOperator, Objective
from .operator import NegatedOperator


@dataclass(frozen=True)
class EigenResult:
    """``values`` (k,) descending (ascending from :func:`hessian_min_eigenvalue`: the smallest first),
    ``vectors`` (k, P) unit-norm flat eigenvectors.

    ``n_grad``: gradient passes spent on the start vector (1 for the default cold start).
    ``se`` (k,): standard error of each value with respect to the draw of the mini-batches
    (batch means of each Ritz vector's per-mini-batch Rayleigh quotient; NaN with one mini-batch).
    ``residuals`` (k,): ``‖H y − θ y‖`` of each pair (a bound for pairs a check found): an
    eigenvalue lies within it of the value, converged or not.
    """

    values: Tensor
    vectors: Tensor
    n_hvp: int
    converged: bool
    n_grad: int = 0
    se: Tensor | None = None
    residuals: Tensor | None = None

STARTS = ("gradient", "random")


def hessian_eigenvalues(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 100,
    init: Tensor | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | int | None = None,
    cache_chunks: CacheChunks = "auto",
    cache_bytes: int | None = None,
    start: str = "gradient",
    gradient: Tensor | None = None,
    verify: bool = True,
    error_ratio: float | None = None,
) -> EigenResult:
    r"""The ``k`` algebraically largest eigenvalues of :math:`\nabla^2 L(w)` and their eigenvectors.

    :math:`L(w) = \frac1N \sum_i \ell_i(w)` over all samples in ``batches``. The Hessian is
    never formed: Lanczos iteration with partial reorthogonalization builds a Krylov basis from
    Hessian-vector products (one per iteration, each a full pass over ``batches``) and returns
    the Ritz pairs of the tridiagonal projection. Compared with power iteration (PyHessian,
    Yao et al. 2018, 2020) Lanczos converges at a rate governed by the square root of the
    relative eigengap and finds several eigenvalues at once.

    Convergence: after each iteration ``m > k``, every returned Ritz value's relative change
    since the previous iteration is at most ``tol`` *and* its residual
    :math:`\|H y_i - \theta_i y_i\| \le \sqrt{tol}\,|\theta_i|` (read off the tridiagonal
    matrix, at no extra cost): a relative error of at most about ``tol·θ_i/δ_i``, ``δ_i`` the
    distance to the rest of the spectrum (:func:`~lightning_flatness.functional.lanczos`).
    ``converged`` is ``False`` if ``max_iter`` iterations did not reach it; the values returned
    are then the current Ritz values. ``error_ratio`` (e.g. ``0.1``): stop instead where each
    value's residual (an eigenvalue lies within it) and its last change are at most ``error_ratio`` times its
    standard error over the draw of the mini-batches, computed as the run goes (``tol`` applies
    where there is none: one mini-batch); a tenth of the standard error adds half a percent to the
    total error. ``verify`` (default): once converged, Lanczos runs again
    from a Gaussian vector in the orthogonal complement of the converged vectors, which finds
    a repeated eigenvalue (one Krylov space holds one vector of it) and a top eigenvalue that
    a warm start lacked (e.g. last epoch's eigenvector after the top two traded places); its
    products count in ``n_hvp``.

    ``init``: a flat vector ``(P,)`` or a block ``(j, P)`` (e.g. last epoch's ``vectors``) to
    warm-start from; a block is summed into one start vector, whose Krylov space contains the
    whole block after ``j`` steps when the block spans an invariant subspace. A start vector
    near the top eigenvector converges in a few iterations. Without ``init``, ``start``
    chooses: ``"gradient"`` (default) starts from ``∇L/‖∇L‖ + u/‖u‖`` with a Gaussian ``u``, for
    one gradient pass (``n_grad``): the gradient lies mostly in the top eigenspace (Gur-Ari,
    Roberts & Dyer 2018, "Gradient descent happens in a tiny subspace") and the Gaussian half
    keeps every direction in play; it took 25–40% fewer products than a Gaussian start on the
    benchmark models. ``gradient``: ``∇L`` on the same batches if already at hand (e.g.
    :func:`grad_cosine_regret`'s), which saves that pass. ``"random"`` starts from ``u`` alone. ``u`` is drawn from ``generator``
    (a fixed seed by default, so results are reproducible).

    Cost: ``n_hvp`` Hessian-vector products. The forward passes and gradient graphs of the
    leading chunks are built once and kept, so each product is a single second backward pass on
    them (about 1.5–2× a gradient instead of 2.5–3×): with ``cache_chunks="auto"`` (default)
    while the graphs' measured size stays within ``cache_bytes`` (default: a quarter of the free
    CUDA memory, 1 GiB on CPU), with an integer for at most that many chunks (``0``: none); see
    :class:`HessianOperator`.

    Memory: the Lanczos basis holds up to ``max_iter`` flat vectors, and the standard errors a
    copy of it.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import hessian_eigenvalues
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> result = hessian_eigenvalues(model, batches, k=2)
        >>> result.values.shape, result.vectors.shape, result.converged
        (torch.Size([2]), torch.Size([2, 67]), True)
    """
    return _solve(
        model, batches, loss_fn, k=k, init=init, start=start, gradient=gradient, params=params, dtype=dtype,
        solver=solver_options(tol, max_iter, verify, error_ratio, generator), cache=cache_options(cache_chunks, cache_bytes),
    )  # fmt: skip


def solver_options(
    tol: float, max_iter: int, verify: bool, error_ratio: float | None, generator: torch.Generator | int | None
) -> dict[str, Any]:
    """The Lanczos options of :func:`lanczos_with_errors`, checked (one place for their messages)."""
    return {
        "tol": check_float("tol", tol, inclusive=False), "max_iter": check_int("max_iter", max_iter),
        "verify": check_bool("verify", verify), "generator": check_generator(generator),
        "error_ratio": None if error_ratio is None else check_float("error_ratio", error_ratio, inclusive=False),
    }  # fmt: skip


def cache_options(cache_chunks: CacheChunks, cache_bytes: int | None) -> dict[str, Any]:
    """The graph cache's options of :meth:`Objective.hessian_operator`, checked."""
    cache_bytes = None if cache_bytes is None else check_int("cache_bytes", cache_bytes, 0)
    return {"cache_chunks": check_cache_chunks(cache_chunks), "cache_bytes": cache_bytes}


def _solve(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossArg, *, k: int, init: Tensor | None, start: str,
    gradient: Tensor | None, params: Iterable[Tensor] | None, dtype: torch.dtype | None, solver: dict[str, Any],
    cache: dict[str, Any], smallest: bool = False, atol: float | None = None,
) -> EigenResult:  # fmt: skip
    """:func:`hessian_eigenvalues` (or, ``smallest``, the bottom of the spectrum) with checked options."""
    k, start = check_int("k", k), check_choice("start", start, STARTS)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        vector, n_grad = initial_vector(objective, k, init, start, solver["generator"], gradient)
        operator = objective.hessian_operator(**cache)
        out, se = lanczos_with_errors(objective, operator, vector, k=k, smallest=smallest, atol=atol, **solver)
    return EigenResult(out.values, out.vectors, out.n_products, out.converged, n_grad, se, out.residuals)


def initial_vector(
    objective: Objective, k: int, init: Tensor | None, start: str, generator: torch.Generator, gradient: Tensor | None
) -> tuple[Tensor, int]:
    """Lanczos' start vector for ``k`` pairs: ``init`` when given, else the cold ``start``; and the gradient passes it took."""
    if k > objective.num_params:
        raise ValueError(f"k={k} exceeds the number of measured parameters P={objective.num_params}; choose 1 <= k <= P.")
    if init is None:
        return _cold_start(objective, start, generator, gradient)
    return _start_vector(init, objective.num_params, objective.w0), 0


def lanczos_with_errors(
    objective: Objective, operator: HessianOperator, start: Tensor, *, k: int, tol: float, max_iter: int,
    generator: torch.Generator, verify: bool = True, error_ratio: float | None = None, smallest: bool = False,
    atol: float | None = None,
) -> tuple[LanczosResult, Tensor]:  # fmt: skip
    """:func:`lanczos` on ``operator`` (``objective``'s Hessian or a block of it) and each Ritz
    value's standard error ``(k,)`` over the mini-batches (:class:`ChunkRayleighQuotients`); with
    ``error_ratio``, Lanczos stops where each value's error is that fraction of its running standard error.
    ``smallest`` and ``atol``: see :func:`observed_lanczos`."""
    out, quotients = observed_lanczos(
        objective, operator, start, k=k, tol=tol, max_iter=max_iter, generator=generator, verify=verify,
        error_ratio=error_ratio, smallest=smallest, atol=atol,
    )  # fmt: skip
    se = torch.full_like(out.values, math.nan)
    if quotients is not None:
        se = quotients.standard_error(out.coefficients, objective.reduce_sum, objective.device).to(out.values)
    return out, se


def observed_lanczos(
    objective: Objective, operator: HessianOperator, start: Tensor, *, k: int, tol: float, max_iter: int,
    generator: torch.Generator, verify: bool = True, error_ratio: float | None = None, smallest: bool = False,
    atol: float | None = None,
) -> tuple[LanczosResult, ChunkRayleighQuotients | None]:  # fmt: skip
    """:func:`lanczos` on ``operator`` with its per-mini-batch projections (``None`` with one mini-batch).

    ``smallest``: the ``k`` algebraically smallest pairs, by Lanczos on ``−H``
    (:class:`NegatedOperator`), so every rule of :func:`lanczos` applies unchanged; values are
    returned in ``H``'s sign, ascending (residuals and coefficients as they are: the quotients
    observed are ``H``'s own). ``atol``: where no standard error decides (no ``error_ratio``, or one
    mini-batch), a value has converged once its residual and last change are at most ``atol``
    (an absolute tolerance, e.g. ``tol·λ_max`` for ``λ_min``, whose own scale may be 0).
    """
    operator.chunk_observer = quotients = ChunkRayleighQuotients() if observes_batches(objective) else None
    target = _error_target(objective, quotients, error_ratio, atol)
    try:
        out = lanczos(
            NegatedOperator(operator) if smallest else operator, start, k=k, tol=tol, max_iter=max_iter,
            generator=generator, verify=verify, error_target=target,
        )  # fmt: skip
    finally:
        operator.chunk_observer = None  # later products (e.g. Hutchinson's) are not Lanczos'
    return (replace(out, values=-out.values) if smallest else out), quotients


def _error_target(
    objective: Objective, quotients: ChunkRayleighQuotients | None, error_ratio: float | None, atol: float | None
) -> ErrorTarget | None:
    """:func:`lanczos`'s ``error_target``: ``error_ratio`` of the running standard error, else ``atol`` (else none)."""
    if error_ratio is None or quotients is None:
        return None if atol is None else lambda c: torch.full((c.shape[1],), atol, dtype=torch.float64)

    def target(c: Tensor) -> Tensor:
        t = error_ratio * quotients.standard_error(c, objective.reduce_sum, objective.device)
        return t if atol is None else torch.where(torch.isfinite(t), t, torch.full_like(t, atol))

    return target


def hessian_top_eigenvalue(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossArg = "cross_entropy", **kwargs: Any
) -> float:
    """``hessian_eigenvalues(..., k=1).values[0]`` as a float."""
    if "k" in kwargs:
        raise TypeError("hessian_top_eigenvalue computes k=1; use hessian_eigenvalues for k > 1.")
    return float(hessian_eigenvalues(model, batches, loss_fn, k=1, **kwargs).values[0])


class ChunkRayleighQuotients:
    """Per mini-batch, the projections ``T_b = Qᵀ H_b Q`` of its summed Hessian on the Lanczos basis.

    A :attr:`HessianOperator.chunk_observer`: every product ``H q_i`` arrives chunk by chunk, and
    ``Q_{≤i} · (H_b q_i)`` is column ``i`` of ``T_b``. The Ritz vector ``y = Σ_i s_i q_i`` then has
    the per-mini-batch Rayleigh quotient ``r_b = sᵀ T_b s / n_b`` without another product:
    ``λ̂ = Σ_b n_b r_b / N``, and the batch means of ``r_b`` give its sampling error (the delta
    method: to first order a redrawn subsample moves ``λ`` by ``yᵀ ΔH y``). Cost: one
    ``(i+1) × P`` projection per chunk of the ``i``-th product. Memory: its own copy of the basis
    (``m`` flat vectors, as rows of one growable matrix) and ``m²/2`` numbers per mini-batch.
    """

    def __init__(self) -> None:
        self.basis: Rows | None = None  # the vectors multiplied, in order (the Lanczos basis), copied once
        self._index: dict[int, tuple[weakref.ref, int]] = {}  # id(vector) -> (the vector, its place in the basis)
        self._seen: list[int] = []  # chunks seen so far of each basis vector's product
        self.columns: list[list[Tensor]] = []  # per chunk: Q_{≤i} · (H_b q_i) for i = 0, 1, ...
        self.sizes: list[int] = []

    def __call__(self, vector: Tensor, chunk_product: Tensor, size: int) -> None:
        i = self._place(vector)
        chunk = self._seen[i]
        self._seen[i] += 1
        if chunk == len(self.columns):
            self.columns.append([])
            self.sizes.append(size)
        self.columns[chunk].append((self.basis.view(i + 1) @ chunk_product).to(torch.float64).cpu())

    def _place(self, vector: Tensor) -> int:
        """``vector``'s place in the basis, appending it (a copy) when new.

        The operator passes the same tensor object for every chunk of one product. A weak
        reference tells it from a later vector that reuses the ``id`` of a freed one, without
        keeping the caller's storage alive (e.g. an outgrown Lanczos basis).
        """
        ref, i = self._index.get(id(vector), (None, -1))
        if ref is not None and ref() is vector:
            return i
        if self.basis is None:
            self.basis = Rows(vector)
        i = len(self.basis)
        self.basis.append(vector)
        self._seen.append(0)
        self._index[id(vector)] = (weakref.ref(vector), i)
        return i

    def quotients(self, coefficients: Tensor) -> Tensor:
        """``(M, k)``: this process's per-mini-batch Rayleigh quotients ``sᵀ T_b s / n_b`` of the Ritz vectors."""
        m = coefficients.shape[0]
        rows = []
        for columns in self.columns:
            t = torch.zeros(m, m, dtype=torch.float64)
            for i, column in enumerate(columns[:m]):
                t[: i + 1, i] = column
            t = torch.triu(t) + torch.triu(t, 1).T  # symmetric: only the upper triangle was projected
            rows.append(torch.einsum("ik,ij,jk->k", coefficients, t, coefficients))
        sizes = torch.tensor(self.sizes, dtype=torch.float64).reshape(-1, 1)
        return torch.stack(rows) / sizes if rows else torch.empty(0, coefficients.shape[1], dtype=torch.float64)

    def standard_error(self, coefficients: Tensor, reduce: Callable[[Tensor], Tensor], device: torch.device) -> Tensor:
        """The standard error ``(k,)`` of each Ritz value, by weighted batch means over every process's mini-batches."""
        acc = MeanAccumulator(coefficients.shape[1])
        acc.add(self.quotients(coefficients), torch.tensor(self.sizes, dtype=torch.float64))
        return acc.result(lambda sums: reduce(sums.to(device)).cpu())[1]


def observes_batches(objective: Objective) -> bool:
    """Whether there are per-mini-batch errors to measure: one mini-batch in all has no batch means
    (the error would be NaN), so its projections are spared."""
    return objective.cross_process or _length(objective.batches) != 1


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _cold_start(objective: Objective, start: str, gen: torch.Generator, gradient: Tensor | None) -> tuple[Tensor, int]:
    """The start vector without ``init`` and the gradient passes it took (none when ``gradient`` is given)."""
    u = torch.randn(objective.num_params, generator=gen, dtype=torch.float64)
    u = (u / u.norm()).to(device=objective.w0.device, dtype=objective.w0.dtype)
    if start == "random":
        return u, 0
    g, n_grad = (objective.gradient(), 1) if gradient is None else (gradient.to(u), 0)
    norm = g.norm()
    if norm > 0 and torch.isfinite(norm):  # a zero gradient (an exact critical point) leaves u alone
        return g / norm + u, n_grad
    return u, n_grad


def _start_vector(init: Tensor, dim: int, like: Tensor) -> Tensor:
    if not isinstance(init, Tensor):
        raise TypeError(f"init must be a tensor of shape ({dim},) or (j, {dim}), got {type(init).__name__}.")
    block = init.detach().reshape(-1, init.shape[-1]) if init.dim() in (1, 2) else None
    if block is None or block.shape[1] != dim:
        raise ValueError(f"init must have shape ({dim},) or (j, {dim}), got {tuple(init.shape)}.")
    start = block.to(torch.float64).cpu().sum(0)
    if not torch.isfinite(start).all() or start.norm() == 0:
        raise ValueError("init must be finite and not sum to the zero vector.")
    return start.to(device=like.device, dtype=like.dtype)
