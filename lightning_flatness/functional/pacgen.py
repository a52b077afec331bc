"""PACGen: the PAC-Bayes flatness/generalization measure of Wang et al. (2018)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..validation import check_choice, check_float, check_generator, check_int
from ._losses import LossArg
from ._restore import measurement_mode
from .hutchinson import PROBE_BLOCK, probe_products
from .objective import HessianOperator, Objective

# Which loss Ψ's H_ii and ρ are of (docs/metrics.md derives both from the PAC-Bayes bound):
# "sum", the summed training loss n·L (the bound's KL/n multiplied through by n), or "mean", L.
NORMALIZATIONS = ("sum", "mean")
# Hutchinson probes of the diagonal when ``num_probes=None`` cannot take the diagonal to first order.
DIAGONAL_PROBES = 16
# ``error_ratio``'s default: the first-order diagonal is taken where its remainder is at most this fraction of
# Ψ's standard error, and the probes of an estimated diagonal stop where their error is this fraction of ρ̂'s.
ERROR_RATIO = 0.1


@dataclass(frozen=True)
class PACGenResult:
    """Ψ and how it was obtained.

    ``value``: Ψ. ``rho``: the Hessian Lipschitz constant of the *mean* loss over ``batches``
    (given or estimated), whatever the normalization. ``n_hvp``: Hessian-vector products spent.
    ``normalization`` and ``loss_scale``: the loss Ψ's ``H_ii`` and ``ρ`` are of, ``loss_scale``
    times the mean loss (``n`` for ``"sum"``, 1 for ``"mean"``). ``curved``: how many of the
    ``num_params`` coordinates have a curvature factor above its floor ``1/N_i``; only those
    carry the curvature into Ψ, the others add their weights-only term ``log(1 + |w_i|/N_i)``.
    ``se``: Ψ's standard error from the estimates behind it, the Hutchinson diagonal and
    ``ρ̂`` (delta method; 0 when both are given or Ψ sits at its floor everywhere).
    """

    value: float
    rho: float
    n_hvp: int
    curved: int
    num_params: int
    normalization: str
    loss_scale: float
    se: float = math.nan

    @property
    def curved_fraction(self) -> float:
        """``curved / num_params``: 0 means Ψ measures only the weights' magnitudes."""
        return self.curved / self.num_params


@dataclass(frozen=True)
class _PACGenInputs:
    weights: Tensor  # |w|, float64
    noise: Tensor  # N_i = gamma |w_i| + eps, float64
    diag: Tensor  # H_ii of the mean loss, float64
    rho: float  # of the mean loss
    scale: float  # the normalization's factor on H_ii and rho: n ("sum") or 1 ("mean")
    n_hvp: int
    diag_terms: Tensor | None = None  # (S, P) float32: each Hutchinson probe's z ⊙ Hz, when the diagonal was estimated
    rho_draws: Tensor | None = None  # the finite-difference ratios whose maximum is rho, when rho was estimated
    linear_terms: Tensor | None = None  # (K,) float64: each ρ probe's estimate of Ψ's first-order diagonal term


@dataclass(frozen=True)
class _RhoDraws:
    """The finite-difference ratios whose maximum is ``ρ̂``; the unit vectors ``v_k`` and their products ``H(w) v_k``."""

    ratios: Tensor  # (K,) float64, CPU
    vectors: Tensor  # (K, P)
    products: Tensor  # (K, P)


def _rho_draws(objective: Objective, noise: Tensor, num_probes: int, gen: torch.Generator) -> _RhoDraws:
    dim, like = objective.num_params, objective.w0
    v = torch.randn(num_probes, dim, generator=gen, dtype=torch.float64)
    v = (v / v.norm(dim=1, keepdim=True)).to(device=like.device, dtype=like.dtype)
    u = torch.rand(num_probes, dim, generator=gen, dtype=torch.float64) * 2 - 1
    deltas = (u.to(noise.device) * noise).to(like.dtype)
    at_w = (objective.hessian_operator() @ v.T).T  # the products at w share their passes
    ratios = [
        ((objective.hessian_operator(at=like + deltas[j]) @ v[j] - at_w[j]).norm() / deltas[j].norm()).item()
        for j in range(num_probes)
    ]
    return _RhoDraws(torch.tensor(ratios, dtype=torch.float64), v, at_w)


