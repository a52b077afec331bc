"""``lightning-flatness report LOGDIR``: compare runs' flatness and generalization gap.

Reads the TensorBoard event files of every run under ``LOGDIR`` (a run is a directory that
holds ``events.out.tfevents.*`` files; its name is its path relative to ``LOGDIR``), keeps the
``flatness/*`` and ``gap/*`` scalars that :class:`~lightning_flatness.FlatnessCallback` logs at
``step = epoch``, and writes to ``--out`` (default ``LOGDIR/report``):

- ``<key>_vs_epoch.png`` and ``<key>_vs_train_loss.png`` for every logged key (every run's
  curve; the second uses ``gap/train_loss`` as the x-axis, the matched-loss view), and
  ``overview.png`` (the flatness metrics and the gap vs training loss, one panel each);
- ``landscape_1d.png`` and ``landscape_eigenvector.png`` when runs logged loss-landscape views
  (``FlatnessCallback(landscape_every_n_epochs=...)``): every run's latest 1-D filter-normalized
  slice on one figure, and its slice along the top Hessian eigenvector (train solid, validation
  dashed), read from ``<run>/landscape/epoch_*.json``;
- ``summary.md``: one row per key, one column per run, with the value at the comparison point
  and the Kendall τ and Spearman ρ between that key and ``gap/loss`` across runs;
- ``summary.csv`` (one row per run) and ``correlations.csv``.

The comparison point of a run is the end of training (its last measurement), or with
``--at-train-loss X`` its first measurement with ``gap/train_loss <= X``. A key's value there is
its latest logged value at or before that epoch (the same value when, as usual, every key is
logged at every measurement).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

DESCRIPTION = (
    "Plots and a table (Markdown + CSV) of every run's flatness metrics and generalization gap, read from "
    "TensorBoard event files, with the Kendall and Spearman rank correlation of each metric with gap/loss."
)
PREFIXES = ("flatness/", "gap/")
KNOWN_KEYS = (
    "flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/grad_cosine", "flatness/fisher_trace",
    "flatness/pacgen", "gap/train_loss", "gap/test_loss", "gap/loss", "gap/train_acc", "gap/test_acc", "gap/acc",
    "flatness/seconds",
)  # fmt: skip
TARGET = "gap/loss"
TRAIN_LOSS = "gap/train_loss"
NOT_CORRELATED = (TARGET, "flatness/seconds")


class ReportError(ValueError):
    """The log directory holds no run, or no run with the callback's metrics."""


@dataclass
class Run:
    """One run's ``flatness/*`` and ``gap/*`` scalars: ``{key: {epoch: value}}``."""

    name: str
    path: Path
    scalars: dict[str, dict[int, float]]

    def series(self, key: str) -> list[tuple[int, float]]:
        return sorted(self.scalars.get(key, {}).items())

    def value_at(self, key: str, epoch: int) -> float:
        """The latest value of ``key`` logged at or before ``epoch`` (NaN if none)."""
        best = [(s, v) for s, v in self.series(key) if s <= epoch]
        return best[-1][1] if best else float("nan")


@dataclass
class Row:
    """A run at its comparison point: ``epoch`` is None when the run never reached it."""

    run: str
    epoch: int | None
    values: dict[str, float]
    note: str = ""


@dataclass
class Report:
    rows: list[Row]
    keys: list[str]
    correlations: dict[str, tuple[float, float, int]]  # key -> (kendall tau, spearman rho, runs)
    at_train_loss: float | None
    markdown: str
    files: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
def _natural_key(name: str) -> list:
    parts = re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", name)
    return [float(p) if i % 2 else p for i, p in enumerate(parts)]


