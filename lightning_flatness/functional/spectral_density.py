r"""The Hessian's eigenvalue density by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019).

The spectral density of a symmetric ``P x P`` operator ``A`` with eigenvalues ``λ_i`` is the
measure ``φ(t) = (1/P) Σ_i δ(t − λ_i)``. For a random unit probe ``v`` (Rademacher ``z/√P`` or
a normalized Gaussian), ``E[vᵀ f(A) v] = (1/P) tr f(A) = ∫ f dφ``: the probe's own spectral
measure ``Σ_i (vᵀu_i)² δ(t − λ_i)`` is an unbiased draw of ``φ``. ``m`` Lanczos steps from ``v``
give its ``m``-node Gauss quadrature: nodes ``θ_j`` (the Ritz values) and weights ``τ_j`` (the
squared first components of the eigenvectors of the tridiagonal ``T``, summing to 1), with
``vᵀ f(A) v = Σ_j τ_j f(θ_j)`` exactly for polynomials of degree ``≤ 2m − 1``. Averaging ``S``
probes, ``φ ≈ (1/S) Σ_l Σ_j τ_j^(l) δ(t − θ_j^(l))`` (``P τ_j`` is then a number of eigenvalues).

Error (Ubaru, Chen & Saad 2017): for ``f`` analytic on an ellipse around the spectrum the
quadrature error of one probe decays geometrically in ``m``; what remains is the probe
variance, ``O(1/√S)``, which :meth:`SpectralDensityResult.moments` reports as the standard error
across probes. With Rademacher probes the variance of ``vᵀ A^k v`` is ``2 Σ_{i≠j} (A^k)_{ij}² / P²``.

Cost: ``num_probes × lanczos_steps`` operator products (Hessian-vector products), plus full
reorthogonalization, ``O(m² P)`` per probe; memory ``m`` flat vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..validation import check_bool, check_cache_chunks, check_choice, check_float, check_generator, check_int
from ._graph_cache import CacheChunks
from ._losses import LossArg
from ._restore import measurement_mode
from ._stats import mean_and_se
from .hutchinson import combined_error, observed, rademacher, sample_error
from .lanczos import _tridiagonal_eigen, lanczos_tridiagonal
from .objective import Objective
from .operator import CurvatureOperator

PROBES = ("rademacher", "gaussian")


@dataclass(frozen=True)
class SpectralDensityResult:
    """The Gauss quadrature of every probe's spectral measure.

    Attributes:
        nodes: ``(S, m)`` Ritz values per probe, ascending (float64, CPU). A probe whose Krylov
            space was exhausted in fewer steps is padded with its largest node at weight 0.
        weights: ``(S, m)`` their weights ``τ``; every row sums to 1 (``P τ``: eigenvalue counts).
        num_params: ``P``, the dimension of the operator.
        n_products: operator products made (``≤ num_probes × lanczos_steps``).
        trace_sample_se: the data's part of :meth:`trace`'s error, for a Hessian over several
            mini-batches (from each chunk's share of every probe's first product; NaN otherwise).
    """

    nodes: Tensor
    weights: Tensor
    num_params: int
    n_products: int
    trace_sample_se: float = math.nan

    def moments(self, order: int) -> tuple[Tensor, Tensor]:
        r"""Estimates of ``(1/P) tr A^k`` for ``k = 1..order`` and their standard errors, each ``(order,)``.

        Per probe ``Σ_j τ_j θ_j^k`` (exactly ``vᵀ A^k v`` while ``k ≤ 2m − 1``), averaged over
        probes; the error is the sample standard deviation over ``√S`` (NaN for one probe).
        """
        order = check_int("order", order)
        powers = self.nodes.unsqueeze(-1) ** torch.arange(1, order + 1, dtype=torch.float64)
        per_probe = (self.weights.unsqueeze(-1) * powers).sum(1)  # (S, order)
        return mean_and_se(per_probe)

    def trace(self) -> tuple[float, float]:
        """``tr A = P · (1/P) tr A`` (Hutchinson's estimate for Rademacher probes) and its standard error: the
        probes' (as :meth:`moments`) and, where known, the data's (``trace_sample_se``) in quadrature."""
        value, se = self.moments(1)
        return self.num_params * value.item(), combined_error(self.num_params * se.item(), self.trace_sample_se)

    def negative_mass(self, threshold: float = 0.0, sigma: float = 0.0) -> tuple[float, float]:
        r"""The fraction of the spectrum below ``−c = −threshold · max|θ|`` and its standard error across probes.

        ``threshold`` is relative to the largest Ritz value in magnitude (about ``max |λ|``).
        Networks' Hessians carry a large atom of (near-)zero eigenvalues (softmax invariance,
        dead units) inside a bulk of small ones, and a few Lanczos steps place one node in it
        at a small value of either sign, carrying the atom's whole weight: with
        ``threshold = 0`` the mass can jump by that weight between probes and measurements.
        ``sigma = 0``: the weight of the nodes below ``−c``; ``σ > 0``: the mass of the smoothed
        density :meth:`density` below ``−c``, ``Σ_j τ_j Φ((−c − θ_j)/σ)``.
        """
        cut = -check_float("threshold", threshold) * self.nodes.abs().max().item()
        sigma = check_float("sigma", sigma)
        if sigma == 0:
            below = (self.nodes < cut).double()
        else:
            below = 0.5 * torch.erfc((self.nodes - cut) / (sigma * math.sqrt(2)))
        value, se = mean_and_se((self.weights * below).sum(1))
        return value.item(), se.item()

    def default_sigma(self) -> float:
        """The smoothing width used when none is given: 1% of the range of the nodes (1e-8 if a point)."""
        span = (self.nodes.max() - self.nodes.min()).item()
        return 0.01 * span if span > 0 else 1e-8

    def grid(self, num: int = 1000, sigma: float | None = None) -> Tensor:
        """``num`` points from 5σ below the smallest node to 5σ above the largest (float64)."""
        sigma = self.default_sigma() if sigma is None else check_float("sigma", sigma, inclusive=False)
        low, high = self.nodes.min().item() - 5 * sigma, self.nodes.max().item() + 5 * sigma
        return torch.linspace(low, high, check_int("num", num, 2), dtype=torch.float64)

    def density(self, grid: Tensor | int = 1000, sigma: float | None = None) -> tuple[Tensor, Tensor]:
        r"""The Gaussian-smoothed density ``φ_σ(t) = (1/S) Σ_l Σ_j τ_j N(t; θ_j, σ²)`` on ``grid``.

        A mixture of unit total weight: it integrates to 1 over the real line (and over the
        default grid, ±5σ beyond the extreme nodes, to within 1e-6). ``grid``: points, or their
        number for :meth:`grid`. Returns ``(grid, density)``, float64.
        """
        sigma = self.default_sigma() if sigma is None else check_float("sigma", sigma, inclusive=False)
        t = self.grid(grid, sigma) if isinstance(grid, int) else torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        z = (t.reshape(-1, 1, 1) - self.nodes) / sigma
        mix = (self.weights * torch.exp(-0.5 * z * z)).sum((1, 2)) / self.nodes.shape[0]
        return t, mix / (sigma * math.sqrt(2 * math.pi))

    def histogram(self, bins: int = 50) -> tuple[Tensor, Tensor]:
        """``(counts, edges)``: the estimated number of eigenvalues (``P × mass``) in each of
        ``bins`` equal bins spanning the nodes; ``edges`` has ``bins + 1`` entries."""
        bins = check_int("bins", bins)
        low, high = self.nodes.min().item(), self.nodes.max().item()
        if high <= low:
            low, high = low - 0.5, high + 0.5
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
        index = torch.bucketize(self.nodes.reshape(-1), edges[1:-1], right=True)
        counts = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, self.weights.reshape(-1))
        return counts * self.num_params / self.nodes.shape[0], edges


def spectral_density(
    operator: CurvatureOperator,
    *,
    num_probes: int = 8,
    lanczos_steps: int = 32,
    probes: str = "rademacher",
    generator: torch.Generator | int | None = None,
    full_reorthogonalization: bool = True,
) -> SpectralDensityResult:
    r"""Stochastic Lanczos quadrature of the spectral density of any symmetric ``operator``.

    ``num_probes`` unit probes (``probes``: ``"rademacher"``, ``z/√P`` with ``z ∈ {±1}^P``, or
    ``"gaussian"``, normalized), drawn from ``generator``; ``lanczos_steps`` Lanczos steps from
    each (:func:`~lightning_flatness.functional.lanczos.lanczos_tridiagonal`), whose tridiagonal
    matrix gives the nodes and weights. Cost: ``num_probes × min(lanczos_steps, P)`` products.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import DenseOperator, spectral_density
        >>> a = DenseOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> res = spectral_density(a, num_probes=4, lanczos_steps=10, generator=0)
        >>> round(res.moments(2)[0][1].item(), 6), res.n_products  # (1/P) tr A² = 38.5: exact for diagonal A
        (38.5, 40)
    """
    num_probes, lanczos_steps = check_int("num_probes", num_probes), check_int("lanczos_steps", lanczos_steps)
    probes = check_choice("probes", probes, PROBES)
    full = check_bool("full_reorthogonalization", full_reorthogonalization)
    gen = check_generator(generator)
    like = torch.empty(0, dtype=operator.dtype, device=operator.device)
    start = operator.n_products
    rules, first = [], []  # per probe: its quadrature, and each chunk's share of its first product v·H_c v
    with observed(operator) as forms:
        for _ in range(num_probes):
            probe = _probe(probes, operator.num_params, gen, like)
            rules.append(_gauss_rule(*lanczos_tridiagonal(operator, probe, lanczos_steps, full_reorthogonalization=full)))
            if forms is not None:
                first.append(forms.take()[:1])
    width = max(nodes.numel() for nodes, _ in rules)
    nodes = torch.stack([torch.cat([n, n[-1:].expand(width - n.numel())]) for n, _ in rules])
    weights = torch.stack([torch.cat([w, w.new_zeros(width - w.numel())]) for _, w in rules])
    sample_se = math.nan
    if forms is not None:  # a unit probe's vᵀHv is (1/P) tr: the chunks' shares, scaled by P
        sample_se = sample_error(torch.cat(first), forms.sizes, operator.objective.reduce_sum, operator.num_params)
    return SpectralDensityResult(nodes, weights, operator.num_params, operator.n_products - start, sample_se)


def _probe(kind: str, dim: int, gen: torch.Generator, like: Tensor) -> Tensor:
    """One unit probe, drawn on the CPU (the same on every device and process)."""
    if kind == "rademacher":
        return rademacher(1, dim, gen, like)[0] / math.sqrt(dim)
    z = torch.randn(dim, generator=gen, dtype=torch.float64)
    return (z / z.norm()).to(like)


def _gauss_rule(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes (ascending) and weights of the Gauss quadrature of the tridiagonal ``(α, β)``."""
    values, vectors = _tridiagonal_eigen(alphas.tolist(), betas.tolist())
    weights = vectors[0].flip(0) ** 2
    return values.flip(0), weights / weights.sum()  # the sum is 1 up to rounding


