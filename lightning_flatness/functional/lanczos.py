"""Lanczos iteration with full reorthogonalization for the top eigenpairs of a symmetric operator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..validation import check_float, check_generator, check_int
from .operator import CurvatureOperator


@dataclass(frozen=True)
class LanczosResult:
    """``values`` (k,) descending, ``vectors`` (k, P) unit-norm Ritz vectors, ``n_products`` made.

    ``coefficients`` ``(m, k)`` (float64): the Ritz vectors in the Lanczos basis, i.e. in the
    ``m`` vectors the operator was applied to, in order: ``vectors[j] ∝ Σ_i coefficients[i, j] q_i``.
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
    cannot go unnoticed. One product with ``operator`` per iteration; memory: the basis, up to
    ``max_iter`` vectors.
    """
    k, max_iter = check_int("k", k), check_int("max_iter", max_iter)
    tol = check_float("tol", tol, inclusive=False)
    dim = start.numel()
    max_iter = min(max_iter, dim)
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is smaller than k={k}; allow at least k iterations.")
    gen = check_generator(generator)
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    q = start / start.norm()
    previous: Tensor | None = None
    converged = False
    for m in range(1, max_iter + 1):
        basis.append(q)
        w = operator @ q
        alphas.append(torch.dot(q, w).item())
        w = _orthogonalize(w, basis)
        beta = w.norm().item()
        theta, s = _tridiagonal_eigen(alphas, betas)
        scale = theta.abs().max().item()
        if m == dim or (m > k and previous is not None and _has_converged(theta[:k], previous, s, beta, tol, scale)):
            converged = True
            break
        previous = theta[:k] if m >= k else None
        q, beta = _next_vector(w, beta, scale, basis, gen)
        betas.append(beta)
    values = theta[:k].to(device=start.device, dtype=start.dtype)
    return LanczosResult(values, _ritz_vectors(s, k, basis), len(basis), converged, s[:, :k].clone())


def _orthogonalize(w: Tensor, basis: list[Tensor]) -> Tensor:
    # Classical Gram-Schmidt applied twice ("twice is enough", Giraud et al. 2005) keeps the
    # Lanczos basis orthogonal to working precision, so no spurious copies of Ritz values appear.
    if basis:
        q = torch.stack(basis)
        for _ in range(2):
            w = w - q.T @ (q @ w)
    return w


def _tridiagonal_eigen(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the Lanczos tridiagonal matrix, in float64."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(t)
    return evals.flip(0), evecs.flip(1)


def _has_converged(top: Tensor, previous: Tensor, s: Tensor, beta: float, tol: float, scale: float) -> bool:
    """Criteria (a) and (b) of :func:`lanczos` for the top ``k`` Ritz values."""
    change_ok = bool(((top - previous).abs() <= tol * top.abs()).all())
    residual = beta * s[-1, : top.numel()].abs()
    return change_ok and bool((residual <= math.sqrt(tol) * max(scale, 1e-300)).all())


def _next_vector(w: Tensor, beta: float, scale: float, basis: list[Tensor], gen: torch.Generator) -> tuple[Tensor, float]:
    """The next basis vector and the β entered in the tridiagonal matrix (0 after a restart)."""
    if beta > 1e-10 * max(scale, 1e-300):
        return w / beta, beta
    # Invariant subspace found: restart in its orthogonal complement.
    like = basis[0]
    w = _orthogonalize(torch.randn(like.numel(), generator=gen, dtype=like.dtype).to(like.device), basis)
    return w / w.norm(), 0.0


def _ritz_vectors(s: Tensor, k: int, basis: list[Tensor]) -> Tensor:
    q_mat = torch.stack(basis)
    ritz = s[:, :k].to(q_mat.dtype).T.to(q_mat.device) @ q_mat
    return ritz / ritz.norm(dim=1, keepdim=True)