def rho_draws(objective: Objective, noise: Tensor, num_probes: int, gen: torch.Generator) -> Tensor:
    """The ``num_probes`` finite-difference ratios of :func:`estimate_rho` (float64, on the CPU)."""
    return _rho_draws(objective, noise, num_probes, gen).ratios


def estimate_rho(objective: Objective, noise: Tensor, num_probes: int, gen: torch.Generator) -> float:
    r"""Finite-difference estimate of the Hessian's local Lipschitz constant.

    :math:`\hat\rho = \max_k \|\nabla^2L(w+\delta_k)v_k - \nabla^2L(w)v_k\| / \|\delta_k\|` with
    :math:`v_k` uniform on the unit sphere and :math:`\delta_k = N\odot u_k`,
    :math:`u_k\sim U[-1,1]^P`, i.e. a uniform point of the perturbation box. Each ratio is a
    lower bound of the Lipschitz constant on the box; the maximum over ``num_probes`` draws is
    exact for a cubic along a single coordinate and 0 for a quadratic. Cost: ``2 * num_probes``
    Hessian-vector products (the ``num_probes`` products at ``w`` share their passes).
    """
    return rho_draws(objective, noise, num_probes, gen).max().item()


def _coordinates_that_need_h(noise: Tensor, rho: float, hessian_max: float, scale: float) -> Tensor:
    """Indices ``i`` where ``H_ii <= hessian_max`` does not force ``s(H_ii + ρ√m N_i) <= 1/N_i²``.

    ``s`` is the normalization's ``scale``; ``H_ii``, ``hessian_max`` and ``ρ`` are of the mean
    loss. Everywhere else Ψ's curvature factor is its floor ``1/N_i`` whatever ``H_ii`` is, and
    σ (whose term ``s(H_ii + ρN_i)`` is no larger, as ``m >= 1``) is ``N_i``.
    """
    curvature = scale * (hessian_max + rho * math.sqrt(noise.numel()) * noise)
    return torch.nonzero(curvature > noise.pow(-2)).flatten()


# Stopping probes block by block: the first block must give a spread (2 probes at least), yet cost little.
STOPPING_BLOCK = 4
Enough = Callable[[Tensor, Tensor], bool]  # (diagonal so far, probe terms so far) -> stop drawing probes


def _estimated_diagonal(
    operator: HessianOperator, num_probes: int, gen: torch.Generator, enough: Enough | None = None
) -> tuple[Tensor, int, Tensor]:  # fmt: skip
    """``(diag, n_hvp, probe terms)``: Hutchinson's diagonal (float64), its products, and each probe's own
    estimate ``z ⊙ Hz`` (float32, for the error). ``num_probes`` probes; with ``enough``, in blocks of
    ``STOPPING_BLOCK``, stopping after the first block that ``enough`` accepts."""
    total = torch.zeros(operator.num_params, dtype=operator.dtype, device=operator.device)
    terms: list[Tensor] = []
    used = 0
    for z, hz in probe_products(operator, num_probes, gen, PROBE_BLOCK if enough is None else STOPPING_BLOCK):
        part = z * hz
        total += part.sum(0)
        terms.append(part.float())
        used += part.shape[0]
        if enough is not None and enough((total / used).to(torch.float64), torch.cat(terms)):
            break
    return (total / used).to(torch.float64), used, torch.cat(terms)


def _diagonal_matched_to_rho(noise: Tensor, rho: float, scale: float, ratios: Tensor, error_ratio: float) -> Enough:
    """``enough`` for :func:`_estimated_diagonal`: the probes' whole error on Ψ, their spread and the bias they
    cause (:func:`_diagonal_bias`), is at most ``error_ratio`` times ``ρ̂``'s part of Ψ's error, all linearized
    at the diagonal so far (as :func:`_standard_error` does at the end)."""

    def enough(diag: Tensor, terms: Tensor) -> bool:
        dpsi_dh = _dpsi_dh(scale * (diag + rho * math.sqrt(noise.numel()) * noise), noise, scale)
        error = math.hypot(_diagonal_error(terms, dpsi_dh), _diagonal_bias(terms, dpsi_dh))
        return error <= error_ratio * _rho_error(dpsi_dh, noise, ratios)

    return enough


