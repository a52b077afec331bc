"""The Fisher-Rao norm of the weights (opt-in)."""

from __future__ import annotations

from .. import keys
from ..functional import fisher_rao_norm
from .base import FlatnessMetric, MeasurementContext


class FisherRaoNorm(FlatnessMetric):
    """``flatness/fisher_rao_norm``: ``‖w‖²_fr = (1/N) Σ_i ⟨w, ∇ℓ_i⟩²``, the empirical Fisher's
    quadratic form at the weights (:func:`~lightning_flatness.functional.fisher_rao_norm`).

    Unchanged by a layer rescaling that leaves the function unchanged; for a bias-free ReLU
    network of ``L+1`` layers it equals ``(L+1)² (1/N) Σ_i ⟨∂ℓ_i/∂f, f(x_i)⟩²``.

    Args:
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.

    ``flatness/fisher_rao_norm_se``: the standard error over the draw of the samples
    (per-sample values). Cost: one forward-mode pass over the subsample (about 1.5 gradients on
    the sweep's MLP).
    """

    name = "fisher_rao_norm"

    def __init__(self, every_n_epochs: int | None = None) -> None:
        super().__init__(every_n_epochs)
        self.keys = (keys.FISHER_RAO_NORM, keys.se(keys.FISHER_RAO_NORM))

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        result = fisher_rao_norm(ctx.model, ctx.batches, ctx.loss_fn, dtype=ctx.dtype)
        return {keys.FISHER_RAO_NORM: result.value, keys.se(keys.FISHER_RAO_NORM): result.se}
