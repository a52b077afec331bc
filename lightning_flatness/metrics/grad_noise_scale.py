"""The gradient noise scale: the critical batch size estimate of McCandlish et al. (2018)."""

from __future__ import annotations

from .. import keys
from ..functional import grad_noise_scale
from .base import FlatnessMetric, MeasurementContext


class GradientNoiseScale(FlatnessMetric):
    """``flatness/grad_noise_scale``: ``B_simple = tr(Σ) / |G|²`` (:func:`~lightning_flatness.functional.grad_noise_scale`).

    The batch size at which the mini-batch gradient's noise equals its signal: training with
    batches much smaller than it is noise-dominated (steps can grow with the batch), much larger
    wastes samples (McCandlish, Kaplan, Amodei et al. 2018). With ``flatness/grad_noise_scale_se``,
    its standard error over the draw of the mini-batches (delta method).

    Cost: nothing beyond a few dot products when ``grad_cosine_regret`` (``∇L`` and the mini-batch
    projections) and ``fisher_trace`` with ``kind="empirical"`` (the per-sample norms) run in the
    same measurement, as in the defaults; otherwise up to three gradient passes (one for each
    missing input). When the subsample does not resolve ``|G|²`` above its noise (the estimate is
    ``<= 0``; typical late in training) the metric fails for that measurement with a message
    saying so (warned once, never a negative noise scale): more ``num_samples`` resolve it.

    Args:
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.
    """

    name = "grad_noise_scale"
    uses = ("gradient", "sample_sq_norms", "batch_gradient_dots")

    def __init__(self, every_n_epochs: int | None = None) -> None:
        super().__init__(every_n_epochs)
        self.keys = (keys.GRAD_NOISE_SCALE, keys.se(keys.GRAD_NOISE_SCALE))

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        shared = ctx.shared
        result = grad_noise_scale(
            ctx.model, ctx.batches, ctx.loss_fn, gradient=shared.gradient, sample_sq_norms=shared.sample_sq_norms,
            batch_gradient_dots=shared.batch_gradient_dots, dtype=ctx.dtype,
        )  # fmt: skip
        if not result.resolved:
            raise ValueError(
                f"the squared gradient norm |G|^2 is estimated at {result.grad_sq_norm:.3g} <= 0 (± "
                f"{result.grad_sq_norm_se:.2g}) beside tr(Sigma) = {result.trace_cov:.3g}: the mean gradient is "
                f"buried in the noise of {result.num_samples} samples, so the noise scale is above what they "
                "resolve; raise num_samples to measure it."
            )
        return {keys.GRAD_NOISE_SCALE: result.value, keys.se(keys.GRAD_NOISE_SCALE): result.se}