def _diagonal_bias(terms: Tensor, dpsi_dh: Tensor) -> float:
    """How far a noisy diagonal lowers Ψ, to second order: ``Σ_i d_i² Var(Ĥ_ii)`` (NaN with one probe).

    Off the floor Ψ holds ``½ log s(H_ii + ρ√m N_i)`` per coordinate, concave, with second derivative
    ``−2 d_i²``; so an unbiased ``Ĥ_ii`` of variance ``σ_i²/S`` lowers Ψ by ``d_i² σ_i²/S`` on average
    (Jensen), with ``σ_i²`` the probes' sample variance: 4 probes lowered Ψ by 0.05–0.22 of its standard
    error on the benchmarks' teacher MLP. An estimate for the stopping rule only, not a correction: near
    a coordinate's floor Ψ is flat in ``H_ii`` (convex there), so it overstates the bias, e.g. 1.6x at 4 probes
    on that MLP, and adding it back moved the study's Ψ by up to 0.5 of its standard error at 16 probes.
    """
    num = terms.shape[0]
    if num < 2:
        return math.nan
    return (dpsi_dh.pow(2) * terms.to(dpsi_dh).var(0)).sum().item() / num


def _dpsi_dh(curvature_squared: Tensor, noise: Tensor, scale: float) -> Tensor:
    """``∂Ψ/∂H_ii = s / (2c_i²)`` where the curvature factor ``c_i`` is above its floor ``1/N_i``, else 0."""
    c = curvature_squared.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(c > noise.pow(-2), scale / (2 * c), torch.zeros_like(c))


def _diagonal_error(terms: Tensor, dpsi_dh: Tensor) -> float:
    """The Hutchinson diagonal's part of Ψ's error: each probe's linearized Ψ, their spread over ``√S``."""
    t = terms.to(dpsi_dh) @ dpsi_dh
    return math.sqrt((t.var() / t.numel()).item()) if t.numel() > 1 else math.nan


def _linear_diagonal_terms(
    draws: _RhoDraws, noise: Tensor, rho: float, hessian_max: float | None, scale: float, error_ratio: float
) -> Tensor | None:  # fmt: skip
    """Each ρ probe's estimate of Ψ's diagonal term to first order, or ``None`` where that is not accurate.

    At ``H = 0`` the curvature factor is ``c_i = sqrt(s ρ√m N_i)``; where it is above its floor,
    ``∂Ψ/∂H_ii = d_i = s / (2c_i²)`` and ``Ψ(H) = Ψ(0) + Σ_i d_i H_ii − R`` with
    ``R = Σ_i ½(x_i − log(1 + x_i))``, ``x_i = 2 d_i H_ii``, while ``c_i² (1 + x_i)`` stays above the
    floor ``1/N_i²``: ``0 ≤ R ≤ Σ_i d_i² H_ii²`` where every ``H_ii ≥ 0``, and twice that for
    ``x_i ≥ −½``. A coordinate with ``m_i = 1 − 1/(N_i² c_i²)`` below ``|x_i|`` falls onto the floor,
    where its error is linear in ``x_i``; ``|error_i| ≤ x_i² / (2 min(1, m_i))`` covers both cases,
    so each coordinate's term enters the bound weighted by ``1/min(1, m_i)``. A unit ``v`` uniform on
    the sphere has ``E[P v vᵀ] = I``, so ``P·vᵀ D H v`` (the products ``H v`` of ρ's draws) is
    unbiased for ``Σ_i d_i H_ii``, and so is ``P v ⊙ D H v`` for ``d_i H_ii`` coordinate by
    coordinate: :func:`_remainder_bound` makes ``2 Σ_i d_i² H_ii²`` of it. ``None`` (the caller then
    estimates the diagonal) when a coordinate at its floor could leave it (no ``hessian_max`` to
    show it cannot), when the bound on ``R`` exceeds ``error_ratio`` of Ψ's standard error from the same
    draws (``ρ̂``'s part and the first-order term's, as :func:`_standard_error` adds them), or with
    a single draw (no spread to compare with).
    """
    dim = noise.numel()
    curvature = scale * rho * math.sqrt(dim) * noise  # c_i², of H = 0
    curved = curvature > noise.pow(-2)
    if draws.ratios.numel() < 2 or not curved.any():
        return None
    if not curved.all():  # a floor coordinate the bound cannot keep there needs its H_ii
        if hessian_max is None or not bool(curved[_coordinates_that_need_h(noise, rho, hessian_max, scale)].all()):
            return None
    d = _dpsi_dh(curvature, noise, scale)
    hv = draws.products.to(d)
    estimates = dim * draws.vectors.to(d) * hv * d  # (K, P): each draw's unbiased d_i H_ii
    # A coordinate near its floor (N_i²c_i² close to 1) falls onto it for a small negative H_ii, where the error
    # is linear in x_i: |error_i| <= x_i² / (2 min(1, m_i)) with m_i = 1 - 1/(N_i²c_i²) covers both sides.
    margin = torch.where(curved, 1 - noise.pow(-2) / curvature, torch.ones_like(curvature)).clamp(max=1.0)
    weight = margin.clamp_min(torch.finfo(margin.dtype).tiny).rsqrt().to(d)
    bound = _remainder_bound(estimates * weight, dim * (hv * d * weight).pow(2).sum(1).mean().item())
    terms = estimates.sum(1)
    psi_se = math.sqrt(_rho_error(d, noise, draws.ratios) ** 2 + (terms.var() / terms.numel()).item())
    if not bound <= error_ratio * psi_se:
        return None
    return terms.cpu()


