"""The report's tables: ``summary.md`` (Markdown) and its CSV files.

One seed per configuration: one column per run with its value (± its within-run standard error
when logged) and Kendall τ / Spearman ρ against the gap, as the report always wrote. Several
seeds: the mean over seeds with its 95% t-interval and the mean within-run standard error per
configuration, then a table of τ and ρ with their bootstrap intervals and which the data resolve.
Both end with the sample-size guide when the runs logged ``<key>_se``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import keys
from .runs import Row, batch_size_of
from ..metrics.sample_size import BEYOND_THE_DATA
from .seeds import BOOTSTRAP_RESAMPLES, CONFIDENCE, Configuration, Correlation, GuideRow, split_seed, spread

TARGET = keys.LOSS_GAP


@dataclass
class Report:
    """What the report computed: ``rows`` one per run, ``keys`` the logged keys (without their ``_se``),
    the runs grouped by ``configurations``, the ``correlations`` of each key with the gap, the
    sample-size ``guide``; ``resamples``: the bootstrap's."""

    rows: list[Row]
    keys: list[str]
    configurations: list[Configuration]
    correlations: dict[str, Correlation]
    guide: list[GuideRow]
    at_train_loss: float | None
    markdown: str = ""
    files: list[Path] = field(default_factory=list)
    resamples: int = BOOTSTRAP_RESAMPLES


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.5g}"


def _short(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3g}"


def _where(at_train_loss: float | None) -> str:
    if at_train_loss is None:
        return "at the end of training (each run's last measurement)"
    return f"at each run's first measurement with training loss (gap/train_loss) <= {at_train_loss:g}"


def multi_seed(configs: Sequence[Configuration]) -> bool:
    return any(len(c.runs) > 1 for c in configs)


def _single_seed_table(report: Report) -> list[str]:
    """One column per configuration (= run): the value, ± its within-run se when logged, and τ, ρ."""
    configs, corr = report.configurations, report.correlations
    lines = [
        "| key | " + " | ".join(c.name for c in configs) + " | Kendall τ | Spearman ρ |",
        "|---|" + "---:|" * (len(configs) + 2),
        "| epoch | " + " | ".join("—" if c.rows[0].epoch is None else str(c.rows[0].epoch) for c in configs) + " | | |",
    ]
    for key in report.keys:
        cells = []
        for c in configs:
            value, se = c.rows[0].values.get(key, math.nan), c.rows[0].values.get(keys.se(key), math.nan)
            cells.append(fmt(value) + (f" ± {se:.2g}" if math.isfinite(se) else ""))
        c_ = corr.get(key)
        tau, rho = ("", "") if c_ is None else (fmt(c_.tau), fmt(c_.rho))
        lines.append(f"| {key} | {' | '.join(cells)} | {tau} | {rho} |")
    lines += ["", "± is the within-run standard error (`<key>_se`: the draw of the measurement subsample). One seed "
              "per configuration: τ and ρ have no interval, so whether the data resolve them cannot be told; run the "
              "sweep with `--seeds 3` or more."]  # fmt: skip
    return lines


def _seed_cell(c: Configuration, key: str) -> str:
    s = spread(c, key)
    text = fmt(s.mean)
    if s.n >= 2:
        text += f" [{_short(s.low)}, {_short(s.high)}]"
    return text + (f" (se {s.se:.2g})" if math.isfinite(s.se) else "")


def epochs_cell(c: Configuration) -> str:
    """The compared epoch of a configuration's seeds: ``23``, or their range ``23–25``; — if none."""
    e = [r.epoch for r in c.compared]
    return "—" if not e else str(e[0]) if min(e) == max(e) else f"{min(e)}–{max(e)}"


def _multi_seed_table(report: Report) -> list[str]:
    """One column per configuration: mean over seeds [95% t-interval] (mean within-run se)."""
    configs = report.configurations
    lines = [
        "| key | " + " | ".join(c.name for c in configs) + " |",
        "|---|" + "---:|" * len(configs),
        "| seeds | " + " | ".join(str(len(c.compared)) for c in configs) + " |",
        "| epoch | " + " | ".join(epochs_cell(c) for c in configs) + " |",
    ]
    lines += [f"| {key} | " + " | ".join(_seed_cell(c, key) for c in configs) + " |" for key in report.keys]
    return lines


def _interval(bounds: tuple[float, float] | None) -> str:
    if bounds is None or all(math.isnan(b) for b in bounds):  # no interval, or every resample tied
        return "—"
    return f"[{_short(bounds[0])}, {_short(bounds[1])}]"


