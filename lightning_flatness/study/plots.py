"""The report's PNGs (matplotlib, object-oriented API: no pyplot, no global backend state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .._figures import colors, figure, wants_log_scale
from ..keys import GAP_PREFIX, OVERVIEW, SECONDS, TRAIN_LOSS

if TYPE_CHECKING:  # pragma: no cover
    from .runs import Row, Run

NOT_PLOTTED = (SECONDS,)


def file_stem(key: str) -> str:
    return key.replace("/", "_")


def _draw(ax, runs: Sequence[Run], rows: Sequence[Row], key: str, x_key: str | None) -> bool:  # noqa: ANN001
    """Every run's ``key`` vs epoch (``x_key`` None) or vs ``x_key`` at the same epochs; True if anything was drawn."""
    drawn, ys = False, []
    for run, row, color in zip(runs, rows, colors(len(runs))):
        series = run.series(key)
        if x_key is not None:
            xmap = run.scalars.get(x_key, {})
            series = [(xmap[s], v) for s, v in series if s in xmap]
        if not series:
            continue
        xs, vs = zip(*series)
        ax.plot(xs, vs, marker="o", markersize=2.5, linewidth=1.2, color=color, label=run.name)
        ys += vs
        drawn = True
        if row.epoch is not None and row.epoch in run.scalars.get(key, {}):
            x_mark = row.epoch if x_key is None else run.scalars.get(x_key, {}).get(row.epoch)
            if x_mark is not None:
                ax.plot([x_mark], [run.scalars[key][row.epoch]], marker="*", markersize=11, color=color,
                        markeredgecolor="black", markeredgewidth=0.6, linestyle="none")  # fmt: skip
    if not drawn:
        return False
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
    return True


def plot_all(runs: Sequence[Run], rows: Sequence[Row], keys: Sequence[str], out: Path) -> list[Path]:
    """``<key>_vs_epoch.png``, ``<key>_vs_train_loss.png`` per key, and ``overview.png``; returns the paths."""
    written = []
    has_train_loss = any(TRAIN_LOSS in r.scalars for r in runs)
    for key in keys:
        if key in NOT_PLOTTED:
            continue
        views = [("epoch", None)] + ([("train_loss", TRAIN_LOSS)] if has_train_loss and key != TRAIN_LOSS else [])
        for suffix, x_key in views:
            fig = figure()
            fig.subplots_adjust(left=0.14, right=0.97, bottom=0.13, top=0.92)
            ax = fig.add_subplot()
            if not _draw(ax, runs, rows, key, x_key):
                continue
            ax.set_title(f"{key} vs {'epoch' if x_key is None else 'training loss'}")
            ax.legend(fontsize=7, title="run (★: compared)", title_fontsize=7)
            path = out / f"{file_stem(key)}_vs_{suffix}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
    panels = [k for k in OVERVIEW if k in keys]
    if panels:
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig = figure(4.3 * cols, 3.3 * nrows + 0.4, layout="constrained")
        x_key = TRAIN_LOSS if has_train_loss else None
        for i, key in enumerate(panels):
            ax = fig.add_subplot(nrows, cols, i + 1)
            _draw(ax, runs, rows, key, x_key)
            ax.set_xlabel("training loss (log)" if x_key else "epoch")
            ax.set_title(key, fontsize=10)
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8)
        what = "training loss (★: compared point)" if x_key else "epoch"
        fig.suptitle(f"Flatness and generalization gap vs {what}")
        path = out / "overview.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written