def _remainder_bound(estimates: Tensor, frobenius: float) -> float:
    """An upper estimate of the first-order remainder ``R ≤ 2 Σ_i (d_i H_ii)²`` from ``K ≥ 2`` draws'
    unbiased ``d_i H_ii`` (rows of ``estimates``), or ``frobenius`` (``‖DH‖_F²``, unbiased; a bound on
    ``Σ_i (d_i H_ii)²`` that counts every off-diagonal entry too) where that is smaller.

    The pairs of independent draws make a U-statistic, unbiased for ``Σ_i (d_i H_ii)²``; one pair's
    spread, ``sqrt(Σ_i e_ki² e_li²)``, is far below it (about ``‖DH‖_F²/√P`` when the mass is spread
    over the coordinates), and three of them are added. On the linear-teacher MLP of the benchmarks
    (P = 79k) ``‖DH‖_F²`` is 2,000–3,300 and ``Σ_i (d_i H_ii)²`` 12–21 (64 probes): this is 120–480.
    """
    k = estimates.shape[0]
    gram = (estimates @ estimates.T).to(torch.float64)
    squares = estimates.pow(2)
    spreads = (squares @ squares.T).to(torch.float64)
    pairs = k * (k - 1)
    u_statistic = ((gram.sum() - gram.diagonal().sum()) / pairs).item()
    pair_spread = math.sqrt(max(((spreads.sum() - spreads.diagonal().sum()) / pairs).item(), 0.0))
    return min(2 * (max(u_statistic, 0.0) + 3 * pair_spread), 2 * frobenius)


def _rho_error(dpsi_dh: Tensor, noise: Tensor, draws: Tensor) -> float:
    """``ρ̂``'s part of Ψ's standard error: ``|∂Ψ/∂ρ|`` times one draw's spread (``s/c₄``; NaN with one draw)."""
    k = draws.numel()
    if k < 2:
        return math.nan
    c4 = math.sqrt(2 / (k - 1)) * math.exp(math.lgamma(k / 2) - math.lgamma((k - 1) / 2))
    return abs(_dpsi_drho(dpsi_dh, noise)) * draws.std().item() / c4


def _dpsi_drho(dpsi_dh: Tensor, noise: Tensor) -> float:
    """``∂Ψ/∂ρ = Σ_i ∂Ψ/∂H_ii · √m N_i``: ρ enters each curvature factor as ``ρ√m N_i`` beside ``H_ii``."""
    return (dpsi_dh * math.sqrt(noise.numel()) * noise).sum().item()


