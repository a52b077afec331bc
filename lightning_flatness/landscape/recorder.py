"""The callback's side of the landscape views: when they are due, computing them on rank 0,
and writing them to every logger (images) and to ``<log_dir>/landscape/epoch_<e>.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .._failures import FailurePolicy
from .._logging import FigureWriter, LogPosition, position
from ..validation import check_bool, check_float, check_int
from .views import LandscapeViews, compute_views, write_json


@dataclass
class LandscapeOptions:
    """Which loss-landscape views the callback logs, and when (``FlatnessCallback(landscape=...)``).

    Args:
        every_n_epochs: ``-1`` (default) only the final weights; ``n`` every measured epoch
            divisible by ``n`` and the final weights; ``0`` off.
        steps: grid points of the 1-D slices (the random direction's and the eigenvector's).
        span: half-width of the filter-normalized slices (1: every filter moved by its own norm).
        two_d: also the 2-D slice, a contour plot on a ``steps_2d x steps_2d`` grid.
        steps_2d: grid points per axis of the 2-D slice.
        eig_span: half-width of the slice along the top Hessian eigenvector (a distance in
            parameter space).
        convexity: also map ``|λ_min/λ_max|`` of the Hessian on the 2-D slice's plane, drawn beside
            it (Li et al. 2018: small where the loss is locally convex); needs ``two_d``. Two
            Lanczos runs per point, each warm-started from the neighbouring point's eigenvectors:
            at most ``2·convexity_max_iter·convexity_steps²`` Hessian-vector products (1960 at the
            defaults), on the measurement subsample.
        convexity_steps: grid points per axis of the map (coarser than ``steps_2d``: each point
            costs two eigenvalue solves, not one forward pass).
        convexity_tol: the map's Lanczos tolerance: ``λ_max`` to about this relative error,
            ``λ_min`` to this times ``λ_max``, so each ratio to about ``convexity_tol``; loose by
            default, as the map is a picture.
        convexity_max_iter: Lanczos products per run at most; points that did not converge are
            marked on the map (and warned about once).
    """

    every_n_epochs: int = -1
    steps: int = 21
    span: float = 1.0
    two_d: bool = False
    steps_2d: int = 15
    eig_span: float = 1.0
    convexity: bool = False
    convexity_steps: int = 7
    convexity_tol: float = 1e-2
    convexity_max_iter: int = 20

    def __post_init__(self) -> None:
        self.every_n_epochs = check_int("every_n_epochs", self.every_n_epochs, -1)
        self.steps = check_int("steps", self.steps, 2)
        self.span = check_float("span", self.span, inclusive=False)
        self.two_d = check_bool("two_d", self.two_d)
        self.steps_2d = check_int("steps_2d", self.steps_2d, 2)
        self.eig_span = check_float("eig_span", self.eig_span, inclusive=False)
        self.convexity = check_bool("convexity", self.convexity)
        if self.convexity and not self.two_d:
            raise ValueError("convexity=True draws the map beside the 2-D slice: set two_d=True as well.")
        self.convexity_steps = check_int("convexity_steps", self.convexity_steps, 2)
        self.convexity_tol = check_float("convexity_tol", self.convexity_tol, inclusive=False, maximum=1.0)
        self.convexity_max_iter = check_int("convexity_max_iter", self.convexity_max_iter, 2)

    def convexity_options(self) -> dict[str, Any] | None:
        """:func:`~lightning_flatness.landscape.compute_views`' ``convexity`` (``None``: no map)."""
        if not self.convexity:
            return None
        return {"steps": self.convexity_steps, "convexity_tol": self.convexity_tol,
                "convexity_max_iter": self.convexity_max_iter}  # fmt: skip

    def due(self, x: int, final: bool) -> bool:
        n = self.every_n_epochs
        return n != 0 and (final or (n > 0 and x % n == 0))


class LandscapeRecorder:
    """Computes and logs the views for the callback, on rank 0 only, outside any cross-process context.

    Nothing here calls a collective, so the other ranks go on training (and wait for rank 0 at
    their next gradient all-reduce). Failures follow the callback's ``on_error`` policy.
    """

    def __init__(self, options: LandscapeOptions, seed: int, failures: FailurePolicy) -> None:
        self.options, self.seed, self.failures = options, seed, failures
        self.views: list[LandscapeViews] = []  # rank 0: every epoch's views, in order
        self.last_x: int | None = None
        self._writer = FigureWriter()
        self._warned = False  # about unconverged points of the convexity map

    def _warn_unconverged(self, views: LandscapeViews) -> None:
        """Once: convexity-map points whose Lanczos runs did not converge (they are marked on the map)."""
        if self._warned or views.convexity_converged is None:
            return
        flags = [ok for row in views.convexity_converged for ok in row]
        if all(flags):
            return
        self._warned = True
        rank_zero_warn(
            f"LandscapeOptions(convexity=True): at {flags.count(False)} of {len(flags)} points of the convexity map "
            f"Lanczos did not converge within convexity_max_iter={self.options.convexity_max_iter} products per run; "
            "their |λ_min/λ_max| is drawn from the current Ritz values and marked with an x. Raise "
            "convexity_max_iter, or loosen convexity_tol. Warned once."
        )

    def _write(self, loggers: Sequence[Any], views: LandscapeViews, at: LogPosition) -> None:
        """The views' images to every logger, their numbers to ``<log_dir>/landscape/epoch_<e>.json``."""
        from .plots import images  # matplotlib only once a figure is drawn

        self._writer.write(loggers, at, lambda: images(views), lambda log_dir: write_json(log_dir, views, at))

    def record(
        self, trainer: Any, model: torch.nn.Module, data: dict, x: int, loss_fn: Any,
        vector: Tensor | None, eigenvalue: float | None, eigen_kwargs: dict,
    ) -> LandscapeViews | None:  # fmt: skip
        self.last_x = x
        if not trainer.is_global_zero:
            return None
        opts = self.options
        try:
            views = compute_views(
                model, data["measure"], data.get("gap_train"), data.get("gap_val"), loss_fn, epoch=x,
                steps=opts.steps, span=opts.span, two_d=opts.two_d, steps_2d=opts.steps_2d, eig_span=opts.eig_span,
                seed=self.seed, vector=vector, eigenvalue=eigenvalue, eigen_kwargs=eigen_kwargs,
                convexity=opts.convexity_options(),
            )  # fmt: skip
            self._warn_unconverged(views)
            self._write(trainer.loggers, views, position(trainer, x))
        except Exception as err:  # noqa: BLE001 - a failing view must not stop training
            self.failures.handle("the loss-landscape views", err)
            return None
        self.views.append(views)
        return views
