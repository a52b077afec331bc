"""Writing measurements to every logger with the epoch as x-axis, and the status line.

TensorBoard and CSV get ``log_metrics(values, step=epoch)``. W&B gets the values together with
an ``epoch`` value through ``experiment.log`` (its own step stays monotonic) and, once,
``define_metric("flatness/*", step_metric="epoch")`` (and ``gap/*``, and each logged key
exactly, since exact definitions take precedence over the ``"*"`` glob that Lightning's
``WandbLogger`` binds to ``trainer/global_step``), so its charts use the epoch as x-axis
without user setup; ``gap/train_loss`` can be picked as x-axis as well.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from lightning.pytorch.loggers import Logger, TensorBoardLogger

log = logging.getLogger("lightning_flatness")

EPOCH_AXIS = "epoch"


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