def _screened_diagonal(
    objective: Objective, noise: Tensor, rho: float, hessian_max: float, scale: float, num_probes: int,
    gen: torch.Generator, enough: Enough | None = None,
) -> tuple[Tensor, int, Tensor | None]:  # fmt: skip
    """The diagonal PACGen needs, given the bound ``H_ii <= hessian_max``: ``(diag, n_hvp, probe terms)``.

    Coordinates at their floor get the bound itself (any value up to it gives the same Ψ and
    σ). If at most ``num_probes`` coordinates are left, their ``H_ii = e_iᵀ H e_i`` are computed
    exactly, one product each; otherwise the whole diagonal is estimated as without the bound.
    """
    needed = _coordinates_that_need_h(noise, rho, hessian_max, scale)
    operator = objective.hessian_operator()
    if needed.numel() > num_probes:
        return _estimated_diagonal(operator, num_probes, gen, enough)
    diag = torch.full_like(noise, float(hessian_max))
    if needed.numel():
        w0 = objective.w0
        rows, cols = torch.arange(needed.numel(), device=w0.device), needed.to(w0.device)
        units = torch.zeros(needed.numel(), objective.num_params, dtype=w0.dtype, device=w0.device)
        units[rows, cols] = 1  # e_i for each coordinate left: H_ii = (H e_i)_i
        diag[needed] = (operator @ units.T).T[rows, cols].to(diag)
    return diag, needed.numel(), None


def _check_hessian_max(hessian_max: object) -> None:
    if hessian_max is not None:
        if isinstance(hessian_max, bool) or not isinstance(hessian_max, (int, float)):
            raise TypeError(f"hessian_max must be a float (an upper bound on every H_ii) or None, got {hessian_max!r}.")
        if not math.isfinite(hessian_max):
            raise ValueError(f"hessian_max must be finite, got {hessian_max!r}.")


def _checked_options(
    normalization: object, num_train: object, gamma: object, eps: object, rho: object, hessian_max: object,
    num_probes: object, rho_probes: object, error_ratio: object,
) -> dict[str, Any]:  # fmt: skip
    _check_hessian_max(hessian_max)
    return {
        "normalization": check_choice("normalization", normalization, NORMALIZATIONS),
        "num_train": None if num_train is None else check_int("num_train (the number of training samples n, or None)", num_train),
        "gamma": check_float("gamma", gamma), "eps": check_float("eps", eps, inclusive=False),
        "rho": None if rho is None else check_float("rho", rho),
        "num_probes": None if num_probes is None else check_int("num_probes (Hutchinson probes, or None)", num_probes),
        "rho_probes": check_int("rho_probes", rho_probes),
        "error_ratio": check_float("error_ratio", error_ratio, inclusive=False),
    }  # fmt: skip


