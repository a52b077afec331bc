"""Lanczos iteration with partial reorthogonalization for the top eigenpairs of a symmetric operator."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..validation import check_bool, check_float, check_generator, check_int
from ._rows import Rows
from .operator import CurvatureOperator


# Orthogonalization against a basis orthonormal to sqrt(η) shortens a vector; one that lengthens it by more
# than this factor has met near-copies of basis vectors (their components subtracted several times).
COLLAPSE = 1.01

ErrorTarget = Callable[[Tensor], Tensor]
"""``target(coefficients) -> (k,)``: the absolute error each Ritz value may keep, given its vector's
coefficients ``(m, k)`` in every vector the operator has been applied to (as
:attr:`LanczosResult.coefficients`); NaN where there is none (the ``tol`` rule then applies)."""


@dataclass(frozen=True)
class LanczosResult:
    """``values`` (k,) descending, ``vectors`` (k, P) unit-norm Ritz vectors, ``n_products`` made.

    ``coefficients`` ``(m, k)`` (float64): the Ritz vectors in the vectors the operator was
    applied to, in order (every run's Lanczos basis, the checks' included): ``vectors[j] =
    Σ_i coefficients[i, j] q_i``. ``residuals`` ``(k,)`` (float64): ``‖A y_j − θ_j y_j‖`` of each
    pair, read off the tridiagonal matrix (for a pair found by a check, a bound on it): an
    eigenvalue of ``A`` lies within it of ``θ_j``.
    ``n_checks``: the runs in the complement of the converged vectors that :func:`lanczos`
    made after the first (``verify``).
    """

    values: Tensor
    vectors: Tensor
    n_products: int
    converged: bool
    coefficients: Tensor
    residuals: Tensor | None = None
    n_checks: int = 0


def lanczos(
    operator: CurvatureOperator,
    start: Tensor,
    *,
    k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 100,
    generator: torch.Generator | int | None = None,
    verify: bool = True,
    error_target: ErrorTarget | None = None,
) -> LanczosResult:
    r"""The ``k`` algebraically largest eigenpairs of the symmetric ``operator``, from ``start``.

    Convergence criterion, checked after every iteration ``m > k``: for each of the top ``k``
    Ritz values ``θ_i``, (a) its relative change since iteration ``m - 1`` is at most ``tol``,
    ``|θ_i^(m) − θ_i^(m−1)| ≤ tol·|θ_i^(m)|``, and (b) its residual
    ``r_i = ‖A y_i − θ_i y_i‖ = β_m |s_{m,i}| ≤ sqrt(tol)·|θ_i|``, scaled by ``θ_i``'s own size
    (floored at ``sqrt(ε)·‖A‖`` for a value near 0), never by the largest ``|θ_j|``, which on a
    strongly negative spectrum is the other end. The bound this keeps: an eigenvalue lies within
    ``r_i`` of ``θ_i`` and, by Kato–Temple, within ``r_i² / δ_i ≤ tol·θ_i² / δ_i`` where ``δ_i``
    is the distance from ``θ_i`` to the rest of the spectrum, i.e. a relative error of at most
    ``tol·|θ_i| / δ_i`` (``residuals`` returns each ``r_i``). The Krylov space is exhausted
    (exact answer) once ``m = P``. On a breakdown (``β ≈ 0``, an invariant subspace) the
    iteration continues from a fresh random vector (from ``generator``) orthogonal to the basis.

    ``error_target`` (e.g. a tenth of each value's sampling standard error, as
    :func:`~lightning_flatness.functional.hessian_eigenvalues`'s ``error_ratio`` makes it): a
    value has converged instead once its residual ``r_i`` and its change since the last iteration
    are both at most its target; where the target is NaN, criteria (a) and (b) apply. The
    residual, not ``r_i²/δ̂_i`` with the Ritz gap ``δ̂_i`` for ``δ_i``: a Ritz vector that mixes two
    close eigenvectors has a small ``r²/δ̂`` while its value sits between them (measured: 7.26
    for λ₁ = 8, λ₂ = 7.22). With ``r_i`` an eigenvalue lies within the target; the check
    (``verify``) finds one above it.

    ``verify`` (default): a Krylov space sees only what its start vector holds. It finds one
    vector of a repeated eigenvalue, and a start deficient in the top eigenvector (e.g. last
    epoch's eigenvector when the top two eigenvalues have traded places) converges to the
    eigenvalue below it with a small residual. So, once the first run converges, Lanczos runs
    again from a Gaussian vector in the orthogonal complement of the converged vectors (the
    operator deflated there, :class:`_Krylov`'s ``locked``), as a cold start would: an
    eigenvalue it finds above ``θ_k`` (beyond the error ``θ_k`` may keep: ``tol·|θ_k|``, or its
    target) was missed and takes its place, and it runs
    again until a run's top value is certified (the values above it are all held). A run whose
    top Ritz value has settled (moved by at most ``tol·|θ_k|``) with ``θ + r ≤ θ_k`` stops
    early. Such a check fails only when its own Gaussian start is deficient, with probability
    of the order of a cold start's (Kuczyński & Woźniakowski 1992). Cost: one more run, usually
    shorter than a cold start's (``n_checks``; counted in ``n_products``); ``verify=False``
    spares it and leaves multiplicities and deficient starts unchecked.

    Orthogonality: partial reorthogonalization (Simon 1984). Each iteration subtracts only the
    three-term recurrence and carries Simon's estimate ``ω`` of the basis' loss of
    orthogonality, seeded with the rounding of one step, ``η‖A‖`` with ``η = ε·sqrt(P)/2``
    (PROPACK's rule; ``ε`` of the dtype of ``start``). When ``max|ω|`` exceeds ``sqrt(η)``, that
    residual and the next are orthogonalized against the whole basis; where that finds the
    residual less orthogonal than ``ω`` said (products that round by more than ``η‖A‖``, e.g. a
    small float32 network's), the seed is raised by the ratio. The basis stays
    orthogonal to about ``sqrt(η)``, which keeps the tridiagonal matrix the projection of ``A``
    to the rounding level: no spurious copies of converged Ritz values. A basis that collapsed
    nonetheless (orthogonalizing lengthened a residual) stops its run, ``converged=False``. Cost: one product with
    ``operator`` per iteration, ``O(P)`` work, and an ``m × P`` projection only at the
    reorthogonalized iterations. Memory: the basis, up to ``max_iter`` vectors (the rows of one
    matrix whose capacity doubles as needed).
    """
    gen = check_generator(generator)
    found, run = _lanczos_run(operator, start, k=k, tol=tol, max_iter=max_iter, generator=gen, target=error_target)
    # An unconverged run is flagged as it is; one that exhausted the space is exact.
    if check_bool("verify", verify) and found.converged and found.n_products < start.numel():
        found = _verified(
            operator, found, k=k, tol=tol, max_iter=max_iter, generator=gen, norm=run.norm, target=error_target
        )
    return found


def _lanczos_run(
    operator: CurvatureOperator, start: Tensor, *, k: int, tol: float, max_iter: int,
    generator: torch.Generator | int | None, locked: Tensor | None = None, ceiling: tuple[float, float] | None = None,
    norm: float = 0.0, target: ErrorTarget | None = None, offset: int = 0,
) -> tuple[LanczosResult, _Krylov]:  # fmt: skip
    """One Lanczos run (:func:`lanczos` without ``verify``), and its basis and reorthogonalization count.

    ``locked`` ``(j, P)``: orthonormal rows whose span is deflated: the run stays in their
    orthogonal complement (start, products and restarts projected), where the operator's
    dimension is ``P − j``. ``ceiling`` ``(value, margin)``: also stop once the top Ritz value has
    settled to ``margin`` with ``θ_1 + r_1 ≤ value`` (:func:`_settled_below`): the complement holds
    nothing above it. ``target``: :func:`lanczos`'s ``error_target``; ``offset``: the products made
    before this run (its coefficients follow theirs).
    ``norm``: ``‖A‖`` as an earlier run on the same operator estimated it, the scale of the rounding
    and breakdown tests (a check's own estimate sees only the complement, which may be all but 0).
    """
    k, max_iter = check_int("k", k), check_int("max_iter", max_iter)
    tol = check_float("tol", tol, inclusive=False)
    dim = start.numel() - (0 if locked is None else locked.shape[0])
    max_iter = min(max_iter, dim)
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is smaller than k={k}; allow at least k iterations.")
    gen = check_generator(generator)
    run = _Krylov(start, max_iter, locked=locked, norm=norm)
    q = start if locked is None else _orthogonalize(start, locked)
    norm = q.norm()
    previous: Tensor | None = None
    converged = False
    beta = 0.0
    for m in range(1, max_iter + 1):
        w, beta = run.residual(operator @ run.basis.append(q, norm))
        theta, s = _ritz_pairs(run.alphas, run.betas, k)
        top, residual = theta[: min(k, m)], beta * s[-1].abs()
        if run.collapsed:
            break  # the values so far stand, flagged: nothing after this step would be the projection of A
        if m == dim:
            converged = True
            break
        if m > k and previous is not None:
            floor = math.sqrt(torch.finfo(start.dtype).eps) * run.norm
            limits = None if target is None else target(torch.cat([s.new_zeros(offset, s.shape[1]), s]))
            if _has_converged(top, previous, residual, tol, floor, limits):
                converged = True
                break
        if ceiling is not None and previous is not None and _settled_below(top, previous, residual, *ceiling):
            converged = True
            break
        previous = top if m >= k else (top[:1] if ceiling is not None else None)
        if m < max_iter:
            q, norm = run.next_vector(w, beta, max(abs(theta).max().item(), run.reference), gen)
    theta, s = _tridiagonal_eigen(run.alphas, run.betas)
    kept = min(k, len(run.alphas))
    values = theta[:kept].to(device=start.device, dtype=start.dtype)
    vectors, coefficients = _ritz_vectors(s[:, :kept], run.basis.view())
    residuals = beta * s[-1, :kept].abs()
    return LanczosResult(values, vectors, len(run.basis), converged, coefficients, residuals), run


def _verified(
    operator: CurvatureOperator, found: LanczosResult, *, k: int, tol: float, max_iter: int, generator: torch.Generator,
    norm: float, target: ErrorTarget | None,
) -> LanczosResult:  # fmt: skip
    """``found`` checked by runs in the orthogonal complement of its vectors (:func:`lanczos`'s ``verify``)."""
    dim = found.vectors.shape[1]
    for _ in range(k):
        room = dim - found.vectors.shape[0]  # the complement's dimension
        if room < 1:
            break  # nothing outside the held vectors
        kth = found.values[-1].item()
        margin = _margin(found, kth, tol, target)  # what a missed value must exceed θ_k by to matter
        bar = kth + margin
        start = torch.randn(dim, generator=generator, dtype=found.vectors.dtype).to(found.vectors.device)
        check = _lanczos_run(
            operator, start, k=min(k, room), tol=tol, max_iter=max_iter,
            # The check keeps the tol rule: a loose target would let it settle on the value below a missed one.
            generator=generator, locked=found.vectors, ceiling=(bar, tol * abs(kth)), norm=norm,
        )[0]  # fmt: skip
        top = check.values[0].item()
        if top <= bar:  # nothing above the k-th held value: every held value is certified
            return _counted(found, check)
        # Every value above `top` is held (the complement's largest is `top`): those and `top` are certified.
        certified = int((found.values >= top - margin).sum()) + 1
        found = _merged(found, check, k)
        if certified >= k:
            break
    return found


def _margin(found: LanczosResult, kth: float, tol: float, target: ErrorTarget | None) -> float:
    """The error the ``k``-th held value may keep: its target where one is known, else ``tol·|θ_k|``."""
    margin = float("nan") if target is None else target(found.coefficients)[-1].item()
    return margin if margin == margin else tol * abs(kth)


def _counted(found: LanczosResult, check: LanczosResult) -> LanczosResult:
    """``found`` with a check's products and convergence added (its coefficients cover the first products only)."""
    return replace(
        found, n_products=found.n_products + check.n_products, converged=found.converged and check.converged,
        n_checks=found.n_checks + 1,
    )  # fmt: skip


def _merged(found: LanczosResult, check: LanczosResult, k: int) -> LanczosResult:
    """The ``k`` largest pairs of both; coefficients over both runs' products (``found``'s first)."""
    m, n = found.coefficients.shape[0], check.coefficients.shape[0]
    coefficients = torch.cat([
        torch.cat([found.coefficients, found.coefficients.new_zeros(n, found.coefficients.shape[1])]),
        torch.cat([check.coefficients.new_zeros(m, check.coefficients.shape[1]), check.coefficients]),
    ], dim=1)  # fmt: skip
    values = torch.cat([found.values, check.values])
    order = torch.argsort(values, descending=True, stable=True)[:k]
    # A check's pair is one of the deflated operator: against A itself, its residual gains the part of A y
    # along the held vectors, Yᵀ A y = Rᵀ y (Yᵀ y = 0), at most the held pairs' residuals R together.
    residuals = torch.cat([found.residuals, torch.sqrt(check.residuals**2 + found.residuals.square().sum())])
    return LanczosResult(
        values[order], torch.cat([found.vectors, check.vectors])[order], found.n_products + check.n_products,
        found.converged and check.converged, coefficients[:, order.cpu()], residuals[order.cpu()],
        found.n_checks + 1,
    )  # fmt: skip


class _Krylov:
    """One run's Lanczos basis, tridiagonal matrix and estimated loss of orthogonality.

    ``omega[i]`` estimates ``q_jᵀ q_i`` for the newest basis vector ``q_j`` (``omega[j] = 1``),
    ``previous`` the same for ``q_{j−1}``; :func:`_next_omega` carries them one step on.
    """

    def __init__(
        self, start: Tensor, limit: int, full: bool = False, locked: Tensor | None = None, norm: float = 0.0
    ) -> None:
        eps = torch.finfo(start.dtype).eps
        self.full = full  # orthogonalize every residual against the whole basis
        self.locked = locked  # rows deflated from the operator (the run stays orthogonal to them)
        self.basis = Rows(start, limit)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[i] couples q_i and q_{i+1}; 0 after a restart
        # Rounding of one step relative to ‖A‖: PROPACK's rule of thumb. Pessimistic for some
        # operators, but a float32 Hessian product of a trained MLP rounded by that much, and a
        # smaller seed let its basis collapse. Simon's bound sqrt(ε) is the square root of the
        # rounding level: the loss of orthogonality up to which T stays accurate to that level.
        self.unit = eps * math.sqrt(start.numel()) / 2
        self.threshold = math.sqrt(self.unit)
        self.seed = self.unit  # ω's rounding per step relative to ‖A‖: the unit, raised where measured higher
        self.omega = torch.ones(1, dtype=torch.float64)
        self.previous = torch.zeros(0, dtype=torch.float64)
        self.reference = norm  # ‖A‖ from an earlier run on the same operator (a check's), else 0
        self.norm = norm  # running estimate of ‖A‖ (the largest Gershgorin bound of T's rows)
        self.dropped = 0.0  # largest residual discarded at a restart: an error the recurrence does not see
        self.force = False  # reorthogonalize the next residual too
        self.n_reorth = 0  # residuals orthogonalized against the whole basis
        # The basis lost its orthogonality unseen by ω (a product rounded by far more than the seed assumes):
        # T is no longer the projection of A, and the run stops unconverged (_lanczos_run).
        self.collapsed = False

    def residual(self, product: Tensor) -> tuple[Tensor, float]:
        """``α_j`` from ``product = A q_j``; the residual ``w`` (semi-orthogonal to the basis) and ``β = ‖w‖``."""
        j = len(self.alphas)
        q = self.basis[j]
        if self.locked is not None:  # (I − YᵀY) A on vectors orthogonal to Y: the deflated operator
            product = product - self.locked.T @ (self.locked @ product)
        alpha = torch.dot(q, product).item()
        w = torch.add(product, q, alpha=-alpha)  # a new tensor: the operator's output may alias its input
        last = self.betas[-1] if j else 0.0
        if j:
            w.sub_(self.basis[j - 1], alpha=last)
        if self.locked is not None:
            # The recurrence has A's eigenvalue 0 on span(Y) outside the complement's spectrum: rounding-level
            # components along Y would grow through it to O(1), unseen by ω (which watches the basis only).
            w = _orthogonalize(w, self.locked)
        self.alphas.append(alpha)
        beta = w.norm().item()
        self.norm = max(self.norm, abs(alpha) + beta + last)
        rounding = self.seed * self.norm + self.dropped
        omega = _next_omega(self.omega, self.previous, self.alphas, self.betas, beta, rounding)
        estimate = omega[:-1].abs().max().item()
        if self.full or self.force or not estimate <= self.threshold:  # NaN too
            # Simon: orthogonalize this residual and the next, or q_j's lost orthogonality
            # passes into q_{j+2} through the recurrence.
            w, overlap = _orthogonalized(w, self.basis.view())
            recurrence, beta = beta, w.norm().item()
            if not (self.full or self.force) and overlap > estimate:
                # ω underestimated the loss of orthogonality: the products round by more than the seed
                # assumes (a float32 Hessian product of a trained network: up to 1000 ε‖H‖). Seed it with
                # what was measured, or its later estimates lag until the basis holds near-copies.
                self.seed = min(self.seed * overlap / estimate, self.threshold)
            if not beta <= COLLAPSE * recurrence:  # projecting out an orthonormal basis never lengthens w
                self.collapsed = True
                return w, recurrence  # ‖A y − θ y‖ = ‖w‖·|s_m| holds for the recurrence's own residual
            omega = torch.full_like(omega, self.unit)
            omega[-1] = 1.0
            self.force = not self.force
            self.n_reorth += 1
        self.previous, self.omega = self.omega, omega
        return w, beta

    def next_vector(self, w: Tensor, beta: float, scale: float, gen: torch.Generator) -> tuple[Tensor, float | Tensor]:
        """The next basis vector, unnormalized, and its norm; its ``β`` enters T (0 after a restart)."""
        if beta > 1e-10 * max(scale, 1e-300):
            self.betas.append(beta)
            return w, beta
        # Invariant subspace found: restart in its orthogonal complement.
        like = self.basis[0]
        r = torch.randn(like.numel(), generator=gen, dtype=like.dtype).to(like.device)
        r = _orthogonalize(r, self.basis.view())
        if self.locked is not None:
            r = _orthogonalize(r, self.locked)
        self.betas.append(0.0)
        self.dropped = max(self.dropped, beta)
        self.omega[:-1] = self.unit  # orthogonalized against everything
        return r, r.norm()


def lanczos_tridiagonal(
    operator: CurvatureOperator, start: Tensor, steps: int, *, full_reorthogonalization: bool = True
) -> tuple[Tensor, Tensor]:
    r"""The Lanczos tridiagonal matrix ``T`` of ``operator`` from ``start``: its diagonal ``α`` and off-diagonal ``β``.

    ``steps`` iterations of the same recurrence as :func:`lanczos` (``T = Qᵀ A Q`` for the
    orthonormal Krylov basis ``Q`` of ``start``), without a convergence check: exactly
    ``min(steps, P)`` products, fewer only on a breakdown (``β ≈ 0``: the Krylov space of
    ``start`` is invariant, and ``T`` then already holds all of ``start``'s spectral measure).
    The eigenvalues ``θ_j`` of ``T`` and the squared first components ``τ_j = s_{1j}²`` of its
    unit eigenvectors are the ``m``-node Gauss quadrature of the measure of ``start / ‖start‖``:
    ``uᵀ f(A) u ≈ Σ_j τ_j f(θ_j)``, exact for polynomials of degree up to ``2m − 1`` (Golub &
    Meurant 2010). ``full_reorthogonalization`` (default) orthogonalizes every residual against
    the whole basis (``O(mP)`` per step), so the quadrature holds to rounding; ``False`` uses
    :func:`lanczos`'s partial reorthogonalization. Returns float64 CPU tensors ``α`` ``(m,)`` and
    ``β`` ``(m − 1,)``.
    """
    steps = min(check_int("steps", steps), start.numel())
    run = _Krylov(start, steps, full=full_reorthogonalization)
    q, norm = start, start.norm()
    for m in range(1, steps + 1):
        w, beta = run.residual(operator @ run.basis.append(q, norm))
        if m == steps or not beta > 1e-10 * max(run.norm, 1e-300):  # done, or an invariant subspace
            break
        run.betas.append(beta)
        q, norm = w, beta
    return torch.tensor(run.alphas, dtype=torch.float64), torch.tensor(run.betas, dtype=torch.float64)


def _next_omega(
    omega: Tensor, previous: Tensor, alphas: list[float], betas: list[float], beta: float, rounding: float
) -> Tensor:
    r"""Simon's recurrence: estimates of ``q_{j+1}ᵀ q_i``, ``i ≤ j+1``, for ``β q_{j+1} = w``.

    From ``A q_i = β_{i−1} q_{i−1} + α_i q_i + β_i q_{i+1} + f_i`` and the symmetry of ``A``:
    ``β_j ω_{j+1,i} = β_i ω_{j,i+1} + (α_i − α_j) ω_{j,i} + β_{i−1} ω_{j,i−1} − β_{j−1} ω_{j−1,i}
    + (q_jᵀ f_i − q_iᵀ f_j)``; the rounding term is bounded by ``rounding`` with the sign that
    makes the estimate grow. ``ω_{j+1,j}`` and ``ω_{j+1,j−1}`` (the recurrence's own
    orthogonalization) are at the rounding level.
    """
    j = omega.numel() - 1
    beta = max(beta, torch.finfo(torch.float64).tiny)  # an exact breakdown: the estimate is huge, not NaN
    local = torch.full((min(j + 1, 2),), rounding / beta, dtype=torch.float64)
    if j < 2:
        return torch.cat([local, torch.ones(1, dtype=torch.float64)])
    a = torch.tensor(alphas, dtype=torch.float64)
    b = torch.tensor(betas, dtype=torch.float64)
    t = b[: j - 1] * omega[1:j] + (a[: j - 1] - a[j]) * omega[: j - 1] - b[j - 1] * previous[: j - 1]
    t[1:] += b[: j - 2] * omega[: j - 2]
    t = (t + torch.where(t >= 0, rounding, -rounding)) / beta
    return torch.cat([t, local, torch.ones(1, dtype=torch.float64)])


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    return _orthogonalized(w, basis)[0]


def _orthogonalized(w: Tensor, basis: Tensor) -> tuple[Tensor, float]:
    """``w`` orthogonalized against the rows of ``basis``, and its largest cosine with them before."""
    # Classical Gram-Schmidt with the DGKS criterion (Daniel, Gragg, Kaufman & Stewart 1976):
    # a second pass only when the first removed most of w, i.e. when cancellation may have
    # left w's projection on the basis far above working precision.
    before = w.norm()
    coefficients = basis @ w
    w = w - basis.T @ coefficients
    if w.norm() < before / math.sqrt(2):
        w = w - basis.T @ (basis @ w)
    overlap = (coefficients.abs().max() / before).item() if coefficients.numel() and before > 0 else 0.0
    return w, overlap


def _ritz_pairs(alphas: list[float], betas: list[float], k: int) -> tuple[Tensor, Tensor]:
    """The Ritz values (descending, float64) and the top ``k`` eigenvectors of ``T`` (columns, ``(m, k)``).

    By LAPACK's tridiagonal solver: a dense ``eigh`` of ``T`` costs ``O(m³)`` and many threaded
    BLAS calls (measured 40 ms at ``m = 100`` on two busy cores, 3 ms for this), every iteration.
    """
    from scipy.linalg import eigh_tridiagonal

    values, vectors = eigh_tridiagonal(np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64))
    return torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[:, ::-1][:, :k].copy())


def _tridiagonal_eigen(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the Lanczos tridiagonal matrix, in float64."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(t)
    return evals.flip(0), evecs.flip(1)


def _has_converged(
    top: Tensor, previous: Tensor, residual: Tensor, tol: float, floor: float, limits: Tensor | None
) -> bool:
    """Whether every one of the top ``k`` Ritz values ``top`` has converged.

    With a finite error target ``t_i`` (``limits``): its change since the last iteration and its residual
    ``r_i`` are at most ``t_i``. Otherwise criteria (a) and (b) of :func:`lanczos`, on its own scale
    ``max(|θ_i|, floor)``.
    """
    change = (top - previous).abs()
    residual = residual[: top.numel()]
    scale = top.abs().clamp(min=floor)
    ok = (change <= tol * scale) & (residual <= math.sqrt(tol) * scale)
    if limits is not None:
        limits = limits[: top.numel()].to(top)
        matched = (change <= limits) & (residual <= limits)
        ok = torch.where(torch.isfinite(limits), matched, ok)
    return bool(ok.all())


def _settled_below(top: Tensor, previous: Tensor, residual: Tensor, ceiling: float, margin: float) -> bool:
    """The top Ritz value lies, with its residual, at or below ``ceiling`` and has settled: it moved by at
    most ``margin`` (the error the value it is checked against may keep) since the previous iteration."""
    theta = top[0].item()
    return abs(theta - previous[0].item()) <= margin and theta + residual[0].item() <= ceiling


def _ritz_vectors(s: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Unit Ritz vectors ``(k, P)``, and their coefficients ``(m, k)`` scaled to match.

    The basis is orthogonal only to about ``sqrt(ε)``, so ``‖Q s‖`` differs from 1 by as much:
    the coefficients are divided by it too, so that Rayleigh quotients ``cᵀ (Qᵀ A Q) c`` made
    from them (the per-mini-batch ones of the standard errors) are those of the unit vectors.
    """
    ritz = s.to(basis.dtype).T.to(basis.device) @ basis
    norms = ritz.norm(dim=1, keepdim=True)
    return ritz / norms, s / norms.T.to(device="cpu", dtype=torch.float64)
