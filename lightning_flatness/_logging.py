"""Writing measurements to every logger at the x-values Lightning gives its own metrics, and the status line.

Each row goes to every logger through ``logger.log_metrics(row, step)``, as Lightning logs its
own: at Lightning's ``step`` and with an ``epoch`` value for the same weights
(:class:`LogPosition`), so ``gap/test_loss`` sits where ``val_loss`` of the same epoch sits in
TensorBoard (step), CSV (``epoch`` and ``step`` columns) and W&B (``epoch`` and
``trainer/global_step``). The initialization is epoch ``-1``. Each row also carries
``flatness_callback/epochs_completed``, the callback's own x, which the study report reads.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from . import keys
from ._figures import when

log = logging.getLogger("lightning_flatness")

_EPOCH_FILE = re.compile(r"epoch_(-?\d+)\.json")
T = TypeVar("T")


@dataclass(frozen=True)
class LogPosition:
    """Where one measurement's row goes on the loggers' x-axes.

    ``epochs_completed``: the callback's x (0: the initialization), which schedules the metrics.
    ``step``: the step Lightning logs its own metrics of the same weights at (see :func:`position`).
    """

    epochs_completed: int
    step: int

    @property
    def epoch(self) -> int:
        """Lightning's index of the epoch that produced the weights (``trainer.current_epoch`` during it);
        ``-1``: the initialization."""
        return self.epochs_completed - 1

    def row(self) -> dict[str, int]:
        """The x-values logged with every row: Lightning's ``epoch`` and the callback's epochs completed."""
        return {keys.EPOCH: self.epoch, keys.EPOCHS_COMPLETED: self.epochs_completed}


def position(trainer: Any, epochs_completed: int) -> LogPosition:
    """The position of the weights the trainer holds now, after ``epochs_completed`` epochs.

    Lightning logs epoch-end metrics (validation's, ``on_epoch=True``) at the index of the epoch's
    last batch, one below the count of batches that stepped (``fit_loop.py`` decrements it for
    them); before any step that is 0, the step of the first batch's loss, computed at the same
    (initial) weights. That count is private (``_batches_that_stepped``); ``global_step`` is the
    fallback, equal to it with one optimizer.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    stepped = trainer.global_step if not isinstance(stepped, int) else stepped
    return LogPosition(epochs_completed, max(stepped - 1, 0))


def is_wandb(logger: Logger) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return False
    return isinstance(logger, WandbLogger)


class LoggerWriter:
    """Writes one row of measurements per call to every logger of a trainer (rank 0 only)."""

    def write(self, trainer: Any, values: dict[str, float], at: LogPosition) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({**values, **at.row()}, step=at.step)
            logger.save()

    def write_hyperparams(self, trainer: Any, config: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        params = {f"{keys.CALLBACK_PREFIX}{key}": _plain(value) for key, value in config.items()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # A second hparams session in the event file would hide the LightningModule's own in
                # TensorBoard's HPARAMS tab; merge into the logger's hparams (saved to hparams.yaml).
                logger.hparams.update(params)
            else:
                logger.log_hyperparams(params)


class FigureWriter:
    """Writes one measurement's figures to every logger (call on rank 0 only), at the row's
    :class:`LogPosition`: TensorBoard images at its ``step``, W&B ``wandb.Image`` rows through
    ``log_metrics`` (with its ``epoch``), and for TensorBoard and CSV loggers the measurement's
    numbers as a file in the logger's ``log_dir``."""

    def write(
        self, loggers: Sequence[Logger], at: LogPosition, pictures: Callable[[], Mapping[str, Any]],
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
                    writer.add_image(tag, image, global_step=at.step, dataformats="HWC")
                if tensorboard is not None:
                    tensorboard(writer)
                writer.flush()
                save(logger.log_dir)
            elif is_wandb(logger):
                import wandb

                images = images if images is not None else pictures()
                row = {tag: wandb.Image(image, caption=when(at.epochs_completed)) for tag, image in images.items()}
                row.update(wandb_row() if wandb_row is not None else {})
                logger.log_metrics({**row, keys.EPOCH: at.epoch}, step=at.step)
            elif isinstance(logger, CSVLogger):
                save(logger.log_dir)


def write_epoch_json(log_dir: str | Path, subdir: str, at: LogPosition, data: Mapping[str, Any]) -> Path:
    """``<log_dir>/<subdir>/epoch_<e>.json`` with ``data`` and the position (``epoch``: Lightning's
    ``e``, ``-1`` at initialization; ``step``; ``epochs_completed``), replaced whole (a reader never
    sees half a file)."""
    folder = Path(log_dir) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch_{at.epoch:06d}.json"
    tmp = path.with_suffix(".json.tmp")
    position = {"epoch": at.epoch, "step": at.step, "epochs_completed": at.epochs_completed}
    tmp.write_text(json.dumps({**data, **position}))
    tmp.replace(path)
    return path


def epochs_completed_of(data: Mapping[str, Any]) -> int:
    """The epochs completed of a file :func:`write_epoch_json` wrote (its ``epoch``, in files older than that field)."""
    return int(data["epochs_completed"] if "epochs_completed" in data else data["epoch"])


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