def _pacgen_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg,
    normalization: str,
    num_train: int | None,
    gamma: float,
    eps: float,
    rho: float | None,
    hessian_diag: Tensor | None,
    hessian_max: float | None,
    num_probes: int | None,
    rho_probes: int,
    generator: torch.Generator | int | None,
    params: Iterable[Tensor] | None,
    dtype: torch.dtype | None,
    first_order: bool = True,
    error_ratio: float = ERROR_RATIO,
) -> _PACGenInputs:
    opts = _checked_options(normalization, num_train, gamma, eps, rho, hessian_max, num_probes, rho_probes, error_ratio)
    gen = check_generator(generator)
    # None: Ψ's diagonal term to first order from ρ's own products when that is accurate (no product of its own).
    linear = first_order and opts["num_probes"] is None and hessian_diag is None and opts["rho"] is None
    probes = opts["num_probes"] or DIAGONAL_PROBES
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        weights = objective.w0.to(torch.float64).abs()
        noise = opts["gamma"] * weights + opts["eps"]
        diag, n_hvp, terms = (None, 0, None) if linear else _given_or_estimated_diagonal(
            objective, hessian_diag, hessian_max, probes, gen)  # fmt: skip
        draws, rho = None, opts["rho"]
        if rho is None:
            draws = _rho_draws(objective, noise, opts["rho_probes"], gen)
            rho, n_hvp = draws.ratios.max().item(), n_hvp + 2 * opts["rho_probes"]
        # H(nL) = n H(L) and rho(nL) = n rho(L): the sum is the mean's numbers times n, exactly.
        # n defaults to the samples in `batches` (counted by the products above; one loss pass if none ran).
        scale = 1.0 if opts["normalization"] == "mean" else float(opts["num_train"] or objective.num_samples)
        linear_terms = _linear_diagonal_terms(draws, noise, rho, hessian_max, scale, opts["error_ratio"]) if linear else None
        if linear_terms is not None:
            diag = torch.zeros_like(noise)
        elif diag is None:  # rho first, then only the diagonal entries the bound (if any) cannot settle
            enough = None  # with num_probes=None, probes stop once their error is a fraction of rho's
            if linear and draws is not None and draws.ratios.numel() > 1:
                enough = _diagonal_matched_to_rho(noise, rho, scale, draws.ratios, opts["error_ratio"])
            diag, used, terms = _diagonal_given_rho(objective, noise, rho, hessian_max, scale, probes, gen, enough)
            n_hvp += used
    if not (torch.isfinite(diag).all() and math.isfinite(rho)):
        raise ValueError("the Hessian diagonal or rho is not finite; PACGen is undefined here.")
    ratios = None if draws is None else draws.ratios
    return _PACGenInputs(weights, noise, diag, float(rho), scale, n_hvp, terms, ratios, linear_terms)


def _diagonal_given_rho(
    objective: Objective, noise: Tensor, rho: float, hessian_max: float | None, scale: float, num_probes: int,
    gen: torch.Generator, enough: Enough | None,
) -> tuple[Tensor, int, Tensor | None]:  # fmt: skip
    if hessian_max is None:
        return _estimated_diagonal(objective.hessian_operator(), num_probes, gen, enough)
    return _screened_diagonal(objective, noise, rho, hessian_max, scale, num_probes, gen, enough)


def _given_or_estimated_diagonal(
    objective: Objective, hessian_diag: Tensor | None, hessian_max: float | None, num_probes: int, gen: torch.Generator
) -> tuple[Tensor | None, int, Tensor | None]:
    """``(diag, n_hvp, probe terms)``: the given diagonal, Hutchinson's, or ``None`` when the bound decides later."""
    if hessian_diag is not None:
        if not isinstance(hessian_diag, Tensor) or hessian_diag.shape != (objective.num_params,):
            raise ValueError(f"hessian_diag must be a tensor of shape ({objective.num_params},).")
        return hessian_diag.detach().to(device=objective.device, dtype=torch.float64), 0, None
    if hessian_max is not None:
        return None, 0, None
    return _estimated_diagonal(objective.hessian_operator(), num_probes, gen)


def _standard_error(inputs: _PACGenInputs, curvature: Tensor) -> float:
    """Ψ's standard error by the delta method, from the two estimates behind it.

    ``∂Ψ/∂H_ii = s / (2c_i)`` and ``∂Ψ/∂ρ = Σ_i s√m N_i / (2c_i)`` over the curved coordinates
    (``c_i = s(H_ii + ρ√m N_i)``; at the floor Ψ does not depend on either). The Hutchinson
    diagonal is a mean over probes, so its part is the spread of the probes' linearized Ψ over
    ``√S`` (cross-coordinate covariances included); so is the first-order diagonal term's, over
    ρ's probes. ``ρ̂`` is the maximum of its draws; its
    part uses their standard deviation (``s/c₄``), a draw's spread, which is what the maximum of
    a few right-skewed draws spreads like (``docs/metrics.md``).
    """
    dpsi_dh = _dpsi_dh(curvature.pow(2), inputs.noise, inputs.scale)
    var = 0.0
    if inputs.diag_terms is not None:
        var += _diagonal_error(inputs.diag_terms, dpsi_dh) ** 2
    if inputs.rho_draws is not None:
        rho_error = _rho_error(dpsi_dh, inputs.noise, inputs.rho_draws)
        if rho_error != rho_error:
            return math.nan
        var += rho_error**2
    if inputs.linear_terms is not None:  # the first-order diagonal term: a mean over ρ's probes
        var += (inputs.linear_terms.var() / inputs.linear_terms.numel()).item()
    return math.sqrt(var)


