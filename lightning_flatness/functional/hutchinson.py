"""Hutchinson estimators of the Hessian trace and diagonal (Hutchinson 1989; Bekas et al. 2007)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from ._losses import LossArg
from ._objective import Objective
from ._restore import measurement_mode
from ._validate import check_positive_int, make_generator, rademacher

# Probes evaluated together share one forward and one first backward pass per chunk.
PROBE_BLOCK = 8


@dataclass(frozen=True)
class TraceResult:
    """``value`` = estimate of ``tr ∇²L``, ``stderr`` = its standard error."""

    value: float
    stderr: float
    n_hvp: int


def probe_products(objective: Objective, num_probes: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(Z, H Z)`` blocks of Rademacher probes ``Z`` (rows) and their Hessian products."""
    remaining = num_probes
    while remaining > 0:
        block = min(PROBE_BLOCK, remaining)
        z = rademacher(block, objective.num_params, generator, objective.w0)
        yield z, objective.hvps(z)
        remaining -= block


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
    r"""Hutchinson estimate of :math:`\operatorname{tr}\nabla^2 L(w)`.

    :math:`\hat t = \frac1S\sum_{s=1}^S z_s^\top H z_s` with Rademacher probes
    :math:`z_s \in \{\pm1\}^P`; unbiased, with variance :math:`2\sum_{i\ne j}H_{ij}^2 / S`
    (the smallest among probe distributions with i.i.d. entries). ``stderr`` is the sample
    standard deviation of the ``S`` terms over :math:`\sqrt S` (0 when ``S = 1``).
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
    num_probes = check_positive_int("num_probes", num_probes)
    gen = make_generator(generator)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        terms = torch.cat([(z * hz).sum(1) for z, hz in probe_products(objective, num_probes, gen)])
    value = terms.mean().item()
    stderr = terms.std().item() / math.sqrt(num_probes) if num_probes > 1 else 0.0
    return TraceResult(value, stderr, num_probes)


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
    r"""Hutchinson estimate of :math:`\operatorname{diag}\nabla^2 L(w)` as a flat ``(P,)`` tensor.

    :math:`\hat d = \frac1S\sum_s z_s \odot H z_s` with Rademacher :math:`z_s`; unbiased
    because :math:`E[z_i z_j] = \delta_{ij}`, with per-entry variance
    :math:`\sum_{j\ne i} H_{ij}^2 / S` (Bekas, Kokiopoulou & Saad 2007). Cost: ``num_probes``
    Hessian-vector products, in blocks of 8 sharing the first two passes.
    """
    num_probes = check_positive_int("num_probes", num_probes)
    gen = make_generator(generator)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        return diagonal_estimate(objective, num_probes, gen)


def diagonal_estimate(objective: Objective, num_probes: int, generator: torch.Generator) -> Tensor:
    total = torch.zeros_like(objective.w0)
    for z, hz in probe_products(objective, num_probes, generator):
        total += (z * hz).sum(0)
    return total / num_probes
