"""Hutchinson estimators of the Hessian trace and diagonal (Hutchinson 1989; Bekas et al. 2007)."""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ._graph_cache import CacheChunks
from ._losses import LossArg
from .objective import HessianOperator, Objective
from .operator import CurvatureOperator
from ._restore import measurement_mode
from ._stats import MeanAccumulator, renamed_field
from ..validation import check_cache_chunks, check_float, check_generator, check_int

# Probes evaluated together share one forward and one first backward pass per chunk.
PROBE_BLOCK = 8


@dataclass(frozen=True)
class TraceResult:
    """``value``: the estimate of ``tr A``; ``se``: its standard error, ``sqrt(probe_se² + sample_se²)``
    (``probe_se`` alone where there is no ``sample_se``); ``stderr``: deprecated.

    ``probe_se``: the part of the probes (the spread of the ``S`` probe terms over ``√S``; 0 for an
    exact trace). ``sample_se``: the part of the data, for a Hessian over several mini-batches
    (batch means of each mini-batch's share of the estimate; NaN otherwise). The two are added in
    quadrature: each also holds the probe-by-mini-batch interaction over ``S·B``, so the sum is
    conservative by that term, which is the smaller of the two parts' own shares.
    """

    value: float
    se: float
    n_hvp: int
    probe_se: float = math.nan
    sample_se: float = math.nan

    stderr = renamed_field("se", "stderr")


class ChunkQuadraticForms:
    """A :attr:`HessianOperator.chunk_observer` that keeps ``vᵀ H_c v`` per product vector and chunk.

    ``H_c = Σ_{i∈c} ∇²ℓ_i`` is the chunk's summed Hessian; this process's chunks only. Each
    product's row lists its chunks in the data's order: the operator passes the same tensor
    object for every chunk of one product, and a weak reference tells it from a later vector
    that reuses a freed one's ``id``. Cost: one dot product per chunk and vector.
    """

    def __init__(self) -> None:
        self._rows: list[list[float]] = []
        self._current: dict[int, tuple[weakref.ref, list[float]]] = {}
        self.sizes: list[int] = []

    def __call__(self, vector: Tensor, chunk_product: Tensor, size: int) -> None:
        ref, row = self._current.get(id(vector), (None, []))
        if ref is None or ref() is not vector:
            row = []
            self._rows.append(row)
            self._current[id(vector)] = (weakref.ref(vector), row)
        if len(row) == len(self.sizes):
            self.sizes.append(size)
        row.append(float(vector.to(torch.float64) @ chunk_product.to(torch.float64)))

    def take(self) -> Tensor:
        """``(K, C)`` float64: the forms of the products made since the last call, in order; then forgets them."""
        rows, self._rows, self._current = self._rows, [], {}
        return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(self.sizes))


def sample_error(forms: Tensor, sizes: list[int], reduce: Callable[[Tensor], Tensor], scale: float = 1.0) -> float:
    """The data's part of the standard error of ``scale · mean_s Σ_c forms[s, c] / N``: batch means of the
    chunks' shares ``scale · mean_s forms[s, c] / n_c``, weighted by ``n_c``, over every process's chunks."""
    acc = MeanAccumulator()
    if forms.numel():
        counts = torch.tensor(sizes, dtype=torch.float64)
        acc.add(scale * forms.mean(0) / counts, counts)
    return acc.result(reduce)[1].item()


