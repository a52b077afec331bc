"""The ratio of flatnesses (F. Huszár, inference.vc blog): how much sharper the mini-batch losses are than their mean."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from .. import keys
from ..functional import flatness_ratio
from ..functional.flatness_ratio import FlatnessRatioResult
from ..validation import check_bool
from .base import FlatnessMetric, MeasurementContext
from .hessian import lanczos_settings, stopping_rule


class FlatnessRatio(FlatnessMetric):
    """``flatness/flatness_ratio``: the mini-batch losses' mean top Hessian eigenvalue over the mean loss's.

    ``R = Σ_b w_b λ_max(H_b) / λ_max(H)`` over the callback's mini-batches ``b`` (weights ``w_b``
    their sample fractions; :func:`~lightning_flatness.functional.flatness_ratio`): ``R ≥ 1``,
    close to 1 when the mini-batch losses are sharp along the same directions as their mean, and
    large when each is sharp along its own. It depends on the callback's ``batch_size`` (a
    smaller mini-batch has a noisier, sharper Hessian). Also logs the numerator,
    ``flatness/batch_top_eig_mean``; each with its standard error over the draw of the
    mini-batches (delta method). Needs at least 2 mini-batches.

    It reads ``λ_max(H)`` and its eigenvector from
    :class:`~lightning_flatness.metrics.HessianEigenvalues` in the same measurement (in the
    defaults; ``SharedResults``) and otherwise computes them (a cold start every measurement).
    Cost: one Lanczos run (and its check) on every mini-batch, started from that eigenvector; a
    product on one mini-batch costs ``1/M`` of one on the subsample, so the mini-batches together
    cost about as many subsample products as ``hessian_top_eig`` itself (``docs/metrics.md``).

    Args:
        tol: ``None`` (default): every Lanczos run stops where its error is ``error_ratio`` times
            the standard error it affects; a float: the relative change-and-residual rule instead
            (as :class:`~lightning_flatness.metrics.HessianEigenvalues`).
        error_ratio: that fraction (in (0, 1]).
        max_iter: Lanczos iteration cap per run.
        cache_chunks: as :class:`~lightning_flatness.metrics.HessianEigenvalues`; per mini-batch,
            its one graph is kept while it fits.
        verify: check each mini-batch's top eigenvalue by a run in the complement of its Ritz
            vector (a start from the mean's eigenvector can miss a mini-batch's own top direction).
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.
    """

    name = "flatness_ratio"
    uses = ("eigenvalues", "eigenvectors")
    min_batches = 2

    def __init__(
        self, tol: float | None = None, error_ratio: float = 0.1, max_iter: int = 100,
        cache_chunks: int | str = "auto", verify: bool = True, every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        self.tol, self.error_ratio, self.max_iter, self.cache_chunks = lanczos_settings(tol, error_ratio, max_iter, cache_chunks)
        self.verify = check_bool("verify", verify)
        values = (keys.FLATNESS_RATIO, keys.BATCH_TOP_EIG_MEAN)
        self.keys = values + tuple(keys.se(k) for k in values)
        self._warned = False  # about a measurement that did not converge

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        shared = ctx.shared
        pair: dict[str, Any] = {}
        if shared.eigenvalues is not None and shared.eigenvectors is not None:
            pair = {"eigenvalue": shared.eigenvalues[0].item(), "eigenvector": shared.eigenvectors[0]}
        result = flatness_ratio(
            ctx.model, ctx.batches, ctx.loss_fn, **pair, **stopping_rule(self.tol, self.error_ratio),
            max_iter=self.max_iter, verify=self.verify, dtype=ctx.dtype, generator=ctx.seed_for(self.name),
            cache_chunks=self.cache_chunks, batch_indices=ctx.batch_indices,
        )  # fmt: skip
        if not result.converged:
            self._warn_unconverged(result)
        out = {
            keys.FLATNESS_RATIO: result.value, keys.se(keys.FLATNESS_RATIO): result.se,
            keys.BATCH_TOP_EIG_MEAN: result.batch_top_eig_mean,
            keys.se(keys.BATCH_TOP_EIG_MEAN): result.batch_top_eig_mean_se,
        }  # fmt: skip
        # A ratio of a non-positive top eigenvalue (NaN) is not logged: no number rather than a meaningless one.
        return {key: v for key, v in out.items() if v == v}

    def _warn_unconverged(self, result: FlatnessRatioResult) -> None:
        """Once per metric: values from an unconverged Lanczos run are logged, but never without a sign."""
        if self._warned:
            return
        self._warned = True
        rank_zero_warn(
            f"FlatnessRatio: a Lanczos run did not converge within max_iter={self.max_iter} products; the logged "
            f"{keys.FLATNESS_RATIO} = {result.value:.4g} uses its current Ritz values (lower bounds of the top "
            "eigenvalues). A cluster at the top of a spectrum converges slowly: raise max_iter, or loosen tol or "
            "error_ratio. Warned once."
        )
