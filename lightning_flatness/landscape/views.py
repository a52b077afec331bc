"""Loss-landscape views for :class:`~lightning_flatness.FlatnessCallback` and the report.

At the epochs chosen by ``landscape_every_n_epochs`` the callback computes, on rank 0 only:

- the **1-D slice** ``L(w + a·d)`` along one filter-normalized Gaussian direction ``d``
  (:func:`~lightning_flatness.functional.loss_landscape`, Li et al. 2018) on the measurement
  subsample; the raw direction comes from a fixed seed, so it is the same at every epoch and in
  every run of the same architecture (its filter normalization follows the current weights);
- optionally the **2-D slice** ``L(w + a·d₁ + b·d₂)`` (a contour plot), and beside it, also
  optionally, the **convexity map** ``|λ_min/λ_max|`` of the Hessian on the same plane (a heat map
  on a coarser grid; Li et al. 2018, two loose Lanczos runs per point);
- the **eigenvector slice** ``L(w + a·v)``, ``v`` the unit top Hessian eigenvector (the one the
  callback just computed for ``flatness/hessian_top_eig``, so no extra Hessian-vector products;
  computed afresh only when that metric is not measured or failed), on the train and on the
  validation subsamples of the gap (Yao et al. 2018).

They go to TensorBoard as images (``add_image``: the figure rendered with matplotlib's Agg
canvas, no pyplot) under ``landscape/1d``, ``landscape/2d``, ``landscape/eigenvector`` at the
step of the measurement's row, to W&B as ``wandb.Image`` under the same keys with its ``epoch``
value (``_logging.LogPosition``), and numerically to ``<log_dir>/landscape/epoch_<e>.json``
(``e``: Lightning's epoch index, ``-1`` at initialization) for every TensorBoard and CSV logger
(``log_dir`` = the directory of the run's event files / ``metrics.csv``). The JSON file is what
``lightning-flatness report`` reads back; see :func:`views_to_json` for its fields.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .._logging import LogPosition, epochs_completed_of, read_latest_epoch_json, write_epoch_json
from ..functional import LandscapeResult, eigenvector_slice, hessian_eigenvalues, loss_landscape

FORMAT = "lightning-flatness/landscape"
VERSION = 2  # 2: "epoch" is Lightning's epoch index, "epochs_completed" the callback's x (1: epochs completed)
SUBDIR = "landscape"


@dataclass
class LandscapeViews:
    """The numbers behind one measurement's views (lists of floats; NaN where a loss was not finite);
    ``epoch``: the epochs completed (0: the initialization)."""

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
    convexity_coordinates: list[float] | None = None
    convexity_ratio: list[list[float]] | None = None  # |λ_min/λ_max| on the 2-D slice's plane (rows: direction 1)
    convexity_converged: list[list[bool]] | None = None
    n_hvp: int = 0  # Hessian-vector products the views made (the convexity map's; an eigenvector solve's)


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

    ``{"format": "lightning-flatness/landscape", "version": 2, "epochs_completed", "normalization", "seed",
    "n_forward", "seconds", "slice_1d": {"coordinates", "loss", "accuracy"|null},
    "slice_2d": {"coordinates", "loss" (rows = first direction)}|null,
    "eigenvector": {"coordinates", "train_loss", "val_loss"|null, "eigenvalue"|null}|null,
    "convexity": {"coordinates", "ratio" (|λ_min/λ_max|, rows = first direction), "converged"}|null, "n_hvp"}``
    (``convexity`` and ``n_hvp`` are absent from files written before them).
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
    convexity = None
    if views.convexity_ratio is not None:
        convexity = {"coordinates": views.convexity_coordinates, "ratio": clean(views.convexity_ratio),
                     "converged": views.convexity_converged}  # fmt: skip
    return {
        "format": FORMAT, "version": VERSION, "epochs_completed": views.epoch, "normalization": views.normalization,
        "seed": views.seed, "n_forward": views.n_forward, "n_hvp": views.n_hvp, "seconds": views.seconds,
        "slice_1d": {"coordinates": views.coordinates, "loss": clean(views.loss_1d),
                     "accuracy": clean(views.accuracy_1d)},
        "slice_2d": two_d, "eigenvector": eig, "convexity": convexity,
    }  # fmt: skip


def views_from_json(obj: dict) -> LandscapeViews:
    def nan(v: Any) -> Any:
        if isinstance(v, list):
            return [nan(x) for x in v]
        return math.nan if v is None else float(v)

    if obj.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    one, two, eig, convex = obj["slice_1d"], obj.get("slice_2d"), obj.get("eigenvector"), obj.get("convexity")
    return LandscapeViews(
        epoch=epochs_completed_of(obj), coordinates=nan(one["coordinates"]), loss_1d=nan(one["loss"]),
        accuracy_1d=None if one.get("accuracy") is None else nan(one["accuracy"]),
        coordinates_2d=None if two is None else nan(two["coordinates"]),
        loss_2d=None if two is None else nan(two["loss"]),
        eig_coordinates=None if eig is None else nan(eig["coordinates"]),
        eig_train_loss=None if eig is None else nan(eig["train_loss"]),
        eig_val_loss=None if eig is None or eig.get("val_loss") is None else nan(eig["val_loss"]),
        eigenvalue=None if eig is None or eig.get("eigenvalue") is None else float(eig["eigenvalue"]),
        normalization=obj.get("normalization", "filter"), seed=int(obj.get("seed", 0)),
        n_forward=int(obj.get("n_forward", 0)), seconds=float(obj.get("seconds", 0.0)),
        convexity_coordinates=None if convex is None else nan(convex["coordinates"]),
        convexity_ratio=None if convex is None else nan(convex["ratio"]),
        convexity_converged=None if convex is None else convex["converged"], n_hvp=int(obj.get("n_hvp", 0)),
    )  # fmt: skip


def write_json(log_dir: str | Path, views: LandscapeViews, at: LogPosition) -> Path:
    """``<log_dir>/landscape/epoch_<e>.json`` with the views' numbers and their position (``epoch``, ``step``)."""
    return write_epoch_json(log_dir, SUBDIR, at, views_to_json(views))


