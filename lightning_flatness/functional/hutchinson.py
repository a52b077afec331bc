"""Hutchinson estimators of the Hessian trace and diagonal (Hutchinson 1989; Bekas et al. 2007)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from ._losses import LossArg
from .objective import Objective
from .operator import CurvatureOperator
from ._restore import measurement_mode
from ._stats import renamed_field
from ..validation import check_generator, check_int

# Probes evaluated together share one forward and one first backward pass per chunk.
PROBE_BLOCK = 8


@dataclass(frozen=True)
class TraceResult:
    """``value`` = estimate of ``tr ∇²L``, ``se`` = its standard error (``stderr``: deprecated)."""

    value: float
    se: float
    n_hvp: int

    stderr = renamed_field("se", "stderr")


def rademacher(num: int, dim: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """``(num, dim)`` independent ±1 entries, drawn on the CPU, returned like ``like``."""
    z = torch.randint(0, 2, (num, dim), generator=generator, dtype=torch.int8)
    return (2 * z - 1).to(device=like.device, dtype=like.dtype)


def probe_products(operator: CurvatureOperator, num_probes: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(Z, A Z)`` as rows: blocks of Rademacher probes ``Z`` ``(K, P)`` and their products."""
    like = torch.empty(0, dtype=operator.dtype, device=operator.device)
    remaining = num_probes
    while remaining > 0:
        block = min(PROBE_BLOCK, remaining)
        z = rademacher(block, operator.num_params, generator, like)
        yield z, (operator @ z.T).T
        remaining -= block


def hutchinson_trace(
    operator: CurvatureOperator, num_probes: int = 64, generator: torch.Generator | int | None = None
) -> TraceResult:
    r"""Hutchinson estimate of :math:`\operatorname{tr} A` for any symmetric ``operator``.

    :math:`\hat t = \frac1S\sum_{s=1}^S z_s^\top A z_s` with Rademacher probes
    :math:`z_s \in \{\pm1\}^P`; unbiased, with variance :math:`2\sum_{i\ne j}A_{ij}^2 / S`
    (the smallest among probe distributions with i.i.d. entries). ``se`` is the sample
    standard deviation of the ``S`` terms over :math:`\sqrt S` (0 when ``S = 1``). Cost:
    ``num_probes`` products, in blocks of 8 columns.
    """
    num_probes = check_int("num_probes", num_probes)
    gen = check_generator(generator)
    terms = torch.cat([(z * az).sum(1) for z, az in probe_products(operator, num_probes, gen)])
    se = terms.std().item() / math.sqrt(num_probes) if num_probes > 1 else 0.0
    return TraceResult(terms.mean().item(), se, num_probes)


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
) -> TraceResult:
    r"""Hutchinson estimate of :math:`\operatorname{tr}\nabla^2 L(w)` (:func:`hutchinson_trace` of the Hessian).

    Cost: ``num_probes`` Hessian-vector products; probes are evaluated in blocks of 8 that
    share the forward and first backward pass of each chunk.

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
    with measurement_mode(model):
        return hutchinson_trace(Objective(model, batches, loss_fn, params, dtype).hessian_operator(), num_probes, gen)


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
