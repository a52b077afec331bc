"""The report's architecture study (Li, Xu, Taylor, Studer & Goldstein 2018): skip connections, depth, width.

A configuration named ``<architecture>_<rest>`` (``res8x16_bs128_lr0.1``, as ``sweep --architectures``
names them; :mod:`~lightning_flatness.study.resnet`) is that ResNet, or with ``plain`` its twin without
the identity shortcuts. When the configurations differ in architecture, the report adds:

- a table per configuration: the top Hessian eigenvalue, the bottom one ``λ_min``, Li et al.'s
  ``|λ_min/λ_max|`` (``flatness/hessian_eig_ratio``), the loss gap and the test accuracy, as mean
  [95% interval over seeds] (mean within-run se); from the final landscape views the highest loss
  on the 2-D slice (how steeply the surface rises away from the minimum) and, with ``sweep
  --convexity``, the mean of ``|λ_min/λ_max|`` over the convexity map (the plane around the
  minimum, where Li et al. see no-skip networks turn non-convex; the ratio at the minimum itself is
  small for every network); and how many seeds reached the sweep's target training loss (a run that
  stopped at ``--max-epochs`` above it is not at matched loss);
- paired comparisons of each ``plain`` configuration with its ``res`` twin (same depth, width and
  rest of the name; both runs of a seed start from the same weights): per seed the ratios (no skip /
  skip) of ``λ_max`` and of the slice's highest loss, and the differences (no skip − skip) of the
  others, with their mean and 95% t-interval;
- ``landscape_2d_architectures.png``: each configuration's 2-D filter-normalized slice (contours on
  one shared scale) beside its convexity map (``sweep --convexity``), first seed, final weights.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import keys
from .resnet import Architecture, parse_architecture
from .runs import Row
from .seeds import Configuration, mean_interval, paired
from .tables import _interval, _seed_cell, epochs_cell, fmt

if TYPE_CHECKING:  # pragma: no cover
    from ..landscape import LandscapeViews

CONFIGURATION = re.compile(r"(?P<arch>(?:res|plain)\d+x\d+)_(?P<rest>.+)")
# Row values the report derives from a run's final landscape views (not logged keys): the highest loss on the
# 2-D slice (how steeply the surface rises away from the minimum) and the mean |λ_min/λ_max| over the convexity map.
SLICE_MAX = "landscape/slice_2d_max"
MAP_MEAN = "landscape/convexity_map_mean"
# The table's keys and their column headers (| escaped: Markdown table cells; the keys are named under the table).
COLUMNS = {keys.HESSIAN_TOP_EIG: "λ_max", keys.HESSIAN_MIN_EIG: "λ_min", keys.HESSIAN_EIG_RATIO: r"\|λ_min/λ_max\|",
           keys.LOSS_GAP: "gap (loss)", keys.TEST_ACC: "test acc", SLICE_MAX: "2-D slice max loss",
           MAP_MEAN: r"map mean \|λ_min/λ_max\|"}  # fmt: skip
TABLE_KEYS = tuple(COLUMNS)
# Paired no skip vs skip: scales that span orders of magnitude as ratios, the others as differences.
RATIO_KEYS = (keys.HESSIAN_TOP_EIG, SLICE_MAX)
DIFFERENCE_KEYS = (keys.HESSIAN_EIG_RATIO, keys.LOSS_GAP, keys.TEST_ACC, MAP_MEAN)
TARGET_HPARAM = "study/target_train_loss"
# The gap's full-train loss and the sweep's stopping rule compute the same loss in different chunks; a run
# that stopped at the target may log it a rounding error above.
TARGET_SLACK = 1e-4
FIGURE = "landscape_2d_architectures.png"


def architecture_of(config: str) -> tuple[Architecture, str] | None:
    """``(Architecture(8, 16), "bs128_lr0.1")`` for ``"res8x16_bs128_lr0.1"``; None for other names."""
    match = CONFIGURATION.fullmatch(config)
    return (parse_architecture(match["arch"]), match["rest"]) if match else None


def _studied(configs: Sequence[Configuration]) -> list[tuple[Configuration, Architecture]]:
    """The configurations that name an architecture, by depth, width, then skip before no skip (twins
    side by side); empty unless at least two architectures are present."""
    found = [(_with_landscape(c), parsed[0]) for c in configs if (parsed := architecture_of(c.name))]
    if len({a for _, a in found}) < 2:
        return []
    return sorted(found, key=lambda ca: (ca[1].depth, ca[1].width, not ca[1].skip, ca[0].name))


def _with_landscape(config: Configuration) -> Configuration:
    """``config`` with :data:`SLICE_MAX` and :data:`MAP_MEAN` in the rows of the runs whose final views
    were drawn at their comparison point (NaN elsewhere: views of other weights do not describe that row)."""
    from ..landscape import read_final

    rows = []
    for run, row in zip(config.runs, config.rows):
        views = read_final(run.path)
        views = views if views is not None and views.epoch == row.epoch else None
        derived = {SLICE_MAX: _finite(views and views.loss_2d, max), MAP_MEAN: _finite(views and views.convexity_ratio)}
        rows.append(Row(row.run, row.epoch, {**row.values, **derived}, row.note))
    return Configuration(config.name, config.runs, rows, config.seeds)


def _finite(grid: list[list[float]] | None, reduce: Callable = statistics.fmean) -> float:
    """``reduce`` (the mean) of a grid's finite values; NaN without a grid or a finite value."""
    values = [v for line in grid or () for v in line if math.isfinite(v)]
    return float(reduce(values)) if values else math.nan


