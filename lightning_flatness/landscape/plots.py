"""Figures of the loss-landscape views (matplotlib, object-oriented API: no pyplot, no global state).

Used by :class:`~lightning_flatness.FlatnessCallback` (images for TensorBoard and W&B) and by
``lightning-flatness report`` (every run's final slices on one figure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .._figures import colors, figure, render, wants_log_scale, when
from .views import LandscapeViews, read_final


# -------------------------------------------------------------------------- drawing
def _log_y(ax: Any, values: Sequence[float]) -> None:  # noqa: ANN401
    if wants_log_scale(values):
        ax.set_yscale("log")


def figure_1d(views: LandscapeViews, title: str = "") -> Any:  # noqa: ANN401
    fig = figure(5.6, 4.0)
    ax = fig.add_subplot()
    ax.plot(views.coordinates, views.loss_1d, color="C0", marker="o", markersize=2.5, label="loss")
    _log_y(ax, views.loss_1d)
    ax.set_xlabel(f"α (step along a {views.normalization}-normalized random direction)")
    ax.set_ylabel("loss", color="C0")
    ax.grid(True, alpha=0.3)
    if views.accuracy_1d is not None:
        acc = ax.twinx()
        acc.plot(views.coordinates, views.accuracy_1d, color="C1", linestyle="--", label="accuracy")
        acc.set_ylabel("accuracy", color="C1")
        acc.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"1-D loss slice, {when(views.epoch)}", fontsize=10)
    fig.subplots_adjust(left=0.14, right=0.86, bottom=0.13, top=0.91)
    return fig


def figure_2d(views: LandscapeViews, title: str = "") -> Any:  # noqa: ANN401
    """The 2-D slice's contour plot and, when mapped, the convexity map beside it (Li et al. 2018, Fig. 7)."""
    mapped = views.convexity_ratio is not None
    fig = figure(10.4 if mapped else 5.4, 4.4)
    ax = fig.add_subplot(1, 2, 1) if mapped else fig.add_subplot()
    _draw_loss_2d(fig, ax, views)
    ax.set_title(title or f"2-D loss slice ({views.normalization}-normalized), {when(views.epoch)}", fontsize=10)
    if mapped:
        _draw_convexity(fig, fig.add_subplot(1, 2, 2), views)
        fig.subplots_adjust(left=0.07, right=0.97, bottom=0.12, top=0.92, wspace=0.3)
    else:
        fig.subplots_adjust(left=0.13, right=0.95, bottom=0.12, top=0.92)
    return fig


def _draw_loss_2d(fig: Any, ax: Any, views: LandscapeViews, limits: tuple[float, float] | None = None) -> None:  # noqa: ANN401
    """The 2-D slice's filled contours; ``limits``: the levels' range (default: this slice's), shared by
    figures that set several slices side by side so equal colors are equal losses."""
    import numpy as np

    from matplotlib.colors import LogNorm

    a = np.asarray(views.coordinates_2d)
    loss = np.asarray(views.loss_2d, dtype=float).T  # rows of loss_2d = first direction = x axis
    finite = loss[np.isfinite(loss)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (1.0, 1.0)
    low, high = limits or (low, high)
    if low > 0 and high > low * 1.0001:  # log-spaced levels: the basin and the walls both show
        levels, norm = np.geomspace(low, high, 21), LogNorm(low, high)
    else:
        levels, norm = 20, None
    filled = ax.contourf(a, a, np.clip(loss, low, high), levels=levels, norm=norm, cmap="viridis", extend="neither")
    ax.contour(a, a, loss, levels=filled.levels[::2], norm=norm, colors="white", linewidths=0.4, alpha=0.6)
    fig.colorbar(filled, ax=ax, label="loss" + (" (log-spaced levels)" if norm is not None else ""), format="%.3g")
    _mark_origin(ax)


def _draw_convexity(fig: Any, ax: Any, views: LandscapeViews, vmax: float | None = None) -> None:  # noqa: ANN401
    """``|λ_min/λ_max|`` as a heat map: dark (small) where the loss is locally convex, as Li et al. draw it;
    ``vmax``: the color scale's top (default: this map's largest ratio), shared by figures that compare maps."""
    import numpy as np

    a = np.asarray(views.convexity_coordinates)
    ratio = np.ma.masked_invalid(np.asarray(views.convexity_ratio, dtype=float).T)
    mesh = ax.pcolormesh(a, a, ratio, cmap="magma", shading="nearest", vmin=0.0, vmax=vmax)
    fig.colorbar(mesh, ax=ax, label="|λ_min / λ_max|  (0: convex)", format="%.2g")
    missed = ~np.asarray(views.convexity_converged, dtype=bool).T
    if missed.any():  # Lanczos stopped at convexity_max_iter here: drawn, but not to the tolerance
        rows, cols = np.nonzero(missed)
        ax.plot(a[cols], a[rows], marker="x", color="cyan", linestyle="none", markersize=6, label="not converged")
        ax.legend(fontsize=7, loc="upper right")
    _mark_origin(ax)
    ax.set_title(f"Hessian |λ_min/λ_max| on the same plane, {when(views.epoch)}", fontsize=10)


def _mark_origin(ax: Any) -> None:  # noqa: ANN401
    ax.plot([0], [0], marker="*", color="red", markersize=10, linestyle="none")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_aspect("equal")


def figure_eigenvector(views: LandscapeViews, title: str = "") -> Any:  # noqa: ANN401
    fig = figure(5.6, 4.0)
    ax = fig.add_subplot()
    ax.plot(views.eig_coordinates, views.eig_train_loss, color="C0", label="train")
    values = list(views.eig_train_loss or [])
    if views.eig_val_loss is not None:
        ax.plot(views.eig_coordinates, views.eig_val_loss, color="C0", linestyle="--", label="validation")
        values += views.eig_val_loss
    _log_y(ax, values)
    lam = f", λ₁ = {views.eigenvalue:.4g}" if views.eigenvalue is not None else ""
    ax.set_title(title or f"loss along the top Hessian eigenvector, {when(views.epoch)}{lam}", fontsize=10)
    ax.set_xlabel("a (distance along the unit eigenvector)")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.14, right=0.96, bottom=0.13, top=0.91)
    return fig


