"""Average-case adaptive sharpness: the reparametrization-invariant sharpness (opt-in)."""

from __future__ import annotations

from .. import keys
from ..functional import adaptive_sharpness, without_normalization
from ..functional.adaptive_sharpness import checked_options
from ..validation import check_bool
from .base import FlatnessMetric, MeasurementContext


class AdaptiveSharpness(FlatnessMetric):
    """``flatness/adaptive_sharpness``: ``E_δ[L(w + (|w|+η)⊙δ)] - L(w)``, ``δ ~ N(0, ρ²I)``
    (:func:`~lightning_flatness.functional.adaptive_sharpness`).

    Unchanged when a ReLU layer is scaled by ``α`` and the next by ``1/α`` (with ``eta=0``),
    unlike the top Hessian eigenvalue.

    Args:
        rho: the relative perturbation scale ``ρ`` (Andriushchenko et al. 2023 use 0.05-0.4).
        num_draws: perturbed loss passes (even with ``antithetic``: ``num_draws / 2`` pairs).
        antithetic: draw ``(δ, -δ)`` pairs, which cancel the gradient's term exactly.
        eta: ASAM's offset: perturbation scale ``|w| + eta`` (``0``: exactly invariant).
        exclude_normalization: leave the parameters of normalization layers unperturbed.
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.

    ``flatness/adaptive_sharpness_se`` covers both the Monte-Carlo draws and the draw of the
    subsample (two-way crossed design). Cost: ``num_draws + 1`` forward passes over the
    subsample, no backward pass (8.5 gradients at 16 draws on the sweep's MLP).
    """

    name = "adaptive_sharpness"

    def __init__(
        self, rho: float = 0.1, num_draws: int = 16, antithetic: bool = True, eta: float = 0.0,
        exclude_normalization: bool = False, every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        opts = checked_options(rho, num_draws, antithetic, eta)
        self.rho, self.num_draws = opts["rho"], opts["num_draws"]
        self.antithetic, self.eta = opts["antithetic"], opts["eta"]
        self.exclude_normalization = check_bool("exclude_normalization", exclude_normalization)
        self.keys = (keys.ADAPTIVE_SHARPNESS, keys.se(keys.ADAPTIVE_SHARPNESS))

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        result = adaptive_sharpness(
            ctx.model, ctx.batches, ctx.loss_fn, rho=self.rho, num_draws=self.num_draws, antithetic=self.antithetic,
            eta=self.eta, generator=ctx.seed_for(self.name), dtype=ctx.dtype,
            params=without_normalization(ctx.model) if self.exclude_normalization else None,
        )  # fmt: skip
        return {keys.ADAPTIVE_SHARPNESS: result.value, keys.se(keys.ADAPTIVE_SHARPNESS): result.se}
