"""The top Hessian eigenvalues, warm-started from the previous measurement's eigenvectors."""

from __future__ import annotations

from typing import Any, Mapping

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .. import keys
from ..functional import hessian_eigenvalues
from ..validation import check_bool, check_cache_chunks, check_float, check_int
from .base import FlatnessMetric, MeasurementContext

# PACGen's diagonal screen uses twice the measured top eigenvalue as the bound on every H_ii:
# Lanczos approaches λ_max from below, and a converged Ritz value under half of it would mean
# the start vector all but missed the top eigenvector.
SCREEN_MARGIN = 2.0
# The change-and-residual rule's tolerance where no standard error is known (one mini-batch), and the check's.
FALLBACK_TOL = 1e-4


def lanczos_settings(
    tol: float | None, error_ratio: float, max_iter: int, cache_chunks: int | str
) -> tuple[float | None, float, int, int | str]:  # fmt: skip
    """``(tol, error_ratio, max_iter, cache_chunks)`` of a Lanczos-based metric, validated: one rule for every
    metric that takes them (each error names the argument and what it accepts)."""
    return (
        None if tol is None else check_float("tol (a relative tolerance, or None)", tol, inclusive=False),
        check_float("error_ratio", error_ratio, inclusive=False, maximum=1.0),
        check_int("max_iter", max_iter),
        check_cache_chunks(cache_chunks),
    )


def stopping_rule(tol: float | None, error_ratio: float) -> dict[str, float | None]:
    """Lanczos' ``tol`` and ``error_ratio`` for a metric's options: ``tol=None`` stops at ``error_ratio`` of the
    standard error (``FALLBACK_TOL`` where there is none); a float keeps the change-and-residual rule alone."""
    if tol is None:
        return {"tol": FALLBACK_TOL, "error_ratio": error_ratio}
    return {"tol": tol, "error_ratio": None}


