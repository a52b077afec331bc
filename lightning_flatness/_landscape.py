"""Loss-landscape views for :class:`~lightning_flatness.FlatnessCallback` and the report.

At the epochs chosen by ``landscape_every_n_epochs`` the callback computes, on rank 0 only:

- the **1-D slice** ``L(w + a·d)`` along one filter-normalized Gaussian direction ``d``
  (:func:`~lightning_flatness.functional.loss_landscape`, Li et al. 2018) on the measurement
  subsample; the raw direction comes from a fixed seed, so it is the same at every epoch and in
  every run of the same architecture (its filter normalization follows the current weights);
- optionally the **2-D slice** ``L(w + a·d₁ + b·d₂)`` (a contour plot);
- the **eigenvector slice** ``L(w + a·v)``, ``v`` the unit top Hessian eigenvector (the one the
  callback just computed for ``flatness/hessian_top_eig``, so no extra Hessian-vector products;
  computed afresh only when that metric is not measured or failed), on the train and on the
  validation subsamples of the gap (Yao et al. 2018).

They go to TensorBoard as images (``add_image``: the figure rendered with matplotlib's Agg
canvas, no pyplot) under ``landscape/1d``, ``landscape/2d``, ``landscape/eigenvector`` at
``step = epoch``, to W&B as ``wandb.Image`` under the same keys with an ``epoch`` value, and
numerically to ``<log_dir>/landscape/epoch_<epoch>.json`` for every TensorBoard and CSV logger
(``log_dir`` = the directory of the run's event files / ``metrics.csv``). The JSON file is what
``lightning-flatness report`` reads back; see :func:`views_to_json` for its fields.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .functional import eigenvector_slice, hessian_eigenvalues, loss_landscape

FORMAT = "lightning-flatness/landscape"
VERSION = 1
SUBDIR = "landscape"
TAGS = ("landscape/1d", "landscape/2d", "landscape/eigenvector")
_FILE = re.compile(r"epoch_(\d+)\.json")


@dataclass
class LandscapeViews:
    """The numbers behind one epoch's views (lists of floats; NaN where a loss was not finite)."""

    epoch: int
    coordinates: list[float]
    loss_1d: list[float]
    accuracy_1d: list[float] | None = None
    coordinates_2d: list[float] | None = None
    loss_2d: list[list[float]] | None = None
    eig_coordinates: list[float] | None = None
    eig_train_loss: list[float] | None = None
    eig_val_loss: list[float] | None = None
    eigenvalue: float | None = None
    normalization: str = "filter"
    seed: int = 0
    n_forward: int = 0
    seconds: float = 0.0


def _floats(t: Any) -> Any:
    if t is None:
        return None
    if isinstance(t, Tensor):
        t = t.tolist()
    if isinstance(t, list):
        return [_floats(v) for v in t]
    return float(t)


def views_to_json(views: LandscapeViews) -> dict:
    """The JSON object written per landscape epoch (non-finite numbers as ``null``).

    ``{"format": "lightning-flatness/landscape", "version": 1, "epoch", "normalization", "seed",
    "n_forward", "seconds", "slice_1d": {"coordinates", "loss", "accuracy"|null},
    "slice_2d": {"coordinates", "loss" (rows = first direction)}|null,
    "eigenvector": {"coordinates", "train_loss", "val_loss"|null, "eigenvalue"|null}|null}``.
    """

    def clean(v: Any) -> Any:
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v if v is None or math.isfinite(v) else None

    eig = None
    if views.eig_coordinates is not None:
        eig = {"coordinates": views.eig_coordinates, "train_loss": clean(views.eig_train_loss),
               "val_loss": clean(views.eig_val_loss), "eigenvalue": clean(views.eigenvalue)}  # fmt: skip
    two_d = None
    if views.loss_2d is not None:
        two_d = {"coordinates": views.coordinates_2d, "loss": clean(views.loss_2d)}
    return {
        "format": FORMAT, "version": VERSION, "epoch": views.epoch, "normalization": views.normalization,
        "seed": views.seed, "n_forward": views.n_forward, "seconds": views.seconds,
        "slice_1d": {"coordinates": views.coordinates, "loss": clean(views.loss_1d),
                     "accuracy": clean(views.accuracy_1d)},
        "slice_2d": two_d, "eigenvector": eig,
    }  # fmt: skip


def views_from_json(obj: dict) -> LandscapeViews:
    def nan(v: Any) -> Any:
        if isinstance(v, list):
            return [nan(x) for x in v]
        return math.nan if v is None else float(v)

    if obj.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    one, two, eig = obj["slice_1d"], obj.get("slice_2d"), obj.get("eigenvector")
    return LandscapeViews(
        epoch=int(obj["epoch"]), coordinates=nan(one["coordinates"]), loss_1d=nan(one["loss"]),
        accuracy_1d=None if one.get("accuracy") is None else nan(one["accuracy"]),
        coordinates_2d=None if two is None else nan(two["coordinates"]),
        loss_2d=None if two is None else nan(two["loss"]),
        eig_coordinates=None if eig is None else nan(eig["coordinates"]),
        eig_train_loss=None if eig is None else nan(eig["train_loss"]),
        eig_val_loss=None if eig is None or eig.get("val_loss") is None else nan(eig["val_loss"]),
        eigenvalue=None if eig is None or eig.get("eigenvalue") is None else float(eig["eigenvalue"]),
        normalization=obj.get("normalization", "filter"), seed=int(obj.get("seed", 0)),
        n_forward=int(obj.get("n_forward", 0)), seconds=float(obj.get("seconds", 0.0)),
    )  # fmt: skip