def find_run_dirs(logdir: str | Path) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that holds TensorBoard event files."""
    root = Path(logdir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory.")
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*") if p.is_file()})


def _run_names(root: Path, dirs: Sequence[Path]) -> list[str]:
    """Paths relative to ``root``; ``name/version_N`` is shortened to ``name`` when it is the only version."""
    rel = [d.relative_to(root).as_posix() if d != root else root.resolve().name for d in dirs]
    parents = [r.rsplit("/", 1)[0] if re.search(r"(^|/)version_\d+$", r) and "/" in r else None for r in rel]
    return [p if p is not None and parents.count(p) == 1 and p not in rel else r for r, p in zip(rel, parents)]


def read_scalars(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the ``flatness/*`` and ``gap/*`` scalars in one directory's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(PREFIXES):
            out[tag] = {int(e.step): float(e.value) for e in acc.Scalars(tag)}  # the last write of a step wins
    return out


def load_runs(logdir: str | Path) -> list[Run]:
    """Every run under ``logdir`` with at least one ``flatness/*`` or ``gap/*`` scalar, naturally sorted.

    Raises :class:`ReportError` when there is no event file or no run has those scalars.
    """
    root = Path(logdir)
    dirs = find_run_dirs(root)
    if not dirs:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {root}: no runs to report.")
    runs, empty = [], []
    for name, d in zip(_run_names(root, dirs), dirs):
        scalars = read_scalars(d)
        (runs.append(Run(name, d, scalars)) if scalars else empty.append(name))
    if not runs:
        raise ReportError(
            f"none of the {len(dirs)} run(s) under {root} ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}) "
            "logged flatness/* or gap/* scalars; train them with lightning_flatness.FlatnessCallback."
        )
    if empty:
        warnings.warn(f"skipped run(s) without flatness/* or gap/* scalars: {', '.join(empty)}", stacklevel=2)
    return sorted(runs, key=lambda r: _natural_key(r.name))


def ordered_keys(runs: Sequence[Run]) -> list[str]:
    present = {k for r in runs for k in r.scalars}
    known = [k for k in KNOWN_KEYS if k in present]
    eigs = sorted((k for k in present if re.fullmatch(r"flatness/hessian_eig_\d+", k)), key=_natural_key)
    rest = sorted(present - set(known) - set(eigs))
    if eigs:  # right after the top eigenvalue
        i = known.index("flatness/hessian_top_eig") + 1 if "flatness/hessian_top_eig" in known else 0
        known[i:i] = eigs
    return known + rest


# --------------------------------------------------------------------------- selecting
def comparison_row(run: Run, keys: Sequence[str], at_train_loss: float | None = None) -> Row:
    """The run at the end of training, or at its first measurement with ``gap/train_loss <= at_train_loss``."""
    if at_train_loss is None:
        epoch = max(s for series in run.scalars.values() for s in series)
        return Row(run.name, epoch, {k: run.value_at(k, epoch) for k in keys})
    train = run.series(TRAIN_LOSS)
    reached = [s for s, v in train if v <= at_train_loss]
    if not reached:
        low = min((v for _, v in train), default=float("nan"))
        note = f"never reached train loss <= {at_train_loss:g} (lowest {low:.4g})" if train else f"no {TRAIN_LOSS}"
        return Row(run.name, None, {k: float("nan") for k in keys}, note)
    return Row(run.name, reached[0], {k: run.value_at(k, reached[0]) for k in keys})


def rank_correlations(
    rows: Sequence[Row], keys: Sequence[str], target: str = TARGET
) -> dict[str, tuple[float, float, int]]:
    """Kendall τ and Spearman ρ between each key and ``target`` over the rows where both are finite."""
    from scipy.stats import kendalltau, spearmanr

    out = {}
    for key in keys:
        if key in NOT_CORRELATED:
            continue
        pairs = [(r.values.get(key, math.nan), r.values.get(target, math.nan)) for r in rows]
        pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
        tau = rho = math.nan
        if len(pairs) >= 2:
            xs, ys = zip(*pairs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant input: NaN, reported as such
                tau = float(kendalltau(xs, ys).statistic)
                rho = float(spearmanr(xs, ys).statistic)
        out[key] = (tau, rho, len(pairs))
    return out


# ---------------------------------------------------------------------------- writing
def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.5g}"


def to_markdown(rows: Sequence[Row], keys: Sequence[str], corr: dict, at_train_loss: float | None) -> str:
    if at_train_loss is None:
        where = "at the end of training (each run's last measurement)"
    else:
        where = f"at each run's first measurement with training loss (gap/train_loss) <= {at_train_loss:g}"
    n = sum(1 for r in rows if r.epoch is not None)
    lines = [
        f"Flatness and generalization gap per run, {where}; τ and ρ: rank correlation of each key with "
        f"{TARGET} (test − train loss) across {n} run(s).",
        "",
        "| key | " + " | ".join(r.run for r in rows) + " | Kendall τ | Spearman ρ |",
        "|---|" + "---:|" * (len(rows) + 2),
        "| epoch | " + " | ".join(str(r.epoch) if r.epoch is not None else "—" for r in rows) + " | | |",
    ]
    for key in keys:
        tau, rho, _ = corr.get(key, (None, None, 0))
        cells = " | ".join(fmt(r.values.get(key)) for r in rows)
        lines.append(f"| {key} | {cells} | {'' if tau is None else fmt(tau)} | {'' if rho is None else fmt(rho)} |")
    notes = [f"- {r.run}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "Not compared (excluded from τ and ρ):", *notes]
    return "\n".join(lines) + "\n"


def write_csvs(out: Path, rows: Sequence[Row], keys: Sequence[str], corr: dict) -> list[Path]:
    summary, corr_path = out / "summary.csv", out / "correlations.csv"
    with summary.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "epoch", *keys])
        for r in rows:
            w.writerow([r.run, "" if r.epoch is None else r.epoch, *(repr(r.values[k]) for k in keys)])
    with corr_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "kendall_tau", "spearman_rho", "runs"])
        for key, (tau, rho, n) in corr.items():
            w.writerow([key, repr(tau), repr(rho), n])
    return [summary, corr_path]


def make_report(
    logdir: str | Path, out: str | Path | None = None, at_train_loss: float | None = None, *,
    plots: bool = True, echo: bool = True,
) -> Report:  # fmt: skip
    """Read every run under ``logdir``; write the plots and tables to ``out``; print the table."""
    runs = load_runs(logdir)
    keys = ordered_keys(runs)
    if at_train_loss is not None and not any(TRAIN_LOSS in r.scalars for r in runs):
        raise ReportError(f"--at-train-loss needs {TRAIN_LOSS}, which no run under {logdir} logged "
                          "(FlatnessCallback(gap_num_samples=0) turns the gap off).")  # fmt: skip
    rows = [comparison_row(r, keys, at_train_loss) for r in runs]
    corr = rank_correlations([r for r in rows if r.epoch is not None], keys)
    markdown = to_markdown(rows, keys, corr, at_train_loss)
    out_dir = Path(out) if out is not None else Path(logdir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(markdown)
    files = [out_dir / "summary.md", *write_csvs(out_dir, rows, keys, corr)]
    if TARGET not in keys:
        warnings.warn(f"no run logged {TARGET} (it needs validation data): no rank correlations.", stacklevel=2)
    if plots:
        from ._landscape_plots import plot_runs
        from ._plots import plot_all

        files += plot_all(runs, rows, keys, out_dir)
        files += plot_runs(runs, out_dir)  # only when runs logged landscape views
    if echo:
        print(markdown)
        pngs = sum(1 for f in files if f.suffix == ".png")
        print(f"Wrote summary.md, summary.csv, correlations.csv and {pngs} PNG plot(s) to {out_dir}/")
    return Report(rows, keys, corr, at_train_loss, markdown, files)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("logdir", help="a TensorBoard log directory holding one sub-directory per run")
    parser.add_argument("--out", default=None, help="where to write plots and tables (default: LOGDIR/report)")
    parser.add_argument("--at-train-loss", type=float, default=None, metavar="X",
                        help="compare runs at their first measurement with gap/train_loss <= X "
                             "(default: at the end of training)")  # fmt: skip
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    return parser


def main(argv: Sequence[str] | None = None) -> Report:
    parser = add_arguments(argparse.ArgumentParser(prog="lightning-flatness report", description=DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return make_report(args.logdir, args.out, args.at_train_loss, plots=args.plots)
    except ReportError as err:
        raise SystemExit(f"lightning-flatness report: error: {err}") from None