def rademacher(num: int, dim: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``(num, dim)`` independent ±1 entries, drawn on the CPU, returned like ``like``."""
    z = torch.randint(0, 2, (num, dim), generator=generator, dtype=torch.int8)
    return (2 * z - 1).to(device=like.device, dtype=like.dtype)


def probe_products(
    operator: CurvatureOperator, num_probes: int, generator: torch.Generator, block_size: int = PROBE_BLOCK
) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    """Yield ``(Z, A Z)`` as rows: blocks of at most ``block_size`` Rademacher probes ``Z`` ``(K, P)`` and their products."""
    like = torch.empty(0, dtype=operator.dtype, device=operator.device)
    remaining = num_probes
    while remaining > 0:
        block = min(block_size, remaining)
        z = rademacher(block, operator.num_params, generator, like)
        yield z, (operator @ z.T).T
        remaining -= block


def hutchinson_trace(
    operator: CurvatureOperator, num_probes: int = 64, generator: torch.Generator | int | None = None,
    *, error_ratio: float | None = None,
) -> TraceResult:
    r"""Hutchinson estimate of :math:`\operatorname{tr} A` for any symmetric ``operator``.

    :math:`\hat t = \frac1S\sum_{s=1}^S z_s^\top A z_s` with Rademacher probes
    :math:`z_s \in \{\pm1\}^P`; unbiased, with variance :math:`2\sum_{i\ne j}A_{ij}^2 / S`
    (the smallest among probe distributions with i.i.d. entries). ``probe_se`` is the sample
    standard deviation of the ``S`` terms over :math:`\sqrt S` (0 when ``S = 1``). For a Hessian
    over mini-batches (:class:`HessianOperator`), each product arrives chunk by chunk, and the
    chunks' shares of the estimate give ``sample_se``, the error of the data, without another
    product; ``se`` adds both (:class:`TraceResult`).

    ``error_ratio`` (a Hessian over at least two mini-batches): the probes are drawn in blocks of 8
    and stop after the first block that leaves ``probe_se <= error_ratio · sample_se``, or at
    ``num_probes``, whichever comes first; ``0.1`` adds at most half a percent to the total
    error. The decision uses sums reduced over processes, so every process stops at the same
    probe. Cost: ``num_probes`` products (fewer with ``error_ratio``), in blocks of 8 columns.
    """
    num_probes = check_int("num_probes", num_probes)
    gen = check_generator(generator)
    error_ratio = None if error_ratio is None else check_float("error_ratio", error_ratio, inclusive=False, maximum=1.0)
    terms, rows = [], []
    with observed(operator) as forms:
        for z, az in probe_products(operator, num_probes, gen):
            terms.append((z * az).sum(1).to(torch.float64).cpu())
            if forms is not None:
                rows.append(forms.take())
                if error_ratio is not None:  # the sums are reduced over processes: only where they decide
                    probe_se, sample_se = _trace_errors(operator, torch.cat(terms), torch.cat(rows), forms.sizes, False)
                    if probe_se <= error_ratio * sample_se:
                        break
    return _trace_result(operator, torch.cat(terms), torch.cat(rows) if rows else None, forms, exact=False)


def exact_trace(operator: CurvatureOperator) -> TraceResult:
    """``tr A`` from ``P`` products with the unit vectors (``probe_se = 0``), with ``sample_se`` as in
    :func:`hutchinson_trace` for a Hessian over mini-batches. Small operators only."""
    with observed(operator) as forms:
        diagonal = operator.to_dense().diagonal().to(torch.float64).cpu()
    return _trace_result(operator, diagonal, None if forms is None else forms.take(), forms, exact=True)


@contextmanager
def observed(operator: CurvatureOperator) -> Iterator[ChunkQuadraticForms | None]:
    """A :class:`ChunkQuadraticForms` observing a Hessian's products while in the block (``None`` for other
    operators, which have no mini-batches)."""
    if not isinstance(operator, HessianOperator):
        yield None
        return
    previous, operator.chunk_observer = operator.chunk_observer, ChunkQuadraticForms()
    try:
        yield operator.chunk_observer
    finally:
        operator.chunk_observer = previous


def _trace_errors(
    operator: CurvatureOperator, terms: Tensor, forms: Tensor | None, sizes: list[int], exact: bool
) -> tuple[float, float]:  # fmt: skip
    """``(probe_se, sample_se)`` of the trace from ``terms`` (probe terms, or the exact diagonal)."""
    num = terms.numel()
    probe_se = 0.0 if exact or num < 2 else terms.std().item() / math.sqrt(num)
    if forms is None or not isinstance(operator, HessianOperator):
        return probe_se, math.nan
    return probe_se, sample_error(forms, sizes, operator.objective.reduce_sum, float(num) if exact else 1.0)


def _trace_result(
    operator: CurvatureOperator, terms: Tensor, forms: Tensor | None, observer: ChunkQuadraticForms | None, exact: bool
) -> TraceResult:  # fmt: skip
    probe_se, sample_se = _trace_errors(operator, terms, forms, [] if observer is None else observer.sizes, exact)
    value = terms.sum().item() if exact else terms.mean().item()
    return TraceResult(value, combined_error(probe_se, sample_se), terms.numel(), probe_se, sample_se)


def combined_error(probe_se: float, sample_se: float) -> float:
    """A trace's standard error: the probes' and the data's in quadrature, the probes' alone where the data's
    is unknown (NaN: one mini-batch, or an operator without mini-batches)."""
    return math.hypot(probe_se, sample_se) if math.isfinite(sample_se) else probe_se


def hutchinson_diagonal(
    operator: CurvatureOperator, num_probes: int = 64, generator: torch.Generator | int | None = None
) -> Tensor:
    r"""Hutchinson estimate of :math:`\operatorname{diag} A` as a flat ``(P,)`` tensor.

    :math:`\hat d = \frac1S\sum_s z_s \odot A z_s` with Rademacher :math:`z_s`; unbiased
    because :math:`E[z_i z_j] = \delta_{ij}`, with per-entry variance
    :math:`\sum_{j\ne i} A_{ij}^2 / S` (Bekas, Kokiopoulou & Saad 2007). Cost: ``num_probes``
    products, in blocks of 8 columns.
    """
    num_probes = check_int("num_probes", num_probes)
    gen = check_generator(generator)
    total = torch.zeros(operator.num_params, dtype=operator.dtype, device=operator.device)
    for z, az in probe_products(operator, num_probes, gen):
        total += (z * az).sum(0)
    return total / num_probes


def hessian_trace(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    num_probes: int = 64,
    generator: torch.Generator | int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    error_ratio: float | None = None,
    cache_chunks: CacheChunks = "auto",
) -> TraceResult:
    r"""Hutchinson estimate of :math:`\operatorname{tr}\nabla^2 L(w)` (:func:`hutchinson_trace` of the Hessian).

    ``se`` holds the probes' error and, over several mini-batches, the data's; ``error_ratio``
    stops the probes at that fraction of the data's (at most ``num_probes``), as in
    :func:`hutchinson_trace`. Cost: ``num_probes`` Hessian-vector products; probes are
    evaluated in blocks of 8 that share the forward and first backward pass of each chunk, or
    only the second backward pass on the chunks whose graphs are kept (``cache_chunks``, as in
    :func:`hessian_eigenvalues`).

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import hessian_trace
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> hessian_trace(model, batches, num_probes=16, generator=0).n_hvp
        16
    """
    num_probes = check_int("num_probes", num_probes)
    gen = check_generator(generator)
    cache_chunks = check_cache_chunks(cache_chunks)
    with measurement_mode(model):
        operator = Objective(model, batches, loss_fn, params, dtype).hessian_operator(cache_chunks)
        return hutchinson_trace(operator, num_probes, gen, error_ratio=error_ratio)


def hessian_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    num_probes: int = 64,
    generator: torch.Generator | int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Hutchinson estimate of :math:`\operatorname{diag}\nabla^2 L(w)` (:func:`hutchinson_diagonal` of the Hessian).

    Cost: ``num_probes`` Hessian-vector products, in blocks of 8 sharing the first two passes.
    """
    num_probes = check_int("num_probes", num_probes)
    gen = check_generator(generator)
    with measurement_mode(model):
        return hutchinson_diagonal(Objective(model, batches, loss_fn, params, dtype).hessian_operator(), num_probes, gen)
