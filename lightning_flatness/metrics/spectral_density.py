"""The Hessian's eigenvalue density by stochastic Lanczos quadrature, and its figure, histogram and file.

Besides its scalars, :class:`HessianDensity` writes, at every measurement it makes, through
:meth:`~lightning_flatness.metrics.FlatnessMetric.log_artifacts`: to TensorBoard an image of
the smoothed density (log-scale y, as PyHessian draws it) under ``hessian_density/density`` and
a histogram of the estimated eigenvalue counts under ``hessian_density/eigenvalues``; to W&B the
same image and a ``wandb.Histogram``; and, for TensorBoard and CSV loggers, the quadrature and
the density as ``<log_dir>/hessian_density/epoch_<e>.json`` (read by :func:`read_final_density`,
e.g. for the study report's overlay ``hessian_density.png``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import keys
from .._figures import figure, render, when
from .._logging import FigureWriter, LogPosition, read_latest_epoch_json, write_epoch_json
from ..functional import SpectralDensityResult, hessian_spectral_density
from ..functional.spectral_density import PROBES
from ..validation import check_bool, check_cache_chunks, check_choice, check_float, check_int
from .base import FlatnessMetric, MeasurementContext

SUBDIR = "hessian_density"
GRID_POINTS = 512
HISTOGRAM_BINS = 60
LOG_FLOOR = 1e-6  # the figure's y-axis spans six decades below the density's peak


class HessianDensity(FlatnessMetric):
    r"""The eigenvalue density of the loss Hessian (Ghorbani, Krishnan & Xiao 2019), opt-in.

    ``num_probes`` random unit probes, ``lanczos_steps`` Lanczos steps from each
    (:func:`~lightning_flatness.functional.hessian_spectral_density`). Logs the fraction of the
    spectrum below ``−negative_threshold · max|λ|``, ``flatness/hessian_density_negative_mass``
    (the weight of the Ritz values there; see
    :meth:`~lightning_flatness.functional.SpectralDensityResult.negative_mass`), and
    ``flatness/hessian_trace_slq`` (``P·(1/S)Σ vᵀHv``, Hutchinson's trace from the same
    probes), each with its standard error across probes (the trace's also over the mini-batches,
    :meth:`~lightning_flatness.functional.SpectralDensityResult.trace`); with ``log_density``, also the
    smoothed density as a figure, a histogram and a JSON file (see this module's docstring).

    Args:
        num_probes: probes (at least 2 for a standard error).
        lanczos_steps: Lanczos steps per probe (quadrature nodes); moments up to order
            ``2·lanczos_steps − 1`` of each probe's measure are exact.
        probes: ``"rademacher"`` or ``"gaussian"`` (normalized to unit length).
        sigma: width of the Gaussian smoothing of the logged density; ``None``: 1% of the range
            of the Ritz values.
        negative_threshold: eigenvalues above ``−negative_threshold · max|λ|`` count as zero in
            the negative mass: a few Lanczos steps cannot resolve the sign of the near-zero bulk.
        cache_chunks: see :class:`~lightning_flatness.metrics.HessianEigenvalues`.
        log_density: log the figure, the histogram and the JSON file.
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`; typically set,
            as one measurement costs ``num_probes × lanczos_steps`` Hessian-vector products.

    Example:
        ``FlatnessCallback(metrics=["hessian_top_eig", HessianDensity(every_n_epochs=10)])``
    """

    name = "hessian_density"

    def __init__(
        self, num_probes: int = 4, lanczos_steps: int = 64, probes: str = "rademacher", sigma: float | None = None,
        negative_threshold: float = 0.01, cache_chunks: int | str = "auto", log_density: bool = True,
        every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        self.num_probes = check_int("num_probes", num_probes)
        self.lanczos_steps = check_int("lanczos_steps", lanczos_steps)
        self.probes = check_choice("probes", probes, PROBES)
        self.sigma = None if sigma is None else check_float("sigma", sigma, inclusive=False)
        self.negative_threshold = check_float("negative_threshold", negative_threshold, maximum=1.0)
        self.cache_chunks = check_cache_chunks(cache_chunks)
        self.log_density = check_bool("log_density", log_density)
        values = (keys.HESSIAN_DENSITY_NEGATIVE_MASS, keys.HESSIAN_TRACE_SLQ)
        self.keys = values + tuple(keys.se(key) for key in values)
        self.result: SpectralDensityResult | None = None  # the last measurement's quadrature
        self._writer = FigureWriter()

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        self.result = res = hessian_spectral_density(
            ctx.model, ctx.batches, ctx.loss_fn, num_probes=self.num_probes, lanczos_steps=self.lanczos_steps,
            probes=self.probes, generator=ctx.generator(self.name), dtype=ctx.dtype, cache_chunks=self.cache_chunks,
        )  # fmt: skip
        out = {}
        for key, (value, se) in ((keys.HESSIAN_DENSITY_NEGATIVE_MASS, res.negative_mass(self.negative_threshold)),
                                 (keys.HESSIAN_TRACE_SLQ, res.trace())):  # fmt: skip
            out[key] = value
            if self.num_probes > 1:  # one probe: no spread to measure
                out[keys.se(key)] = se
        return out

    def log_artifacts(self, loggers: Sequence[Any], at: LogPosition) -> None:
        res, self.result = self.result, None  # logged once
        if res is None or not self.log_density:
            return
        _write(self._writer, loggers, res, at, self.sigma)


def _write(writer: FigureWriter, loggers: Sequence[Any], res: SpectralDensityResult, at: LogPosition,
           sigma: float | None) -> None:  # fmt: skip
    """One measurement's density to every logger (call on rank 0 only)."""
    grid, density = res.density(GRID_POINTS, sigma)
    counts, edges = res.histogram(HISTOGRAM_BINS)

    def wandb_histogram() -> dict[str, Any]:
        import wandb

        return {keys.HESSIAN_DENSITY_HISTOGRAM: wandb.Histogram(np_histogram=(counts.numpy(), edges.numpy()))}

    writer.write(
        loggers, at, lambda: {keys.HESSIAN_DENSITY_IMAGE: render(density_figure(grid, density, at.epochs_completed))},
        lambda log_dir: write_json(log_dir, res, grid, density, at),
        tensorboard=lambda tb: _add_histogram(tb, res, counts, edges, at.step), wandb_row=wandb_histogram,
    )  # fmt: skip


def _add_histogram(
    writer: Any, res: SpectralDensityResult, counts: torch.Tensor, edges: torch.Tensor, step: int
) -> None:
    """The estimated eigenvalue counts as a TensorBoard histogram: ``num = P``, ``sum = tr H``."""
    first, second = res.moments(2)[0].tolist()
    writer.add_histogram_raw(
        keys.HESSIAN_DENSITY_HISTOGRAM, min=edges[0].item(), max=edges[-1].item(), num=res.num_params,
        sum=res.num_params * first, sum_squares=res.num_params * second, bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(), global_step=step,
    )  # fmt: skip


def density_figure(grid: torch.Tensor, density: torch.Tensor, epochs_completed: int) -> Any:
    """The smoothed density on a log-scale y-axis (six decades below its peak)."""
    fig = figure(5.6, 4.0)
    ax = fig.add_subplot()
    ax.plot(grid.numpy(), density.numpy(), color="C0")
    ax.set_yscale("log")
    ax.set_ylim(bottom=LOG_FLOOR * density.max().item())
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (smoothed)")
    ax.set_title(f"Hessian eigenvalue density (stochastic Lanczos quadrature), {when(epochs_completed)}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.14, right=0.96, bottom=0.13, top=0.91)
    return fig


def write_json(
    log_dir: str | Path, res: SpectralDensityResult, grid: torch.Tensor, density: torch.Tensor, at: LogPosition
) -> Path:
    """``<log_dir>/hessian_density/epoch_<e>.json``: the quadrature (``nodes``, ``weights`` per
    probe), ``num_params``, the smoothed density on ``grid``, and the position (``epoch``, ``step``,
    ``epochs_completed``)."""
    data = {"num_params": res.num_params, "n_products": res.n_products,
            "nodes": res.nodes.tolist(), "weights": res.weights.tolist(), "grid": grid.tolist(),
            "density": density.tolist()}  # fmt: skip
    return write_epoch_json(log_dir, SUBDIR, at, data)


def read_final_density(run_dir: str | Path) -> dict[str, Any] | None:
    """The latest epoch's file under ``run_dir/hessian_density/`` as a dict (``None`` if none is readable)."""
    return read_latest_epoch_json(run_dir, SUBDIR, _checked_density)


def _checked_density(data: Any) -> dict[str, Any]:
    if len(data["grid"]) != len(data["density"]):
        raise ValueError("grid and density differ in length")
    return data