class HessianEigenvalues(FlatnessMetric):
    """The ``k`` largest eigenvalues of the loss Hessian on the measurement subsample (Lanczos).

    Logs ``flatness/hessian_top_eig`` and, when ``k > 1``, ``flatness/hessian_eig_{j}`` for
    ``j = 1..k``, each with its standard error ``<key>_se`` over the draw of the mini-batches
    (the per-mini-batch Rayleigh quotients of its Ritz vector; no extra products). Each measurement starts from the eigenvectors of the previous one
    (``warm_start``; saved in checkpoints), which after an epoch of training typically
    converges in a few products. It provides the eigenpairs and ``hessian_max = 2·λ_max`` (a
    bound on every ``H_ii`` when Lanczos converged) to later metrics through
    :class:`~lightning_flatness.metrics.SharedResults`.

    Args:
        k: how many of the largest eigenvalues.
        tol: ``None`` (default): Lanczos stops where each value's error bound is ``error_ratio``
            times its standard error (``docs/metrics.md``); a float: the relative tolerance of
            the change-and-residual rule instead, e.g. ``1e-4`` (the rule of earlier releases).
        error_ratio: with ``tol=None``, the error each value may keep, as a fraction of its
            standard error over the draw of the mini-batches: ``0.1`` adds half a percent to the
            total error. With one mini-batch (no standard error) the rule of ``tol=1e-4`` applies.
        max_iter: Lanczos iteration cap (memory: that many flat vectors).
        cache_chunks: whose gradient graphs to keep between products: ``"auto"`` (default) the
            leading mini-batches of this process's shard while the graphs' measured size stays
            within a budget (a quarter of the free CUDA memory, 1 GiB on CPU); an integer, at
            most that many; ``0`` none. A product on a kept mini-batch is one second backward
            pass, about 0.6× the cost of one that rebuilds the graph.
        warm_start: start from the previous measurement's eigenvectors.
        verify: after convergence, run Lanczos again from a Gaussian vector in the complement of
            the converged eigenvectors, to find an eigenvalue they missed: a repeated eigenvalue
            (``k > 1``), or, from a warm start, a top eigenvalue that overtook last epoch's
            (:func:`~lightning_flatness.functional.lanczos`). Costs one more, usually shorter,
            Lanczos run; ``False`` spares it and leaves both unchecked.
        final_k: at the final weights only, the ``final_k`` largest eigenvalues instead of ``k``
            (``None``: ``k``), e.g. ``20`` for the top of the spectrum per run (Yao et al. 2018,
            Figure 3) at the cost of one longer Lanczos run per fit; the per-epoch cost is unchanged.
            Logged as ``flatness/hessian_eig_{j}``, ``j = 1..final_k``, with their standard errors.
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.

    Cost: one Hessian-vector product per Lanczos iteration (+1 gradient on a cold start), the
    check's (``verify``) included.
    """

    name = "hessian_top_eig"
    provides = ("eigenvalues", "eigenvectors", "hessian_max")
    uses = ("gradient",)

    def __init__(
        self, k: int = 1, tol: float | None = None, error_ratio: float = 0.1, max_iter: int = 100,
        cache_chunks: int | str = "auto", warm_start: bool = True, verify: bool = True, final_k: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        self.k = check_int("k", k)
        self.tol, self.error_ratio, self.max_iter, self.cache_chunks = lanczos_settings(tol, error_ratio, max_iter, cache_chunks)
        self.final_k = None if final_k is None else check_int("final_k", final_k, minimum=self.k)
        if self.max_iter < max(self.k, self.final_k or 0):
            raise ValueError(f"max_iter={max_iter} must be >= k={k} and >= final_k={final_k}.")
        self.warm_start = check_bool("warm_start", warm_start)
        self.verify = check_bool("verify", verify)
        most = max(self.k, self.final_k or 0)
        eigs = tuple(keys.hessian_eig(j) for j in range(1, most + 1)) if most > 1 else ()
        values = (keys.HESSIAN_TOP_EIG, *eigs)
        self._se_keys = tuple(keys.se(key) for key in values)
        self.keys = values + self._se_keys
        self.vectors: Tensor | None = None  # the last measurement's eigenvectors (k, P)
        self._warned = False  # about a measurement that did not converge

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        k = self.final_k if ctx.final and self.final_k else self.k
        init = self.vectors if self.warm_start else None
        if init is not None and init.shape[-1] != sum(p.numel() for p in ctx.model.parameters() if p.requires_grad):
            init = None  # the trainable parameters changed (e.g. unfrozen): start afresh
        res = hessian_eigenvalues(
            ctx.model, ctx.batches, ctx.loss_fn, k=k, init=init, generator=ctx.seed_for(self.name),
            cache_chunks=self.cache_chunks, dtype=ctx.dtype,
            gradient=ctx.shared.gradient,  # the regret's, when it ran first: the cold start's pass saved
            **self.solver_options(),
        )  # fmt: skip
        values, errors = res.values.tolist(), res.se.tolist()
        if not res.converged:
            self._warn_unconverged(res)
        self.vectors = res.vectors.detach()
        ctx.shared.eigenvalues, ctx.shared.eigenvectors = res.values, self.vectors
        if res.converged:
            ctx.shared.hessian_max = SCREEN_MARGIN * max(values[0], 0.0)
        out = {keys.HESSIAN_TOP_EIG: values[0], keys.se(keys.HESSIAN_TOP_EIG): errors[0]}
        if k > 1:
            out.update({keys.hessian_eig(j + 1): v for j, v in enumerate(values)})
            out.update({keys.se(keys.hessian_eig(j + 1)): e for j, e in enumerate(errors)})
        # One mini-batch has no spread to measure (se NaN): the values are logged without error bars.
        return {key: v for key, v in out.items() if v == v or key not in self._se_keys}

    def remeasure_at_final(self) -> bool:
        return bool(self.final_k and self.final_k > self.k)

    def solver_options(self) -> dict[str, Any]:
        """The Lanczos options of :func:`~lightning_flatness.functional.hessian_eigenvalues` this metric uses
        (also for the landscape's eigenvector)."""
        return {**stopping_rule(self.tol, self.error_ratio), "max_iter": self.max_iter, "verify": self.verify}

    def _warn_unconverged(self, res: Any) -> None:
        """Once per metric: a value Lanczos did not converge to is logged, but never without a sign."""
        if self._warned:
            return
        self._warned = True
        rank_zero_warn(
            f"HessianEigenvalues: Lanczos did not converge within max_iter={self.max_iter} products per run "
            f"({self._rule()}); the logged {keys.HESSIAN_TOP_EIG} = {res.values[0].item():.4g} is the current Ritz "
            f"value, a lower bound within {res.residuals[0].item():.2g} (its residual) of an eigenvalue. A cluster "
            "at the top of the spectrum converges slowly: raise max_iter, or loosen tol or error_ratio. Warned once."
        )

    def _rule(self) -> str:
        return f"tol={self.tol}" if self.tol is not None else f"error_ratio={self.error_ratio} of the standard error"

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": None if self.vectors is None else self.vectors.detach().cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vectors = state.get("vectors")
