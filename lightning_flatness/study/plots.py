"""The report's PNGs (matplotlib, object-oriented API: no pyplot, no global backend state).

One curve per configuration: a configuration with one run draws that run's measurements; one
with several seeds draws their mean and a min–max band, each run's curve interpolated (linearly,
in log-x for the training loss) onto the x-values where every seed has data, and a ★ with a
min–max bar at the mean compared point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._figures import colors, figure, wants_log_scale
from ..keys import GAP_PREFIX, GRAD_NOISE_SCALE, OVERVIEW, SECONDS, TRAIN_LOSS
from .runs import batch_size_of

if TYPE_CHECKING:  # pragma: no cover
    from .runs import Row, Run
    from .seeds import Configuration

NOT_PLOTTED = (SECONDS,)


def file_stem(key: str) -> str:
    return key.replace("/", "_")


def _series(run: Run, key: str, x_key: str | None) -> list[tuple[float, float]]:
    """``key`` against the epoch (``x_key`` None) or against ``x_key`` logged at the same epochs, finite points only."""
    series = run.series(key)
    if x_key is not None:
        xmap = run.scalars.get(x_key, {})
        series = [(xmap[s], v) for s, v in series if s in xmap]
    return [(float(x), v) for x, v in series if math.isfinite(x) and math.isfinite(v)]


def _compared(run: Run, row: Row, key: str, x_key: str | None) -> tuple[float, float] | None:
    """The run's compared point in this view, if it logged ``key`` there."""
    if row.epoch is None or row.epoch not in run.scalars.get(key, {}):
        return None
    x = row.epoch if x_key is None else run.scalars.get(x_key, {}).get(row.epoch)
    return None if x is None else (float(x), run.scalars[key][row.epoch])


