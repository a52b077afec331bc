"""Runs grouped by configuration over seeds, and the statistics the report draws from them.

``lightning-flatness sweep --seeds N`` names its runs ``<configuration>_s<seed>`` (``bs64_lr0.1_s1``);
the report groups the runs of a log directory by their name without that suffix (a run without
one is a configuration of its own, so older single-seed logs report as before). Per
configuration and key: the mean over seeds with a 95% t-interval, next to the mean within-run
standard error (``<key>_se``, the measurement subsample's noise), so seed-to-seed spread and
measurement noise sit side by side. Across configurations: Kendall τ and Spearman ρ of the
per-configuration means against the gap, with a 95% percentile interval from a seeded bootstrap
over seeds, and τ per seed (its range). The sample-size guide turns ``<key>_se`` into the
measurement samples a 5% relative standard error would need.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .. import keys
from ..metrics.base import samples_needed
from .runs import Row, Run

SEED_SUFFIX = re.compile(r"^(?P<config>.+)_s(?P<seed>\d+)$")
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# When a run's hparams.yaml lacks them: the sweep's --num-samples, and the sizes of its default data
# (mnist1d, 4000 train / 1000 test), all of which the sweep's gap uses.
DEFAULT_NUM_SAMPLES = 512
DEFAULT_SPLIT_SIZES = {"train": 4000, "test": 1000}


def split_seed(name: str) -> tuple[str, int | None]:
    """``("bs64_lr0.1", 1)`` for ``"bs64_lr0.1_s1"``; ``(name, None)`` for a name without a seed suffix."""
    match = SEED_SUFFIX.match(name)
    return (match["config"], int(match["seed"])) if match else (name, None)


@dataclass
class Configuration:
    """The runs of one configuration (one per seed) with their rows at the comparison point."""

    name: str
    runs: list[Run] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)

    @property
    def compared(self) -> list[Row]:
        """The rows of the runs that reached the comparison point."""
        return [r for r in self.rows if r.epoch is not None]

    def values(self, key: str) -> np.ndarray:
        """``key`` at the comparison point of every compared run (NaN where a run did not log it)."""
        return np.array([r.values.get(key, math.nan) for r in self.compared], dtype=float)


def group_by_configuration(runs: Sequence[Run], rows: Sequence[Row]) -> list[Configuration]:
    """Runs (and their rows) grouped by name without the seed suffix, in the order of first appearance."""
    groups: dict[str, Configuration] = {}
    for run, row in zip(runs, rows):
        name, seed = split_seed(run.name)
        group = groups.setdefault(name, Configuration(name))
        group.runs.append(run)
        group.rows.append(row)
        group.seeds.append(seed)
    return list(groups.values())


# ----------------------------------------------------------------------- per configuration
@dataclass
class Spread:
    """One key over one configuration's seeds: mean, 95% t-interval (NaN below 2 seeds), the number
    of seeds with a finite value, and the mean within-run standard error (NaN if none was logged)."""

    mean: float
    low: float
    high: float
    n: int
    se: float


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """Mean of the finite values and its Student-t interval, ``mean ± t · s/√n`` (NaN bounds below 2 values)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan, 1
    half = float(t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half, int(v.size)


def spread(config: Configuration, key: str) -> Spread:
    """``key`` of ``config`` over its seeds (see :class:`Spread`)."""
    mean, low, high, n = mean_interval(config.values(key))
    se = config.values(keys.se(key))
    se = se[np.isfinite(se)]
    return Spread(mean, low, high, n, float(se.mean()) if se.size else math.nan)


def paired(first: Configuration, second: Configuration, key: str, combine: Callable[[float, float], float]) -> list[float]:
    """``combine(first's value, second's)`` of ``key`` for every seed both configurations reached the comparison
    point with: runs of one seed start from the same weights, so their pairing removes the seed's share."""
    mine = {seed: row.values.get(key, math.nan) for seed, row in zip(first.seeds, first.rows) if row.epoch is not None}
    return [combine(mine[seed], row.values.get(key, math.nan)) for seed, row in zip(second.seeds, second.rows)
            if row.epoch is not None and seed in mine]  # fmt: skip


# ------------------------------------------------------------------ across configurations
def rank_correlations(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kendall τ-b and Spearman ρ between each row of ``x`` and the same row of ``y`` (shape ``(B, n)``).

    Vectorized over rows for the bootstrap; equal to ``scipy.stats.kendalltau`` and ``spearmanr``
    (ties included). NaN where a row is constant.
    """
    from scipy.stats import rankdata

    x, y = np.atleast_2d(x), np.atleast_2d(y)
    i, j = np.triu_indices(x.shape[1], 1)
    sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sx * sy).sum(1) / np.sqrt((sx * sx).sum(1) * (sy * sy).sum(1))
        rho = (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    return tau, rho


@dataclass
class Correlation:
    """Rank correlation of a key with the gap across configurations (on the per-configuration means).

    ``tau_interval`` / ``rho_interval``: 2.5 and 97.5 percentiles of the bootstrap over seeds,
    ``None`` when a configuration has fewer than 2 seeds. ``per_seed_tau``: the lowest and highest
    τ computed at one seed (over the seeds every configuration has), ``None`` below 2 such seeds.
    """

    tau: float
    rho: float
    configurations: int
    tau_interval: tuple[float, float] | None = None
    rho_interval: tuple[float, float] | None = None
    per_seed_tau: tuple[float, float] | None = None

    @property
    def resolved(self) -> bool | None:
        """True when τ's interval excludes 0, False when it does not, None without an interval."""
        if self.tau_interval is None or not all(map(math.isfinite, self.tau_interval)):
            return None
        return self.tau_interval[0] > 0 or self.tau_interval[1] < 0


def _pairs(configs: Sequence[Configuration], key: str, target: str) -> list[np.ndarray]:
    """Per configuration, the ``(key, target)`` pairs of its runs where both are finite (configurations
    without any are dropped)."""
    out = []
    for c in configs:
        p = np.stack([c.values(key), c.values(target)], axis=1)
        p = p[np.isfinite(p).all(axis=1)]
        if len(p):
            out.append(p)
    return out


def _bootstrap(pairs: list[np.ndarray], resamples: int, seed: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile intervals of τ and ρ: resample each configuration's seeds with replacement, recompute on the means."""
    rng = np.random.default_rng(seed)
    xs, ys = np.empty((resamples, len(pairs))), np.empty((resamples, len(pairs)))
    for c, p in enumerate(pairs):
        idx = rng.integers(0, len(p), size=(resamples, len(p)))
        xs[:, c], ys[:, c] = p[idx, 0].mean(1), p[idx, 1].mean(1)
    tau, rho = rank_correlations(xs, ys)
    q = [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2]

    def interval(v: np.ndarray) -> tuple[float, float]:
        v = v[np.isfinite(v)]  # a resample whose means are all equal has no rank correlation
        return (float(np.percentile(v, q[0])), float(np.percentile(v, q[1]))) if v.size else (math.nan, math.nan)

    return interval(tau), interval(rho)


def _per_seed_tau(configs: Sequence[Configuration], key: str, target: str) -> tuple[float, float] | None:
    """Range of τ over the seeds that every configuration ran (each τ across configurations at that seed)."""
    common = set.intersection(*({s for s in c.seeds if s is not None} for c in configs)) if configs else set()
    taus = []
    for s in sorted(common):
        rows = [c.rows[c.seeds.index(s)] for c in configs]
        x = np.array([[r.values.get(key, math.nan) if r.epoch is not None else math.nan for r in rows]])
        y = np.array([[r.values.get(target, math.nan) if r.epoch is not None else math.nan for r in rows]])
        keep = np.isfinite(x[0]) & np.isfinite(y[0])
        if keep.sum() >= 2:
            taus.append(float(rank_correlations(x[:, keep], y[:, keep])[0][0]))
    taus = [t for t in taus if math.isfinite(t)]
    return (min(taus), max(taus)) if len(taus) >= 2 else None


def correlation(
    configs: Sequence[Configuration], key: str, target: str = keys.LOSS_GAP, *,
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> Correlation:  # fmt: skip
    """τ and ρ of ``key`` with ``target`` on the per-configuration means, with their bootstrap intervals."""
    pairs = _pairs(configs, key, target)
    if len(pairs) < 2:
        return Correlation(math.nan, math.nan, len(pairs))
    means = np.array([p.mean(axis=0) for p in pairs])
    tau, rho = (float(v[0]) for v in rank_correlations(means[None, :, 0], means[None, :, 1]))
    result = Correlation(tau, rho, len(pairs), per_seed_tau=_per_seed_tau(configs, key, target))
    if min(len(p) for p in pairs) >= 2:
        result.tau_interval, result.rho_interval = _bootstrap(pairs, resamples, seed)
    return result


# -------------------------------------------------------------------------- sample sizes
def _last_logged(run: Run, key: str) -> int | None:
    """The callback's latest bookkeeping value ``key`` in ``run`` (``None`` if it logged none)."""
    series = run.callback.get(key)
    return int(series[max(series)]) if series else None


def _split(run: Run, key: str) -> str:
    """``"train"`` or ``"val"``: the data set ``key``'s subsample was drawn from."""
    return keys.split_of(keys.subsample_of(key), str(run.hparams.get(f"{keys.CALLBACK_PREFIX}source", "train")))


def data_size(run: Run, key: str) -> int | None:
    """The samples of the data set ``key`` was measured on: logged by the callback, else the sweep's
    ``study/train_size`` / ``study/test_size`` hyperparameter, else unknown (``None``)."""
    split = _split(run, key)
    logged = _last_logged(run, keys.dataset_size(split))
    study = run.hparams.get(f"study/{'train' if split == 'train' else 'test'}_size")
    return logged if logged is not None else int(study) if isinstance(study, (int, float)) else None


def measured_on(run: Run, key: str) -> int:
    """How many samples ``key`` was measured on in ``run``: the size of its subsample as drawn, which
    the callback logs (``flatness_callback/samples/<part>``; a data set smaller than asked gives
    all it has). For older logs: the configured size (``hparams.yaml``) capped at the data set's
    (:func:`data_size`), else the sweep's defaults: 512 measurement samples, all of mnist1d's
    splits for the gap."""
    logged = _last_logged(run, keys.drawn_samples(keys.subsample_of(key)))
    if logged is not None:
        return logged
    hp, gap = run.hparams, key.startswith(keys.GAP_PREFIX)
    size = data_size(run, key) or math.inf
    if not gap:
        return int(min(hp.get(f"{keys.CALLBACK_PREFIX}num_samples", DEFAULT_NUM_SAMPLES), size))
    n = min(hp.get(f"{keys.CALLBACK_PREFIX}gap_num_samples", math.inf), size)
    return int(n) if math.isfinite(n) else DEFAULT_SPLIT_SIZES["train" if _split(run, key) == "train" else "test"]


@dataclass
class GuideRow:
    """Per configuration: the relative standard error of ``key`` (mean se / |mean value| over seeds)
    and the samples a relative error of ``keys.RELATIVE_SE_TARGET`` would need (None if unknown)."""

    key: str
    measured_on: int
    relative: list[float]
    needed: list[int | None]
    available: int | None = None  # the samples of the data set it was measured on, where known


def sample_size_guide(configs: Sequence[Configuration], value_keys: Sequence[str]) -> list[GuideRow]:
    """One row per key of ``keys.RELATIVE_SE_KEYS`` that was logged with its ``_se`` (positive by
    construction, so a relative error means something; a cosine or a gap can sit near 0)."""
    out = []
    for key in (k for k in keys.RELATIVE_SE_KEYS if k in value_keys):
        stats = [spread(c, key) for c in configs]
        if not any(math.isfinite(s.se) for s in stats):
            continue
        run = configs[0].runs[0]
        n = measured_on(run, key)
        relative = [abs(s.se / s.mean) if s.mean else math.nan for s in stats]
        needed = [samples_needed(n, s.mean, s.se, keys.RELATIVE_SE_TARGET) for s in stats]
        out.append(GuideRow(key, n, relative, needed, data_size(run, key)))
    return out
