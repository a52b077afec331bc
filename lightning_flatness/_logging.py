"""Writing measurements to every logger with the epoch as x-axis, and the status line.

TensorBoard and CSV get ``log_metrics(values, step=epoch)``. W&B gets the values together with
an ``epoch`` value through ``experiment.log`` (its own step stays monotonic) and, once,
``define_metric("flatness/*", step_metric="epoch")`` (and ``gap/*``, and each logged key
exactly, since exact definitions take precedence over the ``"*"`` glob that Lightning's
``WandbLogger`` binds to ``trainer/global_step``), so its charts use the epoch as x-axis
without user setup; ``gap/train_loss`` can be picked as x-axis as well.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from lightning.pytorch.loggers import Logger, TensorBoardLogger

log = logging.getLogger("lightning_flatness")

EPOCH_AXIS = "epoch"
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.json")
T = TypeVar("T")


def is_wandb(logger: Logger) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return False
    return isinstance(logger, WandbLogger)


def epoch_axis(experiment: Any, keys: Iterable[str], known: set[str]) -> None:
    """Bind every key not in ``known`` to the ``epoch`` x-axis in a W&B run (and add it to ``known``).

    Exact definitions take precedence over Lightning's ``"*" -> trainer/global_step`` glob. The
    first call also declares ``epoch`` itself and the ``flatness/*`` and ``gap/*`` globs.
    """
    define = getattr(experiment, "define_metric", None)
    if define is None:  # a dummy experiment on non-zero ranks
        return
    if not known:
        define(EPOCH_AXIS)
        define("flatness/*", step_metric=EPOCH_AXIS)
        define("gap/*", step_metric=EPOCH_AXIS)
    for key in sorted(set(keys) - known):
        define(key, step_metric=EPOCH_AXIS)
        known.add(key)


class LoggerWriter:
    """Writes one row of measurements per call to every logger of a trainer (rank 0 only)."""

    def __init__(self) -> None:
        self._wandb_keys: dict[int, set[str]] = {}

    def write(self, trainer: Any, values: dict[str, float], epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if is_wandb(logger):
                experiment = logger.experiment
                epoch_axis(experiment, values, self._wandb_keys.setdefault(id(experiment), set()))
                experiment.log({**values, EPOCH_AXIS: epoch})
            else:
                logger.log_metrics(values, step=epoch)
            logger.save()

    def write_hyperparams(self, trainer: Any, config: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        params = {f"flatness_callback/{key}": _plain(value) for key, value in config.items()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # A second hparams session in the event file would hide the LightningModule's own in
                # TensorBoard's HPARAMS tab; merge into the logger's hparams (saved to hparams.yaml).
                logger.hparams.update(params)
            else:
                logger.log_hyperparams(params)


class FigureWriter:
    """Writes one measurement's figures to every logger (call on rank 0 only): TensorBoard images
    at ``step = epoch``, W&B ``wandb.Image`` rows with an ``epoch`` value, and for TensorBoard and
    CSV loggers the measurement's numbers as a file in the logger's ``log_dir``."""

    def __init__(self) -> None:
        self._wandb_keys: dict[int, set[str]] = {}  # per W&B experiment: keys bound to the epoch axis

    def write(
        self, loggers: Sequence[Logger], epoch: int, pictures: Callable[[], Mapping[str, Any]],
        save: Callable[[str], object], tensorboard: Callable[[Any], None] | None = None,
        wandb_row: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:  # fmt: skip
        """``pictures()``: ``{tag: HWC image}``, rendered once and only if a logger takes images;
        ``save(log_dir)`` writes the file; ``tensorboard(writer)`` and ``wandb_row()`` add what
        is not an image (e.g. a histogram) to the same step."""
        from lightning.pytorch.loggers import CSVLogger

        images = None
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                images = images if images is not None else pictures()
                writer = logger.experiment
                for tag, image in images.items():
                    writer.add_image(tag, image, global_step=epoch, dataformats="HWC")
                if tensorboard is not None:
                    tensorboard(writer)
                writer.flush()
                save(logger.log_dir)
            elif is_wandb(logger):
                import wandb

                images = images if images is not None else pictures()
                row = {tag: wandb.Image(image, caption=f"epoch {epoch}") for tag, image in images.items()}
                row.update(wandb_row() if wandb_row is not None else {})
                experiment = logger.experiment
                epoch_axis(experiment, row, self._wandb_keys.setdefault(id(experiment), set()))
                experiment.log({**row, EPOCH_AXIS: epoch})
            elif isinstance(logger, CSVLogger):
                save(logger.log_dir)


def write_epoch_json(log_dir: str | Path, subdir: str, epoch: int, data: Mapping[str, Any]) -> Path:
    """``<log_dir>/<subdir>/epoch_<x>.json`` with ``data``, replaced whole (a reader never sees half a file)."""
    folder = Path(log_dir) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch_{epoch:06d}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


def read_latest_epoch_json(run_dir: str | Path, subdir: str, parse: Callable[[Any], T]) -> T | None:
    """``parse`` of the latest epoch's file under ``run_dir/<subdir>/`` that reads and parses
    (``parse`` raises ``ValueError``, ``KeyError`` or ``TypeError`` to reject one); ``None`` if none does."""
    files = sorted(((int(m.group(1)), p) for p in (Path(run_dir) / subdir).glob("epoch_*.json")
                    if (m := _EPOCH_FILE.fullmatch(p.name))), reverse=True)  # fmt: skip
    for _, path in files:
        try:
            return parse(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__qualname__", None) or repr(value)


def status(trainer: Any, text: str) -> None:
    """Show ``text`` on Lightning's training progress bar (TQDM postfix or Rich task description).

    It is also logged at INFO on the ``lightning_flatness`` logger (on every rank).
    """
    log.info(text)
    if not trainer.is_global_zero:
        return
    bar_callback = getattr(trainer, "progress_bar_callback", None)
    if bar_callback is None:
        return
    progress, task_id = getattr(bar_callback, "progress", None), getattr(bar_callback, "train_progress_bar_id", None)
    if progress is not None and task_id is not None:  # RichProgressBar: "<epoch description> | <text>"
        description = progress.tasks[task_id].description.split(" | flatness")[0]
        progress.update(task_id, description=f"{description} | {text}")
        bar_callback.refresh()
        return
    try:  # TQDMProgressBar
        bar = bar_callback.train_progress_bar
    except (AttributeError, TypeError):
        return
    if bar is not None and hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(text, refresh=True)