def band(curves: Sequence[Sequence[tuple[float, float]]], log_x: bool = False) -> tuple[np.ndarray, ...] | None:
    """``(x, mean, low, high)`` over the curves: each interpolated onto every curve's x-values inside the
    range all of them cover (in log x if ``log_x``); None when they share no range."""
    curves = [sorted(c) for c in curves if c]
    if not curves:
        return None
    lo, hi = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    grid = np.array(sorted({x for c in curves for x, _ in c if lo <= x <= hi}))
    if grid.size == 0 or (log_x and lo <= 0):
        return None
    warp = np.log if log_x else np.asarray
    ys = np.array([np.interp(warp(grid), warp(np.array([x for x, _ in c])), [v for _, v in c]) for c in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def _star(ax: Any, x: float, y: float, color: Any, yerr: Any = None) -> None:  # noqa: ANN401
    ax.errorbar([x], [y], yerr=yerr, marker="*", markersize=11, color=color, markeredgecolor="black",
                markeredgewidth=0.6, linestyle="none", elinewidth=1.0, capsize=2)  # fmt: skip


def _draw_config(ax: Any, config: Configuration, key: str, x_key: str | None, color: Any) -> list[float]:  # noqa: ANN401
    """One configuration's curve (a band for several seeds) and ★; returns the y-values drawn (empty: nothing)."""
    curves = [_series(run, key, x_key) for run in config.runs]
    points = [p for run, row in zip(config.runs, config.rows) if (p := _compared(run, row, key, x_key))]
    if len(config.runs) == 1:
        if not curves[0]:
            return []
        xs, vs = zip(*curves[0])
        ax.plot(xs, vs, marker="o", markersize=2.5, linewidth=1.2, color=color, label=config.name)
        if points:
            _star(ax, *points[0], color)
        return list(vs)
    stats = band(curves, log_x=x_key is not None)
    if stats is None:
        return []
    x, mean, low, high = stats
    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    ax.plot(x, mean, linewidth=1.4, color=color, label=f"{config.name} ({len(config.runs)} seeds)")
    if points:
        px, py = np.mean([p[0] for p in points]), np.array([p[1] for p in points])
        _star(ax, px, py.mean(), color, [[py.mean() - py.min()], [py.max() - py.mean()]])
    return [*low, *high]


def _axes(ax: Any, key: str, x_key: str | None, ys: Sequence[float]) -> None:  # noqa: ANN401
    if x_key is None:
        ax.set_xlabel("epoch")
    else:
        ax.set_xlabel(f"training loss ({x_key}, log scale; training proceeds to the right)")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        if not ax.xaxis_inverted():
            ax.invert_xaxis()
    if not key.startswith(GAP_PREFIX) and wants_log_scale(ys):  # gaps can be negative and are read on a linear scale
        ax.set_yscale("log")
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)


def _draw(ax: Any, configs: Sequence[Configuration], key: str, x_key: str | None) -> bool:  # noqa: ANN401
    """Every configuration's ``key`` vs epoch (``x_key`` None) or vs ``x_key``; True if anything was drawn."""
    ys: list[float] = []
    for config, color in zip(configs, colors(len(configs))):
        ys += _draw_config(ax, config, key, x_key, color)
    if not ys:
        return False
    if key == GRAD_NOISE_SCALE:
        ys += _batch_size_lines(ax, configs)
    _axes(ax, key, x_key, ys)
    return True


def _batch_size_lines(ax: Any, configs: Sequence[Configuration]) -> list[float]:  # noqa: ANN401
    """A dashed line at each configuration's training batch size, in its color: where its noise
    scale curve runs above the line, that run trained below the critical batch size."""
    sizes = []
    for config, color in zip(configs, colors(len(configs))):
        size = batch_size_of(config.runs[0])
        if size is not None:
            ax.axhline(size, color=color, linestyle="--", linewidth=0.9, alpha=0.8)
            ax.annotate(f"B={size}", (1.0, size), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                        textcoords="offset points", ha="right", fontsize=6, color=color)  # fmt: skip
            sizes.append(float(size))
    return sizes


def plot_all(configs: Sequence[Configuration], keys: Sequence[str], out: Path) -> list[Path]:
    """``<key>_vs_epoch.png``, ``<key>_vs_train_loss.png`` per key, and ``overview.png``; returns the paths."""
    written = []
    has_train_loss = any(TRAIN_LOSS in r.scalars for c in configs for r in c.runs)
    seeds = any(len(c.runs) > 1 for c in configs)
    legend = "configuration (★: compared" + ("; band: min–max over seeds)" if seeds else ")")
    for key in keys:
        if key in NOT_PLOTTED:
            continue
        views = [("epoch", None)] + ([("train_loss", TRAIN_LOSS)] if has_train_loss and key != TRAIN_LOSS else [])
        for suffix, x_key in views:
            fig = figure()
            fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.92)
            ax = fig.add_subplot()
            if not _draw(ax, configs, key, x_key):
                continue
            ax.set_title(f"{key} vs {'epoch' if x_key is None else 'training loss'}")
            dashed = "; dashed: its batch size" if key == GRAD_NOISE_SCALE else ""
            ax.legend(fontsize=7, title=legend + dashed, title_fontsize=7)
            path = out / f"{file_stem(key)}_vs_{suffix}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
    overview = _overview(configs, [k for k in OVERVIEW if k in keys], TRAIN_LOSS if has_train_loss else None, seeds)
    if overview is not None:
        overview.savefig(out / "overview.png", dpi=110)
        written.append(out / "overview.png")
    return written


def _overview(configs: Sequence[Configuration], panels: Sequence[str], x_key: str | None, seeds: bool) -> Any:  # noqa: ANN401
    """The overview figure, one panel per key (None without panels)."""
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = figure(4.3 * cols, 3.3 * nrows + 0.4, layout="constrained")
    for i, key in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        _draw(ax, configs, key, x_key)
        ax.set_xlabel("training loss (log)" if x_key else "epoch")
        ax.set_title(key, fontsize=10)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8)
    what = "training loss (★: compared point" if x_key else "epoch (★: compared point"
    what += "; mean and min–max band over seeds)" if seeds else ")"
    fig.suptitle(f"Flatness and generalization gap vs {what}")
    return fig
