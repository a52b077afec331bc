"""The gradient noise scale: the critical batch size estimate of McCandlish et al. (2018)."""

from __future__ import annotations

import warnings

from .. import keys
from ..functional import grad_noise_scale
from ..functional._per_sample import check_per_sample
from ..functional.grad_noise_scale import GradNoiseScaleResult
from .base import FlatnessMetric, MeasurementContext
from .fisher import per_sample_path_at_start


class GradientNoiseScale(FlatnessMetric):
    """``flatness/grad_noise_scale``: ``B_simple = tr(Σ) / |G|²`` (:func:`~lightning_flatness.functional.grad_noise_scale`).

    The batch size at which the mini-batch gradient's noise equals its signal: training with
    batches much smaller than it is noise-dominated (steps can grow with the batch), much larger
    wastes samples (McCandlish, Kaplan, Amodei et al. 2018). With ``flatness/grad_noise_scale_se``,
    its standard error over the draw of the mini-batches (delta method).

    Cost: a few dot products (about 0.05 gradient of the subsample) when ``grad_cosine_regret``
    (``∇L`` and the mini-batch projections) and ``fisher_trace`` with ``kind="empirical"`` (the
    per-sample norms) run in the same measurement, as in the defaults; otherwise up to three
    gradient passes, one for each missing input. When the subsample does not resolve ``|G|²``
    above its noise (its unbiased estimate is ``<= 0``, as when the noise scale is far above
    ``num_samples``) nothing is logged at that measurement, never a negative or infinite noise
    scale, and a warning says so once: a larger ``num_samples`` resolves it.

    Args:
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.
        per_sample: how its own per-sample norms are formed, when ``fisher_trace`` does not provide
            them: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :class:`~lightning_flatness.metrics.FisherTrace`).
    """

    name = "grad_noise_scale"
    uses = ("gradient", "sample_sq_norms", "batch_gradient_dots")

    def __init__(self, every_n_epochs: int | None = None, per_sample: str = "auto") -> None:
        super().__init__(every_n_epochs)
        self.per_sample = check_per_sample(per_sample)
        self.keys = (keys.GRAD_NOISE_SCALE, keys.se(keys.GRAD_NOISE_SCALE))
        self._warned = False

    def on_start(self, ctx: MeasurementContext) -> dict[str, str]:
        return per_sample_path_at_start(ctx, self.per_sample)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        shared = ctx.shared
        result = grad_noise_scale(
            ctx.model, ctx.batches, ctx.loss_fn, gradient=shared.gradient, sample_sq_norms=shared.sample_sq_norms,
            batch_gradient_dots=shared.batch_gradient_dots, dtype=ctx.dtype, per_sample=self.per_sample,
        )  # fmt: skip
        if not result.resolved:  # no value rather than a negative or infinite one; said once
            if not self._warned:
                self._warned = True
                warnings.warn(_unresolved(result, ctx.epoch), stacklevel=2)
            return {}
        out = {keys.GRAD_NOISE_SCALE: result.value}
        if result.se == result.se:  # NaN on one mini-batch: no spread to measure, so no error bar
            out[keys.se(keys.GRAD_NOISE_SCALE)] = result.se
        return out


def _unresolved(result: GradNoiseScaleResult, epoch: int) -> str:
    return (
        f"GradientNoiseScale: at epoch {epoch} the squared gradient norm |G|^2 is estimated at "
        f"{result.grad_sq_norm:.3g} <= 0 (± {result.grad_sq_norm_se:.2g}) beside tr(Sigma) = {result.trace_cov:.3g}: "
        f"the mean gradient is buried in the noise of {result.num_samples} samples, so the noise scale is above what "
        "they resolve and is not logged at such measurements (warned once); a larger num_samples resolves it."
    )