def images(views: LandscapeViews) -> dict[str, Any]:
    out = {"landscape/1d": render(figure_1d(views))}
    if views.loss_2d is not None:
        out["landscape/2d"] = render(figure_2d(views))
    if views.eig_coordinates is not None:
        out["landscape/eigenvector"] = render(figure_eigenvector(views))
    return out


# --------------------------------------------------------------------------- report
def plot_runs(runs: Sequence[Any], out: Path) -> list[Path]:
    """``landscape_1d.png`` and ``landscape_eigenvector.png``: every run's final slices on one figure.

    ``runs`` have ``.name`` and ``.path`` (the report's runs); runs without landscape files are left out.
    """
    found = [(run.name, v) for run in runs if (v := read_final(run.path)) is not None]
    if not found:
        return []
    written = []
    palette = colors(len(found))
    fig = figure(6.4, 4.4)
    ax = fig.add_subplot()
    values: list[float] = []
    for (name, v), color in zip(found, palette):
        ax.plot(v.coordinates, v.loss_1d, color=color, label=f"{name} ({when(v.epoch)})")
        values += v.loss_1d
    written.append(_finish_overlay(
        fig, ax, values, "α (step along the same filter-normalized random direction)", "loss (measurement subsample)",
        "Final weights: 1-D filter-normalized loss slices", 10, out / "landscape_1d.png",
    ))  # fmt: skip
    eig = [(n, v, c) for (n, v), c in zip(found, palette) if v.eig_coordinates is not None]
    if eig:
        fig = figure(6.4, 4.4)
        ax = fig.add_subplot()
        values = []
        for name, v, color in eig:
            lam = f", λ₁ {v.eigenvalue:.3g}" if v.eigenvalue is not None else ""
            ax.plot(v.eig_coordinates, v.eig_train_loss, color=color, label=f"{name}{lam}")
            values += v.eig_train_loss
            if v.eig_val_loss is not None:
                ax.plot(v.eig_coordinates, v.eig_val_loss, color=color, linestyle="--")
                values += v.eig_val_loss
        written.append(_finish_overlay(
            fig, ax, values, "a (distance along the unit top Hessian eigenvector)", "loss",
            "Final weights: loss along the top eigenvector (solid: train, dashed: validation)", 9,
            out / "landscape_eigenvector.png",
        ))  # fmt: skip
    return written


def _finish_overlay(
    fig: Any, ax: Any, values: list[float], xlabel: str, ylabel: str, title: str, title_size: int, path: Path
) -> Path:
    """Axes, legend and layout shared by the report's overlay figures; saves to ``path``."""
    _log_y(ax, values)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
    fig.savefig(path, dpi=110)
    return path
