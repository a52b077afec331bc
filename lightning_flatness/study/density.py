"""The report's ``hessian_density.png``: every run's final Hessian eigenvalue density on one figure.

Read from ``<run>/hessian_density/epoch_*.json``, which
:class:`~lightning_flatness.metrics.HessianDensity` writes next to the TensorBoard events.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._figures import colors, figure, when
from .._logging import epochs_completed_of
from ..metrics.spectral_density import LOG_FLOOR, read_final_density


def plot_density(runs: Sequence[Any], out: Path) -> list[Path]:
    """``hessian_density.png`` with each run's latest smoothed density (log y); ``[]`` if no run saved one.

    ``runs`` have ``.name`` and ``.path`` (the report's runs). Each curve is smoothed with its own
    run's width (1% of that run's spectral range unless the metric was given ``sigma``).
    """
    found = [(run.name, d) for run in runs if (d := read_final_density(run.path)) is not None]
    if not found:
        return []
    fig = figure(6.4, 4.4)
    ax = fig.add_subplot()
    peak = 0.0
    for (name, d), color in zip(found, colors(len(found))):
        ax.plot(d["grid"], d["density"], color=color, label=f"{name} ({when(epochs_completed_of(d))})")
        peak = max(peak, max(d["density"]))
    ax.set_yscale("log")
    ax.set_ylim(bottom=LOG_FLOOR * peak)
    ax.set_xlabel("eigenvalue of the loss Hessian")
    ax.set_ylabel("density (smoothed)")
    ax.set_title("Final weights: Hessian eigenvalue density (stochastic Lanczos quadrature)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
    path = out / "hessian_density.png"
    fig.savefig(path, dpi=110)
    return [path]
