"""The most negative Hessian eigenvalue and ``|λ_min/λ_max|`` (Li et al. 2018), warm-started like the top one."""

from __future__ import annotations

from typing import Any, Mapping

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .. import keys
from ..functional import EigenRatioResult, hessian_eigenvalue_ratio
from ..validation import check_bool
from .base import FlatnessMetric, MeasurementContext
from .hessian import lanczos_settings, stopping_rule


class HessianMinEigenvalue(FlatnessMetric):
    """The smallest eigenvalue of the loss Hessian and its ratio to the largest, opt-in.

    Logs ``flatness/hessian_min_eig`` (``λ_min``: negative at a saddle, ≥ 0 where the Hessian is
    positive semi-definite) and ``flatness/hessian_eig_ratio`` (``max(−λ_min, 0)/λ_max``: Li et
    al.'s ``|λ_min/λ_max|``, small where the loss is locally convex), each with its standard
    error ``<key>_se`` over the draw of the mini-batches (the ratio's paired: both values are
    measured on the same mini-batches; :func:`~lightning_flatness.functional.hessian_eigenvalue_ratio`).
    ``λ_max`` is this measurement's top eigenpair when
    :class:`~lightning_flatness.metrics.HessianEigenvalues` runs too (read from
    :class:`~lightning_flatness.metrics.SharedResults`), else solved for here. Each measurement
    starts from the previous one's eigenvectors (``warm_start``; saved in checkpoints).

    Args:
        tol, error_ratio, max_iter, cache_chunks, warm_start, verify: as for
            :class:`~lightning_flatness.metrics.HessianEigenvalues`, for both Lanczos runs; where
            no standard error decides (one mini-batch), ``λ_min`` stops once its residual is
            ``tol·λ_max`` (its own scale may be 0).
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.

    Cost: ``λ_min``'s Lanczos run (one Hessian-vector product per iteration, the check's
    included; a network's bottom is a cluster, slower than its top: 42 products on the tests'
    tiny MLP, 28–54 per measurement on the callback tests' classifier, where the warm start
    barely helped), plus 1 product for the top vector's per-mini-batch quotients when ``λ_max``
    is shared (none with one mini-batch), or else ``λ_max``'s own run (+1 gradient on a cold
    start).

    Example:
        >>> import torch
        >>> from lightning_flatness.metrics import HessianMinEigenvalue, MeasurementContext
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> ctx = MeasurementContext(model=model, batches=batches, loss_fn="cross_entropy", epoch=1, seed=0,
        ...                          num_samples=32)
        >>> row = HessianMinEigenvalue().compute(ctx)
        >>> sorted(row)  # doctest: +NORMALIZE_WHITESPACE
        ['flatness/hessian_eig_ratio', 'flatness/hessian_eig_ratio_se', 'flatness/hessian_min_eig',
         'flatness/hessian_min_eig_se']
        >>> bool(row["flatness/hessian_min_eig"] < 0 < row["flatness/hessian_eig_ratio"])
        True
    """

    name = "hessian_min_eig"
    uses = ("eigenvalues", "eigenvectors", "gradient")

    def __init__(
        self, tol: float | None = None, error_ratio: float = 0.1, max_iter: int = 100, cache_chunks: int | str = "auto",
        warm_start: bool = True, verify: bool = True, every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        self.tol, self.error_ratio, self.max_iter, self.cache_chunks = lanczos_settings(tol, error_ratio, max_iter, cache_chunks)
        self.warm_start = check_bool("warm_start", warm_start)
        self.verify = check_bool("verify", verify)
        values = (keys.HESSIAN_MIN_EIG, keys.HESSIAN_EIG_RATIO)
        self.keys = values + tuple(keys.se(key) for key in values)
        self.vectors: Tensor | None = None  # the last measurement's bottom eigenvector (1, P)
        self.top_vectors: Tensor | None = None  # its own top eigenvector, when none was shared (1, P)
        self._warned = False  # about a measurement that did not converge

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        shared = ctx.shared.eigenvectors is not None and ctx.shared.eigenvalues is not None
        top = (ctx.shared.eigenvalues[0].item(), ctx.shared.eigenvectors[0]) if shared else None
        res = hessian_eigenvalue_ratio(
            ctx.model, ctx.batches, ctx.loss_fn, top=top, init=self._warm(self.vectors, ctx),
            top_init=None if shared else self._warm(self.top_vectors, ctx), generator=ctx.seed_for(self.name),
            cache_chunks=self.cache_chunks, dtype=ctx.dtype, gradient=ctx.shared.gradient,
            max_iter=self.max_iter, verify=self.verify, **stopping_rule(self.tol, self.error_ratio),
        )  # fmt: skip
        if not res.converged:
            self._warn_unconverged(res)
        self.vectors = res.smallest.vectors.detach()
        if not shared:
            self.top_vectors = res.largest.vectors.detach()
        out = {
            keys.HESSIAN_MIN_EIG: res.smallest.values[0].item(), keys.se(keys.HESSIAN_MIN_EIG): res.smallest.se[0].item(),
            keys.HESSIAN_EIG_RATIO: res.ratio, keys.se(keys.HESSIAN_EIG_RATIO): res.se,
        }  # fmt: skip
        # One mini-batch has no spread (se NaN); a Hessian without positive curvature has no ratio (NaN).
        return {key: v for key, v in out.items() if v == v}

    def _warm(self, vectors: Tensor | None, ctx: MeasurementContext) -> Tensor | None:
        """The previous measurement's vectors, unless switched off or the trainable parameters changed."""
        if not self.warm_start or vectors is None:
            return None
        size = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        return vectors if vectors.shape[-1] == size else None

    def _warn_unconverged(self, res: EigenRatioResult) -> None:
        """Once per metric: a value Lanczos did not converge to is logged, but never without a sign."""
        if self._warned:
            return
        self._warned = True
        ends = [name for name, r in (("λ_min", res.smallest), ("λ_max", res.largest)) if not r.converged]
        residual = res.smallest.residuals[0].item() if not res.smallest.converged else res.largest.residuals[0].item()
        rank_zero_warn(
            f"HessianMinEigenvalue: Lanczos did not converge to {' and '.join(ends)} within max_iter={self.max_iter} "
            f"products per run; the logged {keys.HESSIAN_MIN_EIG} and {keys.HESSIAN_EIG_RATIO} use the current Ritz "
            f"value(s), within {residual:.2g} (the residual) of an eigenvalue. The bottom of a network's spectrum "
            "is a dense cluster that converges slowly: raise max_iter, or loosen tol or error_ratio. Warned once."
        )

    def state_dict(self) -> dict[str, Any]:
        def cpu(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.detach().cpu()

        return {"vectors": cpu(self.vectors), "top_vectors": cpu(self.top_vectors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vectors, self.top_vectors = state.get("vectors"), state.get("top_vectors")
