"""Lanczos iteration with partial reorthogonalization for the top eigenpairs of a symmetric operator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..validation import check_float, check_generator, check_int
from ._rows import Rows
from .operator import CurvatureOperator


@dataclass(frozen=True)
class LanczosResult:
    """``values`` (k,) descending, ``vectors`` (k, P) unit-norm Ritz vectors, ``n_products`` made.

    ``coefficients`` ``(m, k)`` (float64): the Ritz vectors in the Lanczos basis, i.e. in the
    ``m`` vectors the operator was applied to, in order: ``vectors[j] = Σ_i coefficients[i, j] q_i``.
    """

    values: Tensor
    vectors: Tensor
    n_products: int
    converged: bool
    coefficients: Tensor


def lanczos(
    operator: CurvatureOperator,
    start: Tensor,
    *,
    k: int = 1,
    tol: float = 1e-4,
    max_iter: int = 100,
    generator: torch.Generator | int | None = None,
) -> LanczosResult:
    r"""The ``k`` algebraically largest eigenpairs of the symmetric ``operator``, from ``start``.

    Convergence criterion, checked after every iteration ``m > k``: for each of the top ``k``
    Ritz values ``θ_i``, (a) its relative change since iteration ``m - 1`` is at most ``tol``,
    ``|θ_i^(m) − θ_i^(m−1)| ≤ tol·|θ_i^(m)|``, and (b) its residual bound
    ``‖A y_i − θ_i y_i‖ = β_m |s_{m,i}| ≤ sqrt(tol)·max_j |θ_j|``. (b) guards against stagnating
    iterations passing (a); because the eigenvalue error of a Ritz value is at most
    ``residual² / gap``, it bounds the relative error by about ``tol·θ_1 / gap``.
    The Krylov space is exhausted (exact answer) once ``m = P``. On a breakdown (``β ≈ 0``,
    an invariant subspace) the iteration continues from a fresh random vector (from
    ``generator``) orthogonal to the basis, so a start vector deficient in the top eigenvector
    cannot go unnoticed.

    Orthogonality: partial reorthogonalization (Simon 1984). Each iteration subtracts only the
    three-term recurrence and carries Simon's estimate ``ω`` of the basis' loss of
    orthogonality, seeded with the rounding of one step, ``η‖A‖`` with ``η = ε·sqrt(P)/2``
    (PROPACK's rule; ``ε`` of the dtype of ``start``). When ``max|ω|`` exceeds ``sqrt(η)``, that
    residual and the next are orthogonalized against the whole basis. The basis stays
    orthogonal to about ``sqrt(η)``, which keeps the tridiagonal matrix the projection of ``A``
    to the rounding level: no spurious copies of converged Ritz values. Cost: one product with
    ``operator`` per iteration, ``O(P)`` work, and an ``m × P`` projection only at the
    reorthogonalized iterations. Memory: the basis, up to ``max_iter`` vectors (the rows of one
    matrix whose capacity doubles as needed).
    """
    return _lanczos_run(operator, start, k=k, tol=tol, max_iter=max_iter, generator=generator)[0]


def _lanczos_run(
    operator: CurvatureOperator, start: Tensor, *, k: int, tol: float, max_iter: int,
    generator: torch.Generator | int | None,
) -> tuple[LanczosResult, _Krylov]:  # fmt: skip
    """:func:`lanczos`, and its basis and reorthogonalization count (for the tests)."""
    k, max_iter = check_int("k", k), check_int("max_iter", max_iter)
    tol = check_float("tol", tol, inclusive=False)
    dim = start.numel()
    max_iter = min(max_iter, dim)
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is smaller than k={k}; allow at least k iterations.")
    gen = check_generator(generator)
    run = _Krylov(start, max_iter)
    q, norm = start, start.norm()
    previous: Tensor | None = None
    converged = False
    for m in range(1, max_iter + 1):
        w, beta = run.residual(operator @ run.basis.append(q, norm))
        theta, last = _ritz_values(run.alphas, run.betas, k)
        scale = theta.abs().max().item()
        if m == dim or (m > k and previous is not None and _has_converged(theta[:k], previous, last, beta, tol, scale)):
            converged = True
            break
        previous = theta[:k] if m >= k else None
        if m < max_iter:
            q, norm = run.next_vector(w, beta, scale, gen)
    theta, s = _tridiagonal_eigen(run.alphas, run.betas)
    values = theta[:k].to(device=start.device, dtype=start.dtype)
    vectors, coefficients = _ritz_vectors(s[:, :k], run.basis.view())
    return LanczosResult(values, vectors, len(run.basis), converged, coefficients), run


class _Krylov:
    """One run's Lanczos basis, tridiagonal matrix and estimated loss of orthogonality.

    ``omega[i]`` estimates ``q_jᵀ q_i`` for the newest basis vector ``q_j`` (``omega[j] = 1``),
    ``previous`` the same for ``q_{j−1}``; :func:`_next_omega` carries them one step on.
    """

    def __init__(self, start: Tensor, limit: int, full: bool = False) -> None:
        eps = torch.finfo(start.dtype).eps
        self.full = full  # orthogonalize every residual against the whole basis
        self.basis = Rows(start, limit)
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[i] couples q_i and q_{i+1}; 0 after a restart
        # Rounding of one step relative to ‖A‖: PROPACK's rule of thumb. Pessimistic for some
        # operators, but a float32 Hessian product of a trained MLP rounded by that much, and a
        # smaller seed let its basis collapse. Simon's bound sqrt(ε) is the square root of the
        # rounding level: the loss of orthogonality up to which T stays accurate to that level.
        self.unit = eps * math.sqrt(start.numel()) / 2
        self.threshold = math.sqrt(self.unit)
        self.omega = torch.ones(1, dtype=torch.float64)
        self.previous = torch.zeros(0, dtype=torch.float64)
        self.norm = 0.0  # running estimate of ‖A‖ (the largest Gershgorin bound of T's rows)
        self.dropped = 0.0  # largest residual discarded at a restart: an error the recurrence does not see
        self.force = False  # reorthogonalize the next residual too
        self.n_reorth = 0  # residuals orthogonalized against the whole basis

    def residual(self, product: Tensor) -> tuple[Tensor, float]:
        """``α_j`` from ``product = A q_j``; the residual ``w`` (semi-orthogonal to the basis) and ``β = ‖w‖``."""
        j = len(self.alphas)
        q = self.basis[j]
        alpha = torch.dot(q, product).item()
        w = torch.add(product, q, alpha=-alpha)  # a new tensor: the operator's output may alias its input
        last = self.betas[-1] if j else 0.0
        if j:
            w.sub_(self.basis[j - 1], alpha=last)
        self.alphas.append(alpha)
        beta = w.norm().item()
        self.norm = max(self.norm, abs(alpha) + beta + last)
        rounding = self.unit * self.norm + self.dropped
        omega = _next_omega(self.omega, self.previous, self.alphas, self.betas, beta, rounding)
        if self.full or self.force or not omega[:-1].abs().max().item() <= self.threshold:  # NaN too
            # Simon: orthogonalize this residual and the next, or q_j's lost orthogonality
            # passes into q_{j+2} through the recurrence.
            w = _orthogonalize(w, self.basis.view())
            beta = w.norm().item()
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
    # Classical Gram-Schmidt with the DGKS criterion (Daniel, Gragg, Kaufman & Stewart 1976):
    # a second pass only when the first removed most of w, i.e. when cancellation may have
    # left w's projection on the basis far above working precision.
    before = w.norm()
    w = w - basis.T @ (basis @ w)
    if w.norm() < before / math.sqrt(2):
        w = w - basis.T @ (basis @ w)
    return w


def _ritz_values(alphas: list[float], betas: list[float], k: int) -> tuple[Tensor, Tensor]:
    """The Ritz values (descending, float64) and the last components of the top ``k`` eigenvectors of ``T``.

    By LAPACK's tridiagonal solver: a dense ``eigh`` of ``T`` costs ``O(m³)`` and many threaded
    BLAS calls (measured 40 ms at ``m = 100`` on two busy cores, 3 ms for this), every iteration.
    """
    from scipy.linalg import eigh_tridiagonal

    values, vectors = eigh_tridiagonal(np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64))
    return torch.from_numpy(values[::-1].copy()), torch.from_numpy(vectors[-1, ::-1][:k].copy())


def _tridiagonal_eigen(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the Lanczos tridiagonal matrix, in float64."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(t)
    return evals.flip(0), evecs.flip(1)


def _has_converged(top: Tensor, previous: Tensor, last: Tensor, beta: float, tol: float, scale: float) -> bool:
    """Criteria (a) and (b) of :func:`lanczos` for the top ``k`` Ritz values (``last``: ``s_{m,i}``)."""
    change_ok = bool(((top - previous).abs() <= tol * top.abs()).all())
    residual = beta * last.abs()
    return change_ok and bool((residual <= math.sqrt(tol) * max(scale, 1e-300)).all())


def _ritz_vectors(s: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Unit Ritz vectors ``(k, P)``, and their coefficients ``(m, k)`` scaled to match.

    The basis is orthogonal only to about ``sqrt(ε)``, so ``‖Q s‖`` differs from 1 by as much:
    the coefficients are divided by it too, so that Rayleigh quotients ``cᵀ (Qᵀ A Q) c`` made
    from them (the per-mini-batch ones of the standard errors) are those of the unit vectors.
    """
    ritz = s.to(basis.dtype).T.to(basis.device) @ basis
    norms = ritz.norm(dim=1, keepdim=True)
    return ritz / norms, s / norms.T.to(device="cpu", dtype=torch.float64)