def pacgen(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    normalization: str = "sum",
    num_train: int | None = None,
    gamma: float = 0.1,
    eps: float = 0.1,
    rho: float | None = None,
    hessian_diag: Tensor | None = None,
    hessian_max: float | None = None,
    num_probes: int | None = None,
    rho_probes: int = 3,
    generator: torch.Generator | int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    error_ratio: float = ERROR_RATIO,
) -> PACGenResult:
    r"""PACGen :math:`\Psi` (Wang, Keskar, Xiong & Socher, arXiv:1809.07402, AISTATS 2020).

    With perturbation box :math:`N_i = \gamma|w_i| + \epsilon`, :math:`m = P` parameters and
    the normalization's factor :math:`s`,

    .. math::
        \Psi = \sum_i \log\Big((|w_i| + N_i)\,\max\big(\sqrt{\max(0, s(H_{ii} + \rho\sqrt m\,N_i))},\ 1/N_i\big)\Big)

    where :math:`H_{ii}` and :math:`\rho` are of the mean loss :math:`L` over ``batches``:
    :math:`\rho` is ``rho`` if given, else the finite-difference estimate of
    :func:`estimate_rho` with ``rho_probes`` draws; :math:`H_{ii}` is ``hessian_diag`` if
    given, else a Hutchinson estimate with ``num_probes`` probes (:func:`hessian_diagonal`).

    ``num_probes=None`` (default), with :math:`\rho` estimated: where :math:`\rho\sqrt m N_i`
    dominates :math:`H_{ii}` (the rule on large models), the diagonal enters Ψ to first order,
    :math:`\Psi(H) \approx \Psi(0) + \sum_i H_{ii}\,\partial\Psi/\partial H_{ii}|_{H=0}`, a weighted
    trace estimated without a product of its own from :math:`\rho`'s: each of its unit vectors
    :math:`v_k` (uniform on the sphere, so :math:`E[P\,v v^\top] = I`) and its product
    :math:`H v_k` make one unbiased Hutchinson probe of it. The remainder of the expansion is at
    most :math:`2\sum_i d_i^2 H_{ii}^2` (:math:`d_i = \partial\Psi/\partial H_{ii}`), bounded from
    the same products (a U-statistic over pairs of draws plus three times its spread); only when
    that bound is within ``error_ratio`` (a tenth) of Ψ's standard error (and no coordinate
    at its floor could leave it, which ``hessian_max`` must show) is the first order used.
    Otherwise the diagonal is estimated with Hutchinson probes in blocks of 4, which stop after
    the first block whose part of Ψ's error, spread and Jensen bias, is within ``error_ratio`` of
    ``ρ̂``'s part (at most 16 probes; ``docs/metrics.md``). With
    ``rho`` given there is no ``ρ̂`` to match, and 16 probes are drawn. The result's ``n_hvp``
    tells which: ``2 * rho_probes`` alone means the diagonal was not estimated (first order,
    or, with ``hessian_max``, not needed).

    ``normalization`` says which loss the bound behind Ψ takes these of (derived in
    ``docs/metrics.md``): ``"sum"`` (default), the summed training loss :math:`nL`, so
    :math:`s = n` = ``num_train``, the number of training samples the bound is over (None: the
    number of samples in ``batches``, right only when ``batches`` is the whole training set;
    pass the training set's size when it is a subsample); ``"mean"``, :math:`L` itself,
    :math:`s = 1`, Ψ as the paper prints it (``num_train`` unused). The result's ``curved``
    counts the coordinates whose curvature factor is above its floor :math:`1/N_i`.

    Larger :math:`\Psi` means a sharper minimum relative to the weights' scale. Cost
    (``n_hvp``): ``num_probes`` if the diagonal is estimated (``num_probes=None``: 4 to 16; with
    ``hessian_max``: 0 to that, see below; 0 at first order) ``+ 2 * rho_probes`` (if
    :math:`\rho` is estimated) Hessian-vector products.

    ``hessian_max``, an upper bound on every :math:`H_{ii}` of the *mean* loss whatever the
    normalization (the top eigenvalue bounds them: :math:`H_{ii} = e_i^\top H e_i \le
    \lambda_{max}`), lets the diagonal be skipped when it cannot matter: where
    :math:`s(\text{hessian\_max} + \rho\sqrt m N_i) \le 1/N_i^2`, the curvature factor sits
    at its floor :math:`1/N_i` whatever :math:`H_{ii}` is (:math:`\rho` is then estimated
    first). If at most ``num_probes`` coordinates are left, their :math:`H_{ii}` are computed
    exactly, one product each, and Ψ is exact given :math:`\rho`; otherwise the whole diagonal
    is estimated as without the bound. In ``benchmarks/`` (``"mean"``, bound = twice the top
    eigenvalue, after 100 SGD steps) no coordinate was left on an MLP of 79k weights and a
    transformer of 67k, so PACGen cost the 6 products of :math:`\rho` instead of 22; on a
    BatchNorm CNN 69 coordinates were left and the diagonal was estimated. With ``"sum"`` the
    factor :math:`n` puts far fewer coordinates at the floor, and the screen rarely applies.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import pacgen
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> pacgen(model, batches, num_train=1000, rho=0.0, num_probes=8).n_hvp
        8
        >>> pacgen(model, batches, num_train=1000).n_hvp  # ρ: 6 products; H_ii matters here: 16 probes
        22
        >>> pacgen(model, batches, normalization="mean", rho=0.0, hessian_max=1.0).n_hvp  # 1 <= 1/N_i² everywhere
        0
    """
    inputs = _pacgen_inputs(
        model, batches, loss_fn, normalization, num_train, gamma, eps, rho, hessian_diag, hessian_max, num_probes,
        rho_probes, generator, params, dtype, error_ratio=error_ratio,
    )  # fmt: skip
    w, n, h = inputs.weights, inputs.noise, inputs.diag
    curvature = torch.clamp(inputs.scale * (h + inputs.rho * math.sqrt(w.numel()) * n), min=0).sqrt()
    floor = 1 / n
    psi = torch.log((w + n) * torch.maximum(curvature, floor)).sum().item()
    if inputs.linear_terms is not None:
        psi += inputs.linear_terms.mean().item()
    curved = curvature > floor
    se = _standard_error(inputs, curvature)
    return PACGenResult(psi, inputs.rho, inputs.n_hvp, int(curved.sum().item()), w.numel(), normalization, inputs.scale, se)