def write_json(log_dir: str | Path, views: LandscapeViews) -> Path:
    folder = Path(log_dir) / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch_{views.epoch:06d}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(views_to_json(views)))
    tmp.replace(path)  # a reader never sees half a file
    return path


def read_final(run_dir: str | Path) -> LandscapeViews | None:
    """The views of the latest epoch under ``run_dir/landscape/`` (None if none is readable)."""
    files = sorted(((int(m.group(1)), p) for p in (Path(run_dir) / SUBDIR).glob("epoch_*.json")
                    if (m := _FILE.fullmatch(p.name))), reverse=True)  # fmt: skip
    for _, path in files:
        try:
            return views_from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ------------------------------------------------------------------------- computing
def _canonical_sign(v: Tensor) -> Tensor:
    """An eigenvector's sign is arbitrary: make its largest-magnitude entry positive (stable plots)."""
    return v if v[v.abs().argmax()] >= 0 else -v


def compute_views(
    model: torch.nn.Module,
    measure: Sequence[Any],
    train: Sequence[Any] | None,
    val: Sequence[Any] | None,
    loss_fn: Any,
    *,
    epoch: int,
    steps: int,
    span: float,
    two_d: bool,
    steps_2d: int,
    eig_span: float,
    seed: int,
    vector: Tensor | None = None,
    eigenvalue: float | None = None,
    eigen_kwargs: dict | None = None,
) -> LandscapeViews:
    """1-D (and 2-D) filter-normalized slices on ``measure``; eigenvector slice on ``train`` and ``val``."""
    start = time.perf_counter()
    one = loss_landscape(model, measure, loss_fn, directions=1, span=span, steps=steps, seed=seed)
    views = LandscapeViews(epoch=epoch, coordinates=_floats(one.coordinates[0]), loss_1d=_floats(one.losses),
                           accuracy_1d=_floats(one.accuracy), seed=seed, n_forward=one.n_forward,
                           eigenvalue=None if vector is None else eigenvalue)  # fmt: skip
    if two_d:
        two = loss_landscape(model, measure, loss_fn, directions=2, span=span, steps=steps_2d, seed=seed)
        views.coordinates_2d, views.loss_2d = _floats(two.coordinates[0]), _floats(two.losses)
        views.n_forward += two.n_forward
    if vector is None:
        eig = hessian_eigenvalues(model, measure, loss_fn, k=1, generator=seed, **(eigen_kwargs or {}))
        vector, views.eigenvalue = eig.vectors[0], float(eig.values[0])
    vector = _canonical_sign(vector.detach().reshape(-1))
    ev = eigenvector_slice(model, train if train is not None else measure, loss_fn, val_batches=val, vector=vector,
                           span=eig_span, steps=steps)  # fmt: skip
    views.eig_coordinates, views.eig_train_loss = _floats(ev.coordinates), _floats(ev.train_losses)
    views.eig_val_loss = _floats(ev.val_losses)
    views.n_forward += ev.n_forward
    views.seconds = time.perf_counter() - start
    return views


# -------------------------------------------------------------------------- logging
def _is_wandb(logger: Any) -> bool:  # noqa: ANN401
    from ._logging import _is_wandb as check

    return check(logger)


class LandscapeWriter:
    """Writes one epoch's views to every logger (call on rank 0 only)."""

    def __init__(self) -> None:
        self._wandb_keys: dict[int, set[str]] = {}

    def write(self, loggers: Sequence[Any], views: LandscapeViews) -> None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        from ._landscape_plots import images

        pictures = None
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                pictures = pictures if pictures is not None else images(views)
                writer = logger.experiment
                for tag, image in pictures.items():
                    writer.add_image(tag, image, global_step=views.epoch, dataformats="HWC")
                writer.flush()
                write_json(logger.log_dir, views)
            elif _is_wandb(logger):
                import wandb

                pictures = pictures if pictures is not None else images(views)
                experiment = logger.experiment
                known = self._wandb_keys.setdefault(id(experiment), set())
                for tag in sorted(set(pictures) - known):  # exact keys beat Lightning's "*" glob
                    if hasattr(experiment, "define_metric"):
                        experiment.define_metric(tag, step_metric="epoch")
                    known.add(tag)
                experiment.log({**{t: wandb.Image(p, caption=f"epoch {views.epoch}") for t, p in pictures.items()},
                                "epoch": views.epoch})  # fmt: skip
            elif isinstance(logger, CSVLogger):
                write_json(logger.log_dir, views)


@dataclass
class LandscapeOptions:
    """The callback's ``landscape_*`` arguments (validated in ``_config.py``)."""

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