def hessian_spectral_density(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    num_probes: int = 8,
    lanczos_steps: int = 32,
    probes: str = "rademacher",
    generator: torch.Generator | int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    cache_chunks: CacheChunks = "auto",
) -> SpectralDensityResult:
    r""":func:`spectral_density` of the loss Hessian ``∇²L(w)`` over ``batches`` (Ghorbani et al. 2019).

    Cost: ``num_probes × lanczos_steps`` Hessian-vector products (each one forward and two
    backward passes per mini-batch, or one second backward pass on the mini-batches whose
    graphs are kept: ``cache_chunks``, as in :func:`hessian_eigenvalues`), and ``lanczos_steps`` flat vectors.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import hessian_spectral_density
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> res = hessian_spectral_density(model, batches, num_probes=2, lanczos_steps=5, generator=0)
        >>> res.nodes.shape, res.n_products
        (torch.Size([2, 5]), 10)
    """
    num_probes, lanczos_steps = check_int("num_probes", num_probes), check_int("lanczos_steps", lanczos_steps)
    probes = check_choice("probes", probes, PROBES)
    cache_chunks = check_cache_chunks(cache_chunks)
    gen = check_generator(generator)
    with measurement_mode(model):
        operator = Objective(model, batches, loss_fn, params, dtype).hessian_operator(cache_chunks)
        return spectral_density(
            operator, num_probes=num_probes, lanczos_steps=lanczos_steps, probes=probes, generator=gen
        )
