"""Standard errors of (weighted) means of per-sample or per-mini-batch values, in one pass.

Every sampled quantity here is a weighted mean ``θ = Σ_b w_b x_b / Σ_b w_b`` over units ``b``
(samples, or mini-batches with ``w_b`` their sample counts). Redrawing the units, its variance
is estimated by the ratio (batch-means) estimator

    Var(θ) ≈ M / (M - 1) · Σ_b w_b² (x_b - θ)² / (Σ_b w_b)²,

which for equal weights is the familiar ``s² / M``. It needs only six sums, which add over
chunks and over processes, so the error bar costs no memory that grows with the data and
equals the single-process one under DDP.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


def renamed_field(new: str, old: str) -> property:
    """A read-only ``old`` attribute that returns ``new`` with a ``FutureWarning``.

    Every result names a standard error ``se`` (that of its ``value``) or ``<field>_se``; the
    older ``stderr`` spellings keep working for one release through this.
    """

    def get(self: Any) -> Any:  # noqa: ANN401
        warnings.warn(f"{type(self).__name__}.{old} is deprecated and will be removed in the next release; "
                      f"use .{new} (every result names its standard errors se or <field>_se).",
                      FutureWarning, stacklevel=2)  # fmt: skip
        return getattr(self, new)

    return property(get, doc=f"Deprecated: :attr:`{new}`.")


class MeanAccumulator:
    """Running sums for the mean and standard error of ``K`` quantities over weighted units."""

    def __init__(self, num: int = 1, device: torch.device | str = "cpu") -> None:
        # rows: units, Σw, Σw·x, Σw², Σw²·x, Σw²·x²  (float64)
        self.sums = torch.zeros(6, num, dtype=torch.float64, device=device)

    def add(self, values: Tensor, weights: Tensor | None = None) -> None:
        """Add units: ``values`` ``(U,)`` or ``(U, K)``, ``weights`` ``(U,)`` (default 1 each)."""
        x = values.detach().to(torch.float64).reshape(values.shape[0], -1).to(self.sums.device)
        w = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
        if weights is not None:
            w = weights.detach().to(x).reshape(-1, 1)
        w2 = w * w
        terms = torch.stack([torch.ones_like(x), w.expand_as(x), w * x, w2.expand_as(x), w2 * x, w2 * x * x])
        self.sums += terms.sum(1)

    def result(self, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
        """``(mean, standard error)`` per quantity, the sums first combined with ``reduce`` (over processes).

        The error is NaN with fewer than two units.
        """
        sums = self.sums if reduce is None else reduce(self.sums.clone())
        units, w, wx, w2, w2x, w2x2 = sums
        mean = wx / w
        spread = (w2x2 - 2 * mean * w2x + mean * mean * w2).clamp_min(0)  # Σ w²(x - θ)²
        var = units / (units - 1) * spread / (w * w)
        return mean, torch.where(units > 1, var.sqrt(), torch.full_like(var, math.nan))


def mean_and_se(values: Tensor, weights: Tensor | None = None, reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """:class:`MeanAccumulator` in one call: ``(mean, se)`` of ``values`` ``(U,)`` or ``(U, K)``."""
    acc = MeanAccumulator(values[0].numel() if values.dim() > 1 else 1, values.device)
    acc.add(values, weights)
    return acc.result(reduce)