def _resolved(c: Correlation) -> str:
    if c.resolved is None:
        return "—"
    if not c.resolved:
        return "no"
    return "**yes**, positive" if c.tau_interval[0] > 0 else "**yes**, negative"


def _correlation_table(report: Report) -> list[str]:
    k = max((c.configurations for c in report.correlations.values()), default=0)
    lines = [
        f"Rank correlation with {TARGET} across the {k} configurations, on the means over seeds:",
        "",
        "| key | Kendall τ | 95% interval | τ per seed (min … max) | Spearman ρ | 95% interval | resolved |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, c in report.correlations.items():
        per_seed = "—" if c.per_seed_tau is None else f"{_short(c.per_seed_tau[0])} … {_short(c.per_seed_tau[1])}"
        lines.append(f"| {key} | {fmt(c.tau)} | {_interval(c.tau_interval)} | {per_seed} | {fmt(c.rho)} | "
                     f"{_interval(c.rho_interval)} | {_resolved(c)} |")  # fmt: skip
    p = f" (1/{math.factorial(k)} for {k})" if 2 <= k <= 8 else ""
    lines += ["", f"**Resolved**: the {CONFIDENCE:.0%} bootstrap interval of τ excludes 0. The bootstrap resamples "
              f"each configuration's seeds with replacement ({report.resamples} times, seeded), recomputes the "
              "means and τ, ρ on them, and takes the 2.5 and 97.5 percentiles; τ per seed is τ across the "
              "configurations at one seed. Both cover the seed-to-seed spread only: with few configurations τ takes "
              f"few values, and even a perfect order has a permutation p-value of 1/k!{p}; with few seeds the "
              "bootstrap interval is narrower than the truth."]  # fmt: skip
    return lines


def _guide(report: Report) -> list[str]:
    if not report.guide:
        return []
    configs = report.configurations
    lines = [
        f"Sample-size guide: the measurement samples that would bring each metric's relative standard error under "
        f"{keys.RELATIVE_SE_TARGET:.0%}, n · (se / ({keys.RELATIVE_SE_TARGET:g} · |value|))² from the within-run "
        "`<key>_se` (mean value and mean se over seeds at the compared point); each cell: relative se → samples.",
        "",
        "| key | measured on | of | " + " | ".join(c.name for c in configs) + " | enough everywhere? |",
        "|---|---:|---:|" + "---:|" * len(configs) + "---|",
    ]
    beyond = False
    for g in report.guide:
        cells = [f"{r:.1%} → {n}" if n is not None else "—" for r, n in zip(g.relative, g.needed)]
        most = max((n for n in g.needed if n is not None), default=None)
        verdict = "—" if most is None else ("yes" if most <= g.measured_on else f"no: about {most}")
        if most is not None and g.available is not None and most > g.available:
            verdict += f", more than the {g.available} the data set holds"
            beyond = True
        of = "—" if g.available is None else str(g.available)
        lines.append(f"| {g.key} | {g.measured_on} | {of} | {' | '.join(cells)} | {verdict} |")
    lines += ["", "*Measured on*: the samples of the subsample as drawn (the callback logs them; a data set smaller "
              "than `num_samples` or `gap_num_samples` gives all it has); *of*: the data set it was drawn from. "
              "Flatness keys are measured on the callback's subsample (`num_samples`), the gap's losses on "
              "`gap_num_samples` of each split. Keys whose value can sit near 0 (the gradient cosine, the gaps) have "
              "no meaningful relative error and are left out, as is PACGen, whose `_se` comes from its probes and "
              "ρ draws rather than the subsample."]  # fmt: skip
    if beyond:
        lines[-1] += f" Where more samples than the data set holds would be needed: {BEYOND_THE_DATA}."
    return lines


def _noise_scale_table(report: Report) -> list[str]:
    """Each configuration's batch size beside its gradient noise scale (first and compared measurement)."""
    key = keys.GRAD_NOISE_SCALE
    if key not in report.keys:
        return []
    lines = [
        f"Gradient noise scale `{key}` (B_simple, the critical batch size estimate; McCandlish et al. 2018) vs "
        "each configuration's batch size B: at the first measurement and at the compared point (mean over seeds).",
        "",
        "| configuration | batch size B | noise scale, first | noise scale, compared | B / noise scale | regime |",
        "|---|---:|---:|---:|---:|---|",
    ]
    unknown_size = unresolved = False
    for c in report.configurations:
        size = batch_size_of(c.runs[0])
        firsts = [series[0][1] for run in c.runs if (series := run.series(key))]
        first = sum(firsts) / len(firsts) if firsts else math.nan
        compared = spread(c, key)
        unknown_size |= size is None
        unresolved |= not (math.isfinite(first) and math.isfinite(compared.mean))
        ratio = size / compared.mean if size and compared.mean > 0 else math.nan
        regime = ("batch size unknown" if size is None else "—" if not math.isfinite(ratio)
                  else "below it: noise-dominated" if ratio < 1 else "above it")  # fmt: skip
        se = f" ± {compared.se:.2g}" if math.isfinite(compared.se) else ""
        shown = "unknown" if size is None else str(size)
        cells = [c.name, shown, fmt(first), fmt(compared.mean) + se, _short(ratio), regime]
        lines.append(f"| {' | '.join(cells)} |")
    lines += ["", ("A run whose batch size is well below the noise scale takes noise-dominated steps (a larger batch "
                   "would cut the steps nearly in proportion); well above it, extra samples per step buy little.")]
    if unresolved:
        lines[-1] += (" A noise scale of — was not logged: the measurement subsample did not resolve the mean "
                      "gradient above its noise (see docs/study.md).")
    if unknown_size:
        lines[-1] += (" Batch size unknown: the run's hparams.yaml has no `batch_size` and its name no `bs<B>` (runs "
                      "the sweep did not make); save it as a hyperparameter (`self.save_hyperparameters()` with a "
                      "`batch_size` argument) or name the run `bs<B>_...`.")
    return lines


def to_markdown(report: Report) -> str:
    """``summary.md``: the values table, the correlations (with intervals for several seeds), the guide."""
    configs = report.configurations
    runs = sum(len(c.compared) for c in configs)
    several = "several seeds: mean [95% t-interval over seeds] (mean within-run se)"
    seeds = several if multi_seed(configs) else "one seed"
    lines = [f"Flatness and generalization gap per configuration, {_where(report.at_train_loss)}; "
             f"{len(configs)} configuration(s), {runs} run(s) compared, {seeds}. τ and ρ: rank correlation of each "
             f"key with {TARGET} (test − train loss).", ""]  # fmt: skip
    if multi_seed(configs):
        lines += [*_multi_seed_table(report), "", *_correlation_table(report)]
    else:
        lines += _single_seed_table(report)
    noise = _noise_scale_table(report)
    lines += ["", *noise] if noise else []
    guide = _guide(report)
    lines += ["", *guide] if guide else []
    notes = [f"- {r.run}: {r.note}" for r in report.rows if r.note]
    if notes:
        lines += ["", "Not compared (excluded from the means, τ and ρ):", *notes]
    return "\n".join(lines) + "\n"


def _bound(bounds: tuple[float, float] | None, i: int) -> str:
    return "" if bounds is None else repr(bounds[i])


def write_csvs(out: Path, report: Report, row_keys: Sequence[str]) -> list[Path]:
    """``summary.csv`` (one row per run), ``configurations.csv`` (per configuration and key), ``correlations.csv``."""
    paths = [out / "summary.csv", out / "configurations.csv", out / "correlations.csv"]
    with paths[0].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "configuration", "seed", "epoch", *row_keys])
        for r in report.rows:
            config, seed = split_seed(r.run)
            w.writerow([r.run, config, "" if seed is None else seed, "" if r.epoch is None else r.epoch,
                        *(repr(r.values[k]) for k in row_keys)])  # fmt: skip
    with paths[1].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["configuration", "key", "seeds", "mean", "low", "high", "mean_se"])
        for c in report.configurations:
            for key in report.keys:
                s = spread(c, key)
                w.writerow([c.name, key, s.n, repr(s.mean), repr(s.low), repr(s.high), repr(s.se)])
    with paths[2].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "kendall_tau", "tau_low", "tau_high", "spearman_rho", "rho_low", "rho_high",
                    "tau_per_seed_min", "tau_per_seed_max", "resolved", "configurations"])  # fmt: skip
        for key, c in report.correlations.items():
            resolved = "" if c.resolved is None else c.resolved
            w.writerow([key, repr(c.tau), _bound(c.tau_interval, 0), _bound(c.tau_interval, 1), repr(c.rho),
                        _bound(c.rho_interval, 0), _bound(c.rho_interval, 1), _bound(c.per_seed_tau, 0),
                        _bound(c.per_seed_tau, 1), resolved, c.configurations])  # fmt: skip
    return paths