def read_final(run_dir: str | Path) -> LandscapeViews | None:
    """The views of the latest epoch under ``run_dir/landscape/`` (None if none is readable)."""
    return read_latest_epoch_json(run_dir, SUBDIR, views_from_json)


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
    convexity: dict[str, Any] | None = None,
) -> LandscapeViews:
    """1-D (and 2-D) filter-normalized slices on ``measure``; eigenvector slice on ``train`` and ``val``.

    ``convexity``: ``{"steps", "convexity_tol", "convexity_max_iter"}`` to map ``|λ_min/λ_max|`` on the 2-D
    slice's plane (:func:`~lightning_flatness.functional.loss_landscape`'s ``convexity``), or ``None``.
    """
    start = time.perf_counter()
    one = loss_landscape(model, measure, loss_fn, directions=1, span=span, steps=steps, seed=seed)
    views = LandscapeViews(epoch=epoch, coordinates=_floats(one.coordinates[0]), loss_1d=_floats(one.losses),
                           accuracy_1d=_floats(one.accuracy), seed=seed, n_forward=one.n_forward,
                           eigenvalue=None if vector is None else eigenvalue)  # fmt: skip
    if two_d:
        two = loss_landscape(model, measure, loss_fn, directions=2, span=span, steps=steps_2d, seed=seed)
        views.coordinates_2d, views.loss_2d = _floats(two.coordinates[0]), _floats(two.losses)
        views.n_forward += two.n_forward
    if convexity is not None:
        _add_convexity(views, loss_landscape(
            model, measure, loss_fn, directions=2, span=span, seed=seed, convexity=True, **convexity
        ))  # fmt: skip
    if vector is None:
        eig = hessian_eigenvalues(model, measure, loss_fn, k=1, generator=seed, **(eigen_kwargs or {}))
        vector, views.eigenvalue = eig.vectors[0], float(eig.values[0])
        views.n_hvp += eig.n_hvp
    vector = _canonical_sign(vector.detach().reshape(-1))
    ev = eigenvector_slice(model, train if train is not None else measure, loss_fn, val_batches=val, vector=vector,
                           span=eig_span, steps=steps)  # fmt: skip
    views.eig_coordinates, views.eig_train_loss = _floats(ev.coordinates), _floats(ev.train_losses)
    views.eig_val_loss = _floats(ev.val_losses)
    views.n_forward += ev.n_forward
    views.seconds = time.perf_counter() - start
    return views


def _add_convexity(views: LandscapeViews, mapped: LandscapeResult) -> None:
    """The convexity map's numbers and cost into ``views`` (its losses are the 2-D slice's, on its own grid)."""
    views.convexity_coordinates = _floats(mapped.coordinates[0])
    views.convexity_ratio = _floats(mapped.convexity.ratio)
    views.convexity_converged = mapped.convexity.converged.tolist()
    views.n_forward += mapped.n_forward
    views.n_hvp += mapped.convexity.n_hvp
