"""``lightning-flatness report LOGDIR``: compare runs' flatness and generalization gap.

Reads the TensorBoard event files of every run under ``LOGDIR`` (a run is a directory that
holds ``events.out.tfevents.*`` files; its name is its path relative to ``LOGDIR``), keeps the
``flatness/*`` and ``gap/*`` scalars that :class:`~lightning_flatness.FlatnessCallback` logs (with
their standard errors ``<key>_se``) by epochs completed (``flatness_callback/epochs_completed``,
logged with every row; older logs: their step), and groups the runs by
configuration: a run named ``<configuration>_s<seed>`` (``bs64_lr0.1_s1``, as ``sweep --seeds``
names them) is one seed of ``<configuration>``; any other name is a configuration of its own.
It writes to ``--out`` (default ``LOGDIR/report``):

- ``<key>_vs_epoch.png`` and ``<key>_vs_train_loss.png`` for every logged key (a curve per
  configuration; with several seeds their mean and a min–max band, interpolated onto shared
  x-values; the second uses ``gap/train_loss`` as the x-axis, the matched-loss view), and
  ``overview.png`` (the flatness metrics and the gap vs training loss, one panel each);
- ``landscape_1d.png`` and ``landscape_eigenvector.png`` when runs logged loss-landscape views
  (``FlatnessCallback(landscape_every_n_epochs=...)``): each configuration's first seed's
  latest 1-D filter-normalized slice on one figure, and its slice along the top Hessian
  eigenvector (train solid, validation dashed), read from ``<run>/landscape/epoch_*.json``;
- ``hessian_density.png`` when runs logged ``HessianDensity``: each configuration's first seed's
  latest smoothed Hessian eigenvalue density, read from ``<run>/hessian_density/epoch_*.json``;
- ``hessian_spectrum.png`` when runs logged more than the top eigenvalues
  (``HessianEigenvalues(final_k=...)``, ``sweep --spectrum-k``): the top of the spectrum per
  configuration, mean over seeds ± within-run se (Yao et al. 2018, Figure 3); those keys then
  have no rows of their own in the table;
- ``summary.md``: one row per key, one column per configuration, at the comparison point. With
  one seed: the value (± its within-run standard error) and Kendall τ / Spearman ρ between each
  key and ``gap/loss`` across configurations. With several: the mean over seeds, its 95%
  t-interval and the mean within-run standard error, then τ and ρ on the means with 95%
  bootstrap intervals over seeds, τ per seed, and whether the data resolve the correlation (τ's
  interval excludes 0). Then the sample-size guide: per metric, the measurement samples that
  would bring its relative standard error under 5% (:mod:`lightning_flatness.study.seeds`). When
  runs measured ``adversarial_robustness``: the robustness per configuration, its Kendall τ against
  the batch size per training (normal, or adversarial: ``sweep --adversarial-training``) with a
  bootstrap interval, and the top eigenvalue of adversarially trained configurations beside their
  normal twins' (:mod:`lightning_flatness.study.robustness`). When the configurations differ in
  architecture (``sweep --architectures``): per configuration the top and bottom Hessian eigenvalues,
  ``|λ_min/λ_max|``, the gap and the test accuracy, and each no-skip network against its ResNet twin
  per seed (:mod:`lightning_flatness.study.architectures`);
- ``landscape_2d_architectures.png`` with those architectures: each one's final 2-D slice beside its
  convexity map (first seed);
- ``summary.csv`` (one row per run), ``configurations.csv`` (mean, interval and mean se per
  configuration and key) and ``correlations.csv``.

The comparison point of a run is the end of training (its last measurement), or with
``--at-train-loss X`` its first measurement with ``gap/train_loss <= X``. A key's value there is
its latest logged value at or before that epoch (the same value when, as usual, every key is
logged at every measurement).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Sequence

from ..keys import LOSS_GAP, SECONDS, TRAIN_LOSS, se
from .architectures import architecture_section, plot_architectures
from .arguments import positive_float
from .robustness import plot_spectrum, robustness_section, spectrum_keys
from .runs import ReportError, comparison_row, load_runs, ordered_keys
from .seeds import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, correlation, group_by_configuration, sample_size_guide
from .tables import Report, to_markdown, write_csvs

DESCRIPTION = (
    "Plots and tables (Markdown + CSV) of every run's flatness metrics and generalization gap, read from "
    "TensorBoard event files; runs named <configuration>_s<seed> are grouped over seeds (mean, 95% interval, bands), "
    "with the Kendall and Spearman rank correlation of each metric with gap/loss (with a bootstrap interval over "
    "seeds) and a sample-size guide from the logged standard errors."
)
TARGET = LOSS_GAP
NOT_CORRELATED = (TARGET, SECONDS)
SPECTRUM_IN_TABLE = 3  # more eigenvalues than this per run (HessianEigenvalues(final_k=)): a figure instead of rows


def analyse(
    logdir: str | Path, at_train_loss: float | None = None, *, resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Report:  # fmt: skip
    """Read every run under ``logdir``, group them over seeds, and compute the report (no files written)."""
    runs = load_runs(logdir)
    logged = ordered_keys(runs)
    eigs = spectrum_keys(logged)
    spectrum = eigs if len(eigs) > SPECTRUM_IN_TABLE else []
    keys = [k for k in logged if k not in spectrum]  # a long spectrum has its own figure, not rows and curves
    if at_train_loss is not None and not any(TRAIN_LOSS in r.scalars for r in runs):
        raise ReportError(f"--at-train-loss needs {TRAIN_LOSS}, which no run under {logdir} logged "
                          "(FlatnessCallback(gap_num_samples=0) turns the gap off).")  # fmt: skip
    row_keys = [*keys, *spectrum]
    row_keys += [se(k) for k in row_keys if any(se(k) in r.scalars for r in runs)]
    rows = [comparison_row(r, row_keys, at_train_loss) for r in runs]
    configs = group_by_configuration(runs, rows)
    corr = {}
    if TARGET in keys:
        corr = {k: correlation(configs, k, TARGET, resamples=resamples, seed=seed)
                for k in keys if k not in NOT_CORRELATED}  # fmt: skip
    report = Report(rows, keys, configs, corr, sample_size_guide(configs, keys), at_train_loss, resamples=resamples)
    report.markdown = to_markdown(report)
    for section in (robustness_section(configs, resamples, seed), architecture_section(configs)):
        report.markdown += "\n" + "\n".join(section) + "\n" if section else ""
    return report


def make_report(
    logdir: str | Path, out: str | Path | None = None, at_train_loss: float | None = None, *,
    plots: bool = True, echo: bool = True, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> Report:  # fmt: skip
    """Read every run under ``logdir``; write the plots and tables to ``out``; print the table.

    ``resamples`` and ``seed``: the bootstrap over seeds behind the intervals of τ and ρ.
    """
    report = analyse(logdir, at_train_loss, resamples=resamples, seed=seed)
    out_dir = Path(out) if out is not None else Path(logdir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(report.markdown)
    row_keys = list(report.rows[0].values)
    report.files = [out_dir / "summary.md", *write_csvs(out_dir, report, row_keys)]
    if TARGET not in report.keys:
        warnings.warn(f"no run logged {TARGET} (it needs validation data): no rank correlations.", stacklevel=2)
    if plots:
        from ..landscape.plots import plot_runs
        from .density import plot_density
        from .plots import plot_all

        report.files += plot_all(report.configurations, report.keys, out_dir)
        # One run per configuration (its first seed): every seed's slices on one figure would not be read.
        report.files += plot_runs([c.runs[0] for c in report.configurations], out_dir)
        report.files += plot_density([c.runs[0] for c in report.configurations], out_dir)
        report.files += plot_spectrum(report.configurations, out_dir)
        report.files += plot_architectures(report.configurations, out_dir)
    if echo:
        print(report.markdown)
        pngs = sum(1 for f in report.files if f.suffix == ".png")
        print(f"Wrote summary.md, summary.csv, configurations.csv, correlations.csv and {pngs} PNG plot(s) to "
              f"{out_dir}/")  # fmt: skip
    return report


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("logdir", help="a TensorBoard log directory holding one sub-directory per run")
    parser.add_argument("--out", default=None, help="where to write plots and tables (default: LOGDIR/report)")
    parser.add_argument("--at-train-loss", type=positive_float, default=None, metavar="X",
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
