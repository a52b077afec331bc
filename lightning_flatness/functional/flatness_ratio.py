"""The ratio of flatnesses (F. Huszár, inference.vc blog): the mini-batch losses' mean top Hessian
eigenvalue against the top eigenvalue of their mean."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ..validation import check_bool, check_cache_chunks, check_float, check_generator, check_int
from ._graph_cache import CacheChunks
from ._losses import LossArg
from ._restore import measurement_mode
from ._stats import MeanAccumulator, Reduce
from .fisher_trace import _batch_generators
from .hessian_eigenvalues import hessian_eigenvalues
from .lanczos import ErrorTarget, lanczos
from .objective import Objective, cross_process_reduction


@dataclass(frozen=True)
class FlatnessRatioResult:
    """See :func:`flatness_ratio`. Standard errors are over the draw of the mini-batches (NaN with one).

    ``value``: the ratio ``Σ_b w_b λ_max(H_b) / λ_max(H)`` (NaN when ``λ_max(H) <= 0``);
    ``batch_top_eig_mean``: its numerator; ``top_eig``: ``λ_max(H)``. ``n_hvp``: products with
    ``H`` (all of ``batches``; 0 when the pair was given), ``n_batch_hvp``: products with one
    mini-batch's ``H_b`` (every process's), ``hvp_equivalent``: the whole cost in products with
    ``H``, ``n_hvp + Σ_b k_b n_b / N`` (a product on ``n_b`` samples costs ``n_b/N`` of one on all).
    ``n_grad``: gradient passes (the cold start's). ``converged``: every Lanczos run converged.
    ``batch_top_eigs`` and ``batch_quotients`` (this process's mini-batches, in order, float64):
    ``λ_max(H_b)`` and ``vᵀ H_b v`` for the unit top eigenvector ``v`` of ``H``; ``batch_sizes``: ``n_b``.
    """

    value: float
    se: float
    batch_top_eig_mean: float
    batch_top_eig_mean_se: float
    top_eig: float
    top_eig_se: float
    num_batches: int
    n_hvp: int
    n_batch_hvp: int
    hvp_equivalent: float
    n_grad: int
    converged: bool
    batch_top_eigs: Tensor
    batch_quotients: Tensor
    batch_sizes: Tensor


@dataclass
class _Batch:
    """One mini-batch's solve: its top Ritz pair, residual, products and ``vᵀ H_b v``."""

    batch: Any
    generator: torch.Generator
    size: int = 0
    quotient: float = math.nan
    top: float = math.nan
    residual: float = math.inf
    vector: Tensor | None = None
    products: int = 0
    converged: bool = True


@dataclass(frozen=True)
class _Summary:
    """The numerator ``A``, the denominator ``D`` (its batch means ``Σ w_b y_b`` estimate its error), the ratio."""

    numerator: float
    numerator_se: float
    denominator: float
    denominator_se: float
    ratio: float
    ratio_se: float

    def target(self, error_ratio: float) -> float:
        """The error each ``λ_max(H_b)`` may keep: ``error_ratio`` of the numerator's and of the ratio's error.

        A Ritz value lies below its eigenvalue, so the errors add up rather than average out:
        ``|δA| ≤ Σ_b w_b r_b ≤ max_b r_b``, and ``δR = δA / D``.
        """
        return error_ratio * min(self.numerator_se, self.denominator * self.ratio_se)


def flatness_ratio(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    eigenvalue: float | None = None,
    eigenvector: Tensor | None = None,
    error_ratio: float | None = 0.1,
    tol: float = 1e-4,
    max_iter: int = 100,
    verify: bool = True,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | int | None = None,
    cache_chunks: CacheChunks = "auto",
    batch_indices: Sequence[int] | None = None,
) -> FlatnessRatioResult:
    r"""The ratio of flatnesses :math:`R = \sum_b w_b \lambda_{\max}(H_b) / \lambda_{\max}(H)`.

    Each element of ``batches`` is a mini-batch ``b`` of :math:`n_b` samples with loss
    :math:`L_b = \frac{1}{n_b}\sum_{i\in b}\ell_i`, Hessian :math:`H_b`, and weight
    :math:`w_b = n_b/N`; the mean loss :math:`L = \sum_b w_b L_b` has :math:`H = \sum_b w_b H_b`.
    :math:`\lambda_{\max}` is convex, so :math:`R \ge 1` when :math:`\lambda_{\max}(H) > 0` (else
    ``value`` is NaN), with equality iff the top eigenvector of :math:`H` is a top eigenvector of
    every :math:`H_b` (identical mini-batches give 1): a flat mean of flat,
    aligned mini-batch losses has :math:`R \approx 1`, one of sharp losses whose sharp
    directions differ has a large :math:`R` (F. Huszár, inference.vc blog).

    :math:`\lambda_{\max}(H)` and its unit eigenvector :math:`v` are ``eigenvalue`` and
    ``eigenvector`` (e.g. :func:`hessian_eigenvalues`' on the same batches) or computed by it here
    (``tol``, ``max_iter``, ``verify``, ``error_ratio`` as there). Each :math:`\lambda_{\max}(H_b)`
    is Lanczos on one mini-batch, started from :math:`v`: its first product gives
    :math:`y_b = v^\top H_b v` (the per-mini-batch Rayleigh quotients that make
    :math:`\lambda_{\max}(H)`'s error, :math:`\sum_b w_b y_b = v^\top H v`), and its Krylov space
    holds :math:`v`, so each Ritz value is :math:`\ge y_b` and the computed ratio is :math:`\ge 1`
    whatever the tolerance. ``verify`` runs each mini-batch's check in the complement
    (:func:`lanczos`): :math:`v` can all but miss a mini-batch's own top eigenvector, which is what
    a large ratio means.

    Standard errors, by the delta method over the draw of the mini-batches (weighted batch
    means): the numerator's from the :math:`\lambda_{\max}(H_b)`, the denominator's from the
    :math:`y_b`, the ratio's from :math:`(\lambda_{\max}(H_b) - R\,y_b)/\lambda_{\max}(H)`, which
    accounts for their correlation. ``error_ratio`` (default ``0.1``): every
    :math:`\lambda_{\max}(H_b)` is solved until its residual (an eigenvalue lies within it) is at
    most ``error_ratio`` times the smaller of the numerator's error and :math:`\lambda_{\max}(H)`
    times the ratio's: first to ``error_ratio`` of :math:`\lambda_{\max}(H)`'s error (the
    ``tol`` rule when it is not known), then, once the errors are measured, the mini-batches
    above the target again from their Ritz vector (without a second check). ``None``: the ``tol``
    rule throughout (relative change ``tol``, residual ``√tol`` of the value).

    Cost: ``n_hvp`` products with ``H`` (none when given) and ``n_batch_hvp`` with one ``H_b``
    each, ``hvp_equivalent`` in all (see :class:`FlatnessRatioResult`). Under
    :func:`cross_process_reduction` each process passes its shard of whole mini-batches and
    gets the whole subsample's result; ``batch_indices`` (each mini-batch's position in the
    subsample, default ``0, 1, ...``) seed each mini-batch's check so that it does not depend on
    the sharding.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import flatness_ratio
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(4)]
        >>> r = flatness_ratio(model, batches)
        >>> r.value >= 1, r.num_batches, r.batch_top_eigs.shape
        (True, 4, torch.Size([4]))
    """
    options = _options(tol, max_iter, verify, cache_chunks)
    if (eigenvalue is None) != (eigenvector is None):
        raise ValueError("eigenvalue and eigenvector go together: give both (the mean loss's top pair) or neither.")
    error_ratio = None if error_ratio is None else check_float("error_ratio", error_ratio, inclusive=False, maximum=1.0)
    gen = check_generator(generator)
    params = None if params is None else list(params)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        if eigenvector is None:
            res = hessian_eigenvalues(
                model, batches, loss_fn, params=params, dtype=dtype, generator=gen, error_ratio=error_ratio, **options
            )
            mean = _MeanPair(res.values[0].item(), res.vectors[0], res.se[0].item(), res.n_hvp, res.n_grad, res.converged)
        else:  # its error is not known before the mini-batches' quotients: the first round keeps the tol rule
            mean = _MeanPair(check_float("eigenvalue", eigenvalue, -math.inf), _unit(eigenvector, objective))
        entries = _entries(objective.batches, gen, batch_indices)
        own = lambda batch: _own_objective(model, batch, loss_fn, params, dtype)  # noqa: E731
        summary = _solve_all(entries, own, mean, error_ratio, options, objective)
        return _result(summary, entries, objective, mean)


class _MeanPair(NamedTuple):
    """``λ_max(H)``, its unit eigenvector ``v``, its error (NaN: not yet known), and what it cost."""

    top: float
    vector: Tensor
    se: float = math.nan
    n_hvp: int = 0
    n_grad: int = 0
    converged: bool = True


def _solve_all(
    entries: list[_Batch], own: Callable[[Any], Objective], mean: _MeanPair, error_ratio: float | None,
    options: dict[str, Any], objective: Objective,
) -> _Summary:  # fmt: skip
    """Every ``λ_max(H_b)`` from ``v``, then (``error_ratio``) the ones above the measured target again.

    Every process makes the same two or three reductions, whatever its mini-batches need.
    """
    target = math.nan if error_ratio is None else error_ratio * mean.se
    for entry in entries:
        _solve(entry, own(entry.batch), mean.vector, target, options, options["verify"])
    summary = _summarize(entries, mean.top, objective.reduce_sum, objective.device)
    if error_ratio is None:
        return summary
    target = summary.target(error_ratio)
    for entry in entries:
        if entry.residual > target:  # never with one mini-batch (NaN): the tol rule held there
            _solve(entry, own(entry.batch), entry.vector, target, options, verify=False)
    return _summarize(entries, mean.top, objective.reduce_sum, objective.device)


def _options(tol: float, max_iter: int, verify: bool, cache_chunks: CacheChunks) -> dict[str, Any]:
    return {
        "tol": check_float("tol", tol, inclusive=False), "max_iter": check_int("max_iter", max_iter),
        "verify": check_bool("verify", verify), "cache_chunks": check_cache_chunks(cache_chunks),
    }  # fmt: skip


def _entries(batches: Iterable[Any], gen: torch.Generator, batch_indices: Sequence[int] | None) -> list[_Batch]:
    """One entry per mini-batch, each with its own generator (seeded by its index: the same under any sharding)."""
    batches = list(batches)
    if batch_indices is not None and len(batch_indices) != len(batches):
        raise ValueError(f"batch_indices must give one index per mini-batch: {len(batch_indices)} for {len(batches)}.")
    return [_Batch(b, g) for b, g in zip(batches, _batch_generators(gen, batch_indices))]


def _unit(vector: Tensor, objective: Objective) -> Tensor:
    dim = objective.num_params
    if not isinstance(vector, Tensor) or vector.shape != (dim,):
        got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
        raise ValueError(f"eigenvector must be the mean loss's top eigenvector, a tensor of shape ({dim},), got {got}.")
    norm = vector.detach().to(torch.float64).norm()
    if not (torch.isfinite(norm) and norm > 0):
        raise ValueError("eigenvector must be finite and nonzero.")
    return (vector.detach().to(torch.float64) / norm).to(device=objective.device, dtype=objective.dtype)


def _own_objective(model: nn.Module, batch: Any, loss_fn: LossArg, params: list | None, dtype: Any) -> Objective:
    """``batch``'s own loss, whose products stay in this process: the others hold other mini-batches."""
    with cross_process_reduction(None):  # type: ignore[arg-type]
        return Objective(model, [batch], loss_fn, params, dtype)


class _FirstQuotient:
    """A chunk observer keeping ``vᵀ H_b v`` and ``n_b`` from the first product (the start vector's)."""

    def __init__(self) -> None:
        self.value, self.size = math.nan, 0

    def __call__(self, vector: Tensor, chunk_product: Tensor, size: int) -> None:
        if not self.size:
            self.value = (vector.to(torch.float64) @ chunk_product.to(torch.float64)).item() / size
            self.size = size


def _solve(entry: _Batch, objective: Objective, start: Tensor, target: float, options: dict, verify: bool) -> None:
    """Lanczos for ``λ_max(H_b)`` from ``start``, each value kept within ``target`` (NaN: the tol rule)."""
    operator = objective.hessian_operator(options["cache_chunks"])
    first = operator.chunk_observer = _FirstQuotient() if not entry.size else None
    error: ErrorTarget = lambda c: torch.tensor([target], dtype=torch.float64)  # noqa: E731
    out = lanczos(
        operator, start, k=1, tol=options["tol"], max_iter=options["max_iter"], generator=entry.generator,
        verify=verify, error_target=error,
    )  # fmt: skip
    if first is not None:
        entry.quotient, entry.size = first.value, first.size
    entry.top, entry.residual, entry.vector = out.values[0].item(), out.residuals[0].item(), out.vectors[0]
    entry.products += out.n_products
    entry.converged = out.converged


def _summarize(entries: list[_Batch], top: float, reduce: Reduce, device: torch.device) -> _Summary:
    """The ratio and the three errors over every process's mini-batches (two reductions)."""
    sizes = torch.tensor([float(e.size) for e in entries], dtype=torch.float64)
    x = torch.tensor([e.top for e in entries], dtype=torch.float64)
    y = torch.tensor([e.quotient for e in entries], dtype=torch.float64)
    (numerator, _), (numerator_se, top_se) = _batch_means(torch.stack([x, y], 1), sizes, reduce, device)
    ratio = numerator / top if top > 0 else math.nan
    # First order: a redrawn subsample moves A by its mean x_b and D by its mean y_b (vᵀ ΔH v).
    ratio_se = _batch_means(((x - ratio * y) / top).reshape(-1, 1), sizes, reduce, device)[1][0]
    return _Summary(numerator, numerator_se, top, top_se, ratio, ratio_se if top > 0 else math.nan)


def _batch_means(values: Tensor, sizes: Tensor, reduce: Reduce, device: torch.device) -> tuple[list, list]:
    acc = MeanAccumulator(values.shape[1], device=device)
    if len(sizes):  # a process without mini-batches adds zeros to the sums
        acc.add(values, sizes)
    mean, se = acc.result(reduce)
    return mean.tolist(), se.tolist()


def _result(summary: _Summary, entries: list[_Batch], objective: Objective, mean: _MeanPair) -> FlatnessRatioResult:
    """The result, the mini-batch counts summed over processes."""
    sizes = torch.tensor([float(e.size) for e in entries], dtype=torch.float64)
    products = torch.tensor([float(e.products) for e in entries], dtype=torch.float64)
    counts = torch.stack([
        products.sum(), (products * sizes).sum(), sizes.sum(), torch.tensor(float(len(entries))),
        torch.tensor(float(sum(not e.converged for e in entries))),
    ]).to(objective.device)  # fmt: skip
    batch_hvp, weighted, total, num_batches, unconverged = objective.reduce_sum(counts).tolist()
    return FlatnessRatioResult(
        value=summary.ratio, se=summary.ratio_se, batch_top_eig_mean=summary.numerator,
        batch_top_eig_mean_se=summary.numerator_se, top_eig=summary.denominator, top_eig_se=summary.denominator_se,
        num_batches=int(num_batches), n_hvp=mean.n_hvp, n_batch_hvp=int(batch_hvp), hvp_equivalent=mean.n_hvp + weighted / total,
        n_grad=mean.n_grad, converged=mean.converged and unconverged == 0,
        batch_top_eigs=torch.tensor([e.top for e in entries], dtype=torch.float64),
        batch_quotients=torch.tensor([e.quotient for e in entries], dtype=torch.float64), batch_sizes=sizes.long(),
    )  # fmt: skip