def pacgen_perturbation_scale(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    normalization: str = "sum",
    num_train: int | None = None,
    gamma: float = 0.1,
    eps: float = 0.1,
    rho: float | None = None,
    hessian_diag: Tensor | None = None,
    hessian_max: float | None = None,
    num_probes: int = 16,
    rho_probes: int = 3,
    generator: torch.Generator | int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Per-coordinate perturbation scale of Wang et al. (2018), a flat ``(P,)`` float64 tensor.

    :math:`\sigma_i = \min\big(N_i,\ 1/\sqrt{\max(s(H_{ii} + \rho N_i),\ \text{tiny})}\big)`:
    large along flat coordinates (up to the box :math:`N_i`), small along sharp ones; :math:`s`
    is ``num_train`` for ``normalization="sum"`` (the bound's optimal width, ``docs/metrics.md``)
    and 1 for ``"mean"``. Arguments and cost as in :func:`pacgen`.
    """
    inputs = _pacgen_inputs(
        model, batches, loss_fn, normalization, num_train, gamma, eps, rho, hessian_diag, hessian_max, num_probes,
        rho_probes, generator, params, dtype, first_order=False,  # each σ_i needs its own H_ii
    )  # fmt: skip
    tiny = torch.finfo(torch.float64).tiny
    curvature = torch.clamp(inputs.scale * (inputs.diag + inputs.rho * inputs.noise), min=tiny)
    return torch.minimum(inputs.noise, curvature.rsqrt())