def _above_target(config: Configuration) -> list[str]:
    """The runs whose last full-train loss is above the sweep's target (they stopped at ``--max-epochs``)."""
    out = []
    for run in config.runs:
        target, series = run.hparams.get(TARGET_HPARAM), run.series(keys.TRAIN_LOSS)
        if isinstance(target, (int, float)) and series and series[-1][1] > target * (1 + TARGET_SLACK):
            out.append(f"{run.name} (train loss {series[-1][1]:.3g} > {target:g})")
    return out


def architecture_section(configs: Sequence[Configuration]) -> list[str]:
    """Markdown: the per-configuration table and the paired skip-vs-no-skip table; ``[]`` when the
    configurations do not differ in architecture."""
    studied = _studied(configs)
    if not studied:
        return []
    shown = [k for k in TABLE_KEYS if any(math.isfinite(v) for c, _ in studied for v in c.values(k))]
    lines = ["Architectures (Li et al. 2018): skip connections, depth and width; mean [95% interval over seeds] "
             "(mean within-run se). `res`: identity shortcuts, `plain`: the same network without them.", "",
             "| configuration | skip | depth | width | seeds at target | epochs | "
             + " | ".join(COLUMNS[k] for k in shown) + " |", "|---|---|---:|---:|---:|---:|" + "---:|" * len(shown)]  # fmt: skip
    missed = []
    for c, arch in studied:
        above = _above_target(c)
        missed += above
        cells = [c.name, "yes" if arch.skip else "no", str(arch.depth), str(arch.width),
                 f"{len(c.runs) - len(above)}/{len(c.runs)}", epochs_cell(c), *(_seed_cell(c, k) for k in shown)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{COLUMNS[k]} `{k}`" for k in shown if k not in (SLICE_MAX, MAP_MEAN)]
    lines += ["", "Columns: " + ", ".join(notes) + "; the gap is test − train loss. From the final landscape "
              "views: the highest loss on the 2-D slice, and \\|λ_min/λ_max\\| averaged over the convexity map's "
              "grid (`sweep --convexity`)."]
    if missed:
        lines += ["", "**Not at the target training loss** (stopped at --max-epochs; their rows are not at matched "
                  "loss, raise --max-epochs): " + ", ".join(missed) + "."]  # fmt: skip
    return lines + ["", *_paired_table(studied, shown)]


def _paired_table(studied: Sequence[tuple[Configuration, Architecture]], shown: Sequence[str]) -> list[str]:
    """Each ``plain`` configuration against its ``res`` twin, per seed, in the ``shown`` keys; ``[]``
    without a twin pair."""
    by_name = {c.name: c for c, _ in studied}
    twins = {c.name: f"{arch.twin.name}_{architecture_of(c.name)[1]}" for c, arch in studied if not arch.skip}
    pairs = [(by_name[twin], by_name[plain]) for plain, twin in twins.items() if twin in by_name]
    if not pairs:
        return []
    ratios, differences = [k for k in RATIO_KEYS if k in shown], [k for k in DIFFERENCE_KEYS if k in shown]
    headers = [f"{COLUMNS[k]} ratio" for k in ratios] + [f"{COLUMNS[k]} difference" for k in differences]
    lines = ["Skip vs no skip at equal depth and width, per seed (both runs of a seed start from the same weights): "
             "ratios no skip / skip, differences no skip − skip; mean [95% t-interval over seeds].", "",
             "| no skip | skip | " + " | ".join(headers) + " |", "|---|---|" + "---:|" * len(headers)]  # fmt: skip
    for skip, plain in pairs:
        cells = [_paired_cell(paired(skip, plain, k, lambda s, p: p / s)) for k in ratios]
        cells += [_paired_cell(paired(skip, plain, k, lambda s, p: p - s)) for k in differences]
        lines.append(f"| {plain.name} | {skip.name} | " + " | ".join(cells) + " |")
    return lines


def _paired_cell(values: Sequence[float]) -> str:
    mean, low, high, n = mean_interval(values)
    return fmt(mean) + (f" {_interval((low, high))}" if n >= 2 else "") + f" ({n} seeds)"


# ---------------------------------------------------------------------------------- figure
def plot_architectures(configs: Sequence[Configuration], out: Path) -> list[Path]:
    """``landscape_2d_architectures.png``: per configuration (first seed) its final 2-D slice and, when
    mapped, its convexity map, two configurations (a ``res``/``plain`` pair) per row; ``[]`` when the
    configurations do not differ in architecture or logged no 2-D slice."""
    from .._figures import figure
    from ..landscape import read_final

    found = [(c.name, v) for c, _ in _studied(configs) if (v := read_final(c.runs[0].path)) and v.loss_2d is not None]
    if not found:
        return []
    panels = 2 if any(v.convexity_ratio is not None for _, v in found) else 1
    per_row = 2
    rows = math.ceil(len(found) / per_row)
    fig = figure(4.6 * panels * per_row, 3.7 * rows + 0.5, layout="constrained")
    limits, vmax = _shared_scales([v for _, v in found])
    for i, (name, views) in enumerate(found):
        _draw_panels(fig, (rows, panels * per_row, panels * i + 1), name, views, limits, vmax)
    fig.suptitle("Final weights, first seed: 2-D filter-normalized loss slice (shared contour levels) and "
                 "Hessian |λ_min/λ_max| on the same plane (shared scale; dark: locally convex)")  # fmt: skip
    path = out / FIGURE
    fig.savefig(path, dpi=90)
    return [path]


def _shared_scales(views: Sequence[LandscapeViews]) -> tuple[tuple[float, float], float | None]:
    """The loss range over every slice, and the largest convexity ratio over every map (None: no map)."""
    import numpy as np

    losses = np.concatenate([np.asarray(v.loss_2d, dtype=float).ravel() for v in views])
    losses = losses[np.isfinite(losses)]
    ratios = np.concatenate([np.asarray(v.convexity_ratio, dtype=float).ravel() for v in views
                             if v.convexity_ratio is not None] or [np.array([])])  # fmt: skip
    ratios = ratios[np.isfinite(ratios)]
    limits = (float(losses.min()), float(losses.max())) if losses.size else (1.0, 1.0)
    return limits, float(ratios.max()) if ratios.size else None


def _draw_panels(
    fig: Any, grid: tuple[int, int, int], name: str, views: LandscapeViews, limits: tuple[float, float],  # noqa: ANN401
    vmax: float | None,
) -> None:  # fmt: skip
    """One configuration's slice at ``grid`` (rows, columns, index) and its convexity map right of it."""
    from ..landscape.plots import _draw_convexity, _draw_loss_2d

    draw: list[tuple[Callable, dict]] = [(_draw_loss_2d, {"limits": limits})]
    if views.convexity_ratio is not None:
        draw.append((_draw_convexity, {"vmax": vmax}))
    for offset, (drawer, options) in enumerate(draw):
        ax = fig.add_subplot(grid[0], grid[1], grid[2] + offset)
        drawer(fig, ax, views, **options)
        ax.set_title(f"{name}: {'loss' if offset == 0 else '|λ_min/λ_max|'}", fontsize=9)
