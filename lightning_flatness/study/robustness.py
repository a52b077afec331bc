"""The report's answer to Yao et al.'s (2018) second question: robustness to adversaries per batch size,
the top Hessian eigenvalue of normally and adversarially trained runs, and the top of the spectrum.

A configuration trained on adversarial examples is named like its normal twin plus ``_adv-<attack><ε>``
(``bs64_lr0.1_adv-fgsm0.1``, as ``sweep --adversarial-training`` names them). The runs are compared
where the sweep stops them, at matched (clean) training loss. Per training (normal, or each adversarial
kind), Kendall τ of the robust accuracy against the batch size, with a bootstrap interval over seeds
(:func:`~lightning_flatness.study.seeds.correlation` with the batch size as the second variable).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from .. import keys
from .runs import Row, batch_size_of
from .seeds import Configuration, correlation, mean_interval, paired, spread
from .tables import _interval, _resolved, _seed_cell, fmt

ADVERSARIAL_SUFFIX = re.compile(r"_adv-(?P<kind>[a-z]+[0-9.e+-]+)$")
BATCH_SIZE = "study/batch_size"  # the batch size as a row value, for the rank correlation against it
NORMAL = "normal"
SPECTRUM_KEY = re.compile(r"flatness/hessian_eig_(\d+)")
ROBUST_COMPARED = (*keys.robust_keys("pgd")[::2], *keys.robust_keys("fgsm")[::2])  # accuracies and drops


def training_of(config: str) -> tuple[str, str]:
    """``("bs64_lr0.1", "adv-fgsm0.1")`` for ``"bs64_lr0.1_adv-fgsm0.1"``; ``(name, "normal")`` otherwise."""
    match = ADVERSARIAL_SUFFIX.search(config)
    return (config[: match.start()], f"adv-{match['kind']}") if match else (config, NORMAL)


def spectrum_keys(present: Sequence[str]) -> list[str]:
    """``flatness/hessian_eig_{j}`` among ``present``, by ``j``."""
    found = [(int(m.group(1)), k) for k in present if (m := SPECTRUM_KEY.fullmatch(k))]
    return [k for _, k in sorted(found)]


def _with_batch_size(config: Configuration) -> Configuration:
    size = batch_size_of(config.runs[0])
    rows = [Row(r.run, r.epoch, {**r.values, BATCH_SIZE: float(size or math.nan)}, r.note) for r in config.rows]
    return Configuration(config.name, config.runs, rows, config.seeds)


def _trainings(configs: Sequence[Configuration]) -> dict[str, list[Configuration]]:
    groups: dict[str, list[Configuration]] = {}
    for c in configs:
        groups.setdefault(training_of(c.name)[1], []).append(_with_batch_size(c))
    return groups


def robustness_section(configs: Sequence[Configuration], resamples: int, seed: int) -> list[str]:
    """Markdown: robustness per configuration and its τ against the batch size, then the top eigenvalue
    normal vs adversarial per batch size. ``[]`` when no run measured ``adversarial_robustness``."""
    present = [k for k in ROBUST_COMPARED if any(math.isfinite(v) for c in configs for v in c.values(k))]
    if not present:
        return []
    shown = [keys.TEST_ACC, *present, keys.HESSIAN_TOP_EIG]
    lines = ["Robustness to adversaries (Yao et al. 2018) at matched training loss: mean [95% interval over seeds] "
             "(mean within-run se).", "",
             "| configuration | training | batch size | " + " | ".join(f"`{k}`" for k in shown) + " |",
             "|---|---|---:|" + "---:|" * len(shown)]  # fmt: skip
    for c in configs:
        base, training = training_of(c.name)
        cells = [c.name, training, str(batch_size_of(c.runs[0]) or "—"), *(_seed_cell(c, k) for k in shown)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Kendall τ against the batch size, per training, with its 95% bootstrap interval over seeds:", "",
              "| training | key | τ | interval | resolved |", "|---|---|---:|---|---|"]  # fmt: skip
    for training, group in _trainings(configs).items():
        for key in (*present, keys.HESSIAN_TOP_EIG):
            corr = correlation(group, key, BATCH_SIZE, resamples=resamples, seed=seed)
            lines.append(f"| {training} | `{key}` | {fmt(corr.tau)} | {_interval(corr.tau_interval)} | {_resolved(corr)} |")
    return lines + ["", *_eigenvalue_table(configs)]


def _eigenvalue_table(configs: Sequence[Configuration]) -> list[str]:
    """The top eigenvalue of each adversarial configuration beside its normal twin's."""
    by_name = {c.name: c for c in configs}
    pairs = [(by_name[base], c, training) for c in configs
             for base, training in [training_of(c.name)] if training != NORMAL and base in by_name]  # fmt: skip
    if not pairs:
        return []
    key = keys.HESSIAN_TOP_EIG
    lines = [f"Top Hessian eigenvalue `{key}`, normal vs adversarial training: mean [95% interval over seeds]; the "
             "ratio adversarial / normal per seed (both runs of a seed start from the same weights), its mean and "
             "95% interval.", "", "| configuration | normal | adversarial | training | adversarial / normal |",
             "|---|---:|---:|---|---:|"]  # fmt: skip
    for normal, adversarial, training in pairs:
        mean, low, high, n = mean_interval(paired(normal, adversarial, key, lambda n, a: a / n))
        ratio = fmt(mean) + (f" [{fmt(low)}, {fmt(high)}]" if n >= 2 else "")
        lines.append(f"| {normal.name} | {_seed_cell(normal, key)} | {_seed_cell(adversarial, key)} | {training} | "
                     f"{ratio} |")  # fmt: skip
    return lines


def plot_spectrum(configs: Sequence[Configuration], out: Path) -> list[Path]:
    """``hessian_spectrum.png``: the top eigenvalues at the compared point per configuration (Yao et al.'s
    Figure 3), the mean over seeds with the mean within-run standard error as error bars; adversarially
    trained configurations dashed. ``[]`` when no run logged more than the top eigenvalue."""
    from .._figures import colors, figure

    present = {k for c in configs for r in c.compared for k in r.values}
    eig_keys = spectrum_keys(present)
    if len(eig_keys) < 2:
        return []
    fig = figure(7.0, 4.4, layout="constrained")
    ax = fig.add_subplot()
    bases = list(dict.fromkeys(training_of(c.name)[0] for c in configs))
    color_of = dict(zip(bases, colors(len(bases))))  # a twin trained adversarially shares its normal run's color
    for c in configs:
        color = color_of[training_of(c.name)[0]]
        stats = [spread(c, k) for k in eig_keys]
        j = [i + 1 for i, s in enumerate(stats) if math.isfinite(s.mean)]
        if not j:
            continue
        means = [stats[i - 1].mean for i in j]
        errors = [stats[i - 1].se if math.isfinite(stats[i - 1].se) else 0.0 for i in j]
        style = "-" if training_of(c.name)[1] == NORMAL else "--"
        ax.errorbar(j, means, yerr=errors, fmt=style + "o", ms=3, capsize=2, color=color, label=c.name)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("j (eigenvalue index, largest first)")
    ax.set_ylabel("λ_j of the Hessian")
    ax.set_title("Top Hessian eigenvalues (mean over seeds ± within-run se)")
    ax.legend(fontsize=7, ncol=2)
    path = out / "hessian_spectrum.png"
    fig.savefig(path, dpi=110)
    return [path]
