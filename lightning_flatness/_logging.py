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
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

log = logging.getLogger("lightning_flatness")

STEP_METRIC = "epoch"


def _is_wandb(logger: Logger) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return False
    return isinstance(logger, WandbLogger)


def _define_wandb_axes(experiment: Any) -> None:
    define = getattr(experiment, "define_metric", None)
    if define is None:  # a dummy experiment on non-zero ranks
        return
    define(STEP_METRIC)
    define("flatness/*", step_metric=STEP_METRIC)
    define("gap/*", step_metric=STEP_METRIC)


class LoggerWriter:
    """Writes one row of measurements per call to every logger of a trainer (rank 0 only)."""

    def __init__(self) -> None:
        self._wandb_ready: set[int] = set()
        self._wandb_keys: dict[int, set[str]] = {}

    def write(self, trainer: Any, values: dict[str, float], epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if _is_wandb(logger):
                experiment = logger.experiment
                if id(experiment) not in self._wandb_ready:
                    _define_wandb_axes(experiment)
                    self._wandb_ready.add(id(experiment))
                # Exact definitions too: they take precedence over Lightning's "*" -> trainer/global_step glob.
                known = self._wandb_keys.setdefault(id(experiment), set())
                for key in sorted(set(values) - known):
                    if hasattr(experiment, "define_metric"):
                        experiment.define_metric(key, step_metric=STEP_METRIC)
                    known.add(key)
                experiment.log({**values, STEP_METRIC: epoch})
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
