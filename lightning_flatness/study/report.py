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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..keys import LOSS_GAP, SECONDS, TRAIN_LOSS
from .runs import ReportError, Row, comparison_row, load_runs, ordered_keys

DESCRIPTION = (
    "Plots and a table (Markdown + CSV) of every run's flatness metrics and generalization gap, read from "
    "TensorBoard event files, with the Kendall and Spearman rank correlation of each metric with gap/loss."
)
TARGET = LOSS_GAP
NOT_CORRELATED = (TARGET, SECONDS)


@dataclass
class Report:
    rows: list[Row]
    keys: list[str]
    correlations: dict[str, tuple[float, float, int]]  # key -> (kendall tau, spearman rho, runs)
    at_train_loss: float | None
    markdown: str
    files: list[Path] = field(default_factory=list)


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
        from ..landscape.plots import plot_runs
        from .plots import plot_all

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
