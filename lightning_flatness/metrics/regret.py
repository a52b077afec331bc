"""Mini-batch gradient cosine and regret."""

from __future__ import annotations

from .. import keys
from ..functional import grad_cosine_regret
from .base import FlatnessMetric, MeasurementContext


class GradCosineRegret(FlatnessMetric):
    """How much the mini-batch gradients of the measurement subsample disagree.

    Logs ``flatness/grad_cosine_regret``, the mean ``‖g_j‖(1 − cos(g_i, g_j))`` over ordered
    pairs of mini-batch gradients (the callback's ``batch_size`` sets the mini-batches), and
    ``flatness/grad_cosine``, the mean cosine (:func:`~lightning_flatness.functional.grad_cosine_regret`).
    Needs at least 2 mini-batches. Each with its standard error ``<key>_se`` over the draw of the
    mini-batches (Hoeffding's first-order U-statistic variance). Cost: two gradient passes; the
    first also gives ``∇L``, which it provides to later metrics (``SharedResults.gradient``), the
    second each mini-batch gradient's projection on it (``SharedResults.batch_gradient_dots``).
    """

    name = "grad_cosine_regret"
    provides = ("gradient", "batch_gradient_dots")
    min_batches = 2

    def __init__(self, every_n_epochs: int | None = None) -> None:
        super().__init__(every_n_epochs)
        self.keys = (keys.GRAD_COSINE_REGRET, keys.GRAD_COSINE, keys.se(keys.GRAD_COSINE_REGRET), keys.se(keys.GRAD_COSINE))

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        reg = grad_cosine_regret(ctx.model, ctx.batches, ctx.loss_fn, dtype=ctx.dtype)
        ctx.shared.gradient = reg.gradient
        ctx.shared.batch_gradient_dots = reg.batch_gradient_dots
        return {
            keys.GRAD_COSINE_REGRET: reg.regret, keys.GRAD_COSINE: reg.cosine,
            keys.se(keys.GRAD_COSINE_REGRET): reg.regret_se, keys.se(keys.GRAD_COSINE): reg.cosine_se,
        }  # fmt: skip
