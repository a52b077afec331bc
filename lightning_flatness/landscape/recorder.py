"""The callback's side of the landscape views: when they are due, computing them on rank 0,
and writing them to every logger (images) and to ``<log_dir>/landscape/epoch_<x>.json``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .._logging import EPOCH_AXIS, epoch_axis, is_wandb
from .views import LandscapeViews, compute_views, write_json


class LandscapeWriter:
    """Writes one epoch's views to every logger (call on rank 0 only)."""

    def __init__(self) -> None:
        self._wandb_keys: dict[int, set[str]] = {}

    def write(self, loggers: Sequence[Any], views: LandscapeViews) -> None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        from .plots import images

        pictures = None
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                pictures = pictures if pictures is not None else images(views)
                writer = logger.experiment
                for tag, image in pictures.items():
                    writer.add_image(tag, image, global_step=views.epoch, dataformats="HWC")
                writer.flush()
                write_json(logger.log_dir, views)
            elif is_wandb(logger):
                import wandb

                pictures = pictures if pictures is not None else images(views)
                experiment = logger.experiment
                epoch_axis(experiment, pictures, self._wandb_keys.setdefault(id(experiment), set()))
                experiment.log({**{t: wandb.Image(p, caption=f"epoch {views.epoch}") for t, p in pictures.items()},
                                EPOCH_AXIS: views.epoch})  # fmt: skip
            elif isinstance(logger, CSVLogger):
                write_json(logger.log_dir, views)


@dataclass
class LandscapeOptions:
    """The callback's ``landscape_*`` arguments."""

    every_n_epochs: int = 0  # 0: off; -1: only the final weights; n: measured epochs divisible by n, and the final
    steps: int = 21
    span: float = 1.0
    two_d: bool = False
    steps_2d: int = 15
    eig_span: float = 1.0

    def due(self, x: int, final: bool) -> bool:
        n = self.every_n_epochs
        return n != 0 and (final or (n > 0 and x % n == 0))


class LandscapeRecorder:
    """Computes and logs the views for the callback, on rank 0 only, outside any cross-process context.

    Nothing here calls a collective, so the other ranks go on training (and wait for rank 0 at
    their next gradient all-reduce). Failures follow ``on_error``: warn once and skip, or raise.
    """

    def __init__(self, options: LandscapeOptions, seed: int, on_error: str) -> None:
        self.options, self.seed, self.on_error = options, seed, on_error
        self.views: list[LandscapeViews] = []  # rank 0: every epoch's views, in order
        self.last_x: int | None = None
        self._writer = LandscapeWriter()
        self._warned = False

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
            )  # fmt: skip
            self._writer.write(trainer.loggers, views)
        except Exception as err:  # noqa: BLE001 - a failing view must not stop training
            if self.on_error == "raise":
                raise
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"FlatnessCallback: the loss-landscape views failed and are skipped ({type(err).__name__}: "
                    f'{err}). Further failures are not reported; pass on_error="raise" to stop instead.',
                    stacklevel=2,
                )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        self.views.append(views)
        return views
