"""The runs of a log directory, read back from TensorBoard event files (and each run's
``hparams.yaml``), and each run's comparison point (the end of training, or a matched training loss)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..keys import (
    CALLBACK_PREFIX,
    EPOCHS_COMPLETED,
    FLATNESS_PREFIX,
    GAP_PREFIX,
    HESSIAN_TOP_EIG,
    REPORT_ORDER,
    ROBUST_PREFIX,
    TRAIN_LOSS,
    se,
)

PREFIXES = (FLATNESS_PREFIX, GAP_PREFIX, ROBUST_PREFIX)


class ReportError(ValueError):
    """The log directory holds no run, or no run with the callback's metrics."""


@dataclass
class Run:
    """One run's ``flatness/*`` and ``gap/*`` scalars, ``{key: {epochs completed: value}}``, its
    hyperparameters (``hparams.yaml``'s top-level entries; empty if there is none) and the
    callback's bookkeeping scalars (``flatness_callback/*``, e.g. the drawn subsample sizes)."""

    name: str
    path: Path
    scalars: dict[str, dict[int, float]]
    hparams: dict[str, Any] = field(default_factory=dict)
    callback: dict[str, dict[int, float]] = field(default_factory=dict)

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
    """``{tag: {epochs completed: value}}`` of the ``flatness/*``, ``gap/*`` and ``flatness_callback/*``
    scalars in one directory's event files (see :func:`by_epochs_completed`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    tags = [t for t in acc.Tags().get("scalars", []) if t.startswith((*PREFIXES, CALLBACK_PREFIX))]
    return by_epochs_completed({tag: acc.Scalars(tag) for tag in tags})


def by_epochs_completed(events: dict[str, Sequence[Any]]) -> dict[str, dict[int, float]]:
    """Scalar events (``.step``, ``.value``, ``.wall_time``) keyed by the epochs completed of their row.

    The callback logs each row at Lightning's step for the same weights, with
    ``flatness_callback/epochs_completed``; a value belongs to the row written at the same step
    at the nearest time (one step may hold two rows: the initialization and the end of a one-batch
    first epoch). Logs without that scalar, written when rows went to ``step = epochs completed``,
    are read by step. The last write of a key at an x wins (the final row's total seconds).
    """
    rows = events.get(EPOCHS_COMPLETED)
    at_step: dict[int, list[Any]] = {}
    for row in rows or ():
        at_step.setdefault(int(row.step), []).append(row)
    out: dict[str, dict[int, float]] = {}
    for tag, series in events.items():
        if tag == EPOCHS_COMPLETED:
            continue
        values = out.setdefault(tag, {})
        for e in series:
            if rows is None:
                values[int(e.step)] = float(e.value)
            elif at_step.get(int(e.step)):
                row = min(at_step[int(e.step)], key=lambda r: abs(r.wall_time - e.wall_time))
                values[int(row.value)] = float(e.value)
    return out


def read_hparams(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``hparams.yaml`` (Lightning's TensorBoardLogger writes it), or ``{}``.

    Lightning writes tuples with the ``!!python/tuple`` tag, which ``yaml.safe_load`` refuses;
    they are read as lists. A file that does not parse is ignored: hyperparameters only refine the report.
    """
    import yaml

    path = Path(run_dir) / "hparams.yaml"
    if not path.is_file():
        return {}

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))
    try:
        data = yaml.load(path.read_text(), Loader=Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def load_runs(logdir: str | Path) -> list[Run]:
    """Every run under ``logdir`` with at least one ``flatness/*``, ``gap/*`` or ``robust/*`` scalar, naturally sorted.

    Raises :class:`ReportError` when there is no event file or no run has those scalars.
    """
    root = Path(logdir)
    dirs = find_run_dirs(root)
    if not dirs:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {root}: no runs to report.")
    runs, empty = [], []
    for name, d in zip(_run_names(root, dirs), dirs):
        logged = read_scalars(d)
        scalars = {k: v for k, v in logged.items() if k.startswith(PREFIXES)}
        bookkeeping = {k: v for k, v in logged.items() if k.startswith(CALLBACK_PREFIX)}
        (runs.append(Run(name, d, scalars, read_hparams(d), bookkeeping)) if scalars else empty.append(name))
    if not runs:
        raise ReportError(
            f"none of the {len(dirs)} run(s) under {root} ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}) "
            "logged flatness/*, gap/* or robust/* scalars; train them with lightning_flatness.FlatnessCallback."
        )
    if empty:
        warnings.warn(f"skipped run(s) without flatness/*, gap/* or robust/* scalars: {', '.join(empty)}", stacklevel=2)
    return sorted(runs, key=lambda r: _natural_key(r.name))


def ordered_keys(runs: Sequence[Run]) -> list[str]:
    """The logged keys in the report's order, without the standard errors logged next to them (``<key>_se``)."""
    logged = {k for r in runs for k in r.scalars}
    present = logged - {se(k) for k in logged}
    known = [k for k in REPORT_ORDER if k in present]
    eigs = sorted((k for k in present if re.fullmatch(r"flatness/hessian_eig_\d+", k)), key=_natural_key)
    rest = sorted(present - set(known) - set(eigs))
    if eigs:  # right after the top eigenvalue
        i = known.index(HESSIAN_TOP_EIG) + 1 if HESSIAN_TOP_EIG in known else 0
        known[i:i] = eigs
    # A key that extends a known one's name follows it (flatness/pacgen_curved_fraction after flatness/pacgen).
    followers = {k: [r for r in rest if r.startswith(k + "_")] for k in known}
    placed = {r for f in followers.values() for r in f}
    return [x for k in known for x in (k, *followers[k])] + [r for r in rest if r not in placed]


def batch_size_of(run: Run) -> int | None:
    """The run's training batch size: its ``hparams.yaml``'s ``batch_size``, else a ``bs<B>`` in its
    name (as the sweep names runs), else None."""
    value = run.hparams.get("batch_size")
    if isinstance(value, int) and value > 0:
        return value
    found = re.search(r"(?:^|[_/])bs(\d+)(?:_|$)", run.name)
    return int(found.group(1)) if found else None


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
