"""The trace of the (empirical or Monte Carlo) Fisher information."""

from __future__ import annotations

from .. import keys
from .._failures import ConfigurationError
from ..functional import fisher_trace
from ..functional._losses import LossArg
from ..functional._per_sample import check_per_sample
from ..functional.fisher_trace import KINDS, check_mc_loss, choose_per_sample_path
from ..validation import check_choice, check_int
from .base import FlatnessMetric, MeasurementContext


def per_sample_path_at_start(ctx: MeasurementContext, per_sample: str) -> dict[str, str]:
    """:meth:`FlatnessMetric.on_start` of the metrics built on per-sample norms: the path is chosen once, when
    training starts, and logged as ``<name>.per_sample_path``."""
    path = choose_per_sample_path(ctx.model, ctx.batches, ctx.loss_fn, per_sample=per_sample, dtype=ctx.dtype)
    return {"per_sample_path": path}


class FisherTrace(FlatnessMetric):
    """``flatness/fisher_trace``: the mean squared per-sample gradient norm (:func:`~lightning_flatness.functional.fisher_trace`).

    Args:
        kind: ``"empirical"`` (the data's labels) or ``"mc"`` (labels drawn from the model: the
            true Fisher; the built-in losses only).
        mc_samples: labels drawn per input with ``kind="mc"``.
        per_sample: how per-sample gradients are formed for the parameters ghost norms do not
            cover: ``"auto"`` (``vmap`` where it works, else a loop over samples; tried once per
            model), ``"vmap"`` or ``"loop"`` (see :func:`~lightning_flatness.functional.fisher_trace`).
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.

    With ``flatness/fisher_trace_se``, the standard error over the draw of the samples (per-sample
    values). Cost: about one gradient pass (``mc_samples`` with ``kind="mc"``). With
    ``kind="empirical"`` it provides the per-sample norms to later metrics
    (``SharedResults.sample_sq_norms``: :class:`~lightning_flatness.metrics.GradientNoiseScale`).
    """

    name = "fisher_trace"
    provides = ("sample_sq_norms",)  # with kind="empirical": the noise scale's per-sample norms
    sample_weighted = True

    def __init__(
        self, kind: str = "empirical", mc_samples: int = 1, every_n_epochs: int | None = None, per_sample: str = "auto"
    ) -> None:
        super().__init__(every_n_epochs)
        self.kind = check_choice("kind", kind, KINDS)
        self.mc_samples = check_int("mc_samples", mc_samples)
        self.per_sample = check_per_sample(per_sample)
        self.keys = (keys.FISHER_TRACE, keys.se(keys.FISHER_TRACE))

    def check_setup(self, loss_fn: LossArg, train_size: int | None) -> None:
        if self.kind == "mc":
            try:
                check_mc_loss(loss_fn)
            except ValueError as err:
                raise ConfigurationError(f"FisherTrace: {err}") from err

    def on_start(self, ctx: MeasurementContext) -> dict[str, str]:
        return per_sample_path_at_start(ctx, self.per_sample)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        fis = fisher_trace(
            ctx.model, ctx.batches, ctx.loss_fn, kind=self.kind, num_samples=self.mc_samples,
            generator=ctx.seed_for(self.name), dtype=ctx.dtype, batch_indices=ctx.batch_indices,
            per_sample=self.per_sample,
        )  # fmt: skip
        ctx.shared.sample_sq_norms = fis.sample_sq_norms  # None with kind="mc"
        return {keys.FISHER_TRACE: fis.value, keys.se(keys.FISHER_TRACE): fis.se}
