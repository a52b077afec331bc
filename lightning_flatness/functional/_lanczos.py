"""Lanczos iteration with full reorthogonalization for the top eigenpairs of a symmetric operator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class LanczosOutput:
    values: Tensor  # (k,) descending
    vectors: Tensor  # (k, P) unit norm
    num_matvecs: int
    converged: bool


def _orthogonalize(w: Tensor, basis: list[Tensor]) -> Tensor:
    # Classical Gram-Schmidt applied twice ("twice is enough", Giraud et al. 2005) keeps the
    # Lanczos basis orthogonal to working precision, so no spurious copies of Ritz values appear.
    if basis:
        q = torch.stack(basis)
        for _ in range(2):
            w = w - q.T @ (q @ w)
    return w


def lanczos_top(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    k: int,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
) -> LanczosOutput:
    """The ``k`` algebraically largest eigenpairs of the symmetric operator ``matvec``.

    Convergence criterion, checked after every iteration ``m > k``: for each of the top ``k``
    Ritz values ``θ_i``, (a) its relative change since iteration ``m - 1`` is at most ``tol``,
    ``|θ_i^(m) − θ_i^(m−1)| ≤ tol·|θ_i^(m)|``, and (b) its residual bound
    ``‖A y_i − θ_i y_i‖ = β_m |s_{m,i}| ≤ sqrt(tol)·max_j |θ_j|``. (b) guards against stagnating
    iterations passing (a); because the eigenvalue error of a Ritz value is at most
    ``residual² / gap``, it bounds the relative error by about ``tol·θ_1 / gap``.
    The Krylov space is exhausted (exact answer) once ``m = P``. On a breakdown (``β ≈ 0``,
    an invariant subspace) the iteration continues from a fresh random vector orthogonal to
    the basis, so a start vector deficient in the top eigenvector cannot go unnoticed.
    """
    dim = start.numel()
    max_iter = min(max_iter, dim)
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is smaller than k={k}; allow at least k iterations.")
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    q = start / start.norm()
    previous: Tensor | None = None
    theta = s = None
    converged = False
    for m in range(1, max_iter + 1):
        basis.append(q)
        w = matvec(q)
        alpha = torch.dot(q, w).item()
        alphas.append(alpha)
        w = _orthogonalize(w, basis)
        beta = w.norm().item()
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta, s = evals.flip(0), evecs.flip(1)
        scale = theta.abs().max().item()
        if m == dim:
            converged = True
            break
        if m > k and previous is not None:
            top = theta[:k]
            change_ok = bool(((top - previous).abs() <= tol * top.abs()).all())
            residual = beta * s[-1, :k].abs()
            residual_ok = bool((residual <= math.sqrt(tol) * max(scale, 1e-300)).all())
            if change_ok and residual_ok:
                converged = True
                break
        previous = theta[:k] if m >= k else None
        if beta <= 1e-10 * max(scale, 1e-300):
            # Invariant subspace found: restart in its orthogonal complement.
            w = _orthogonalize(torch.randn(dim, generator=generator, dtype=start.dtype).to(start.device), basis)
            beta = 0.0
            q = w / w.norm()
        else:
            q = w / beta
        betas.append(beta)
    q_mat = torch.stack(basis)
    ritz = s[:, :k].to(q_mat.dtype).T.to(q_mat.device) @ q_mat
    ritz = ritz / ritz.norm(dim=1, keepdim=True)
    return LanczosOutput(theta[:k].to(device=start.device, dtype=start.dtype), ritz, len(basis), converged)
