"""An offline W&B logger whose ``experiment.log`` calls are recorded (tests of what reaches W&B)."""

from __future__ import annotations

from typing import Any

import pytest


def offline_wandb(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, list[dict]]:
    """``(logger, experiment, logged)``: an offline ``WandbLogger`` (no account, no network) and the
    dicts passed to ``experiment.log``, in order. Call ``experiment.finish()`` when done."""
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="flatness-test")
    experiment = logger.experiment
    logged: list[dict] = []
    real_log = experiment.log
    monkeypatch.setattr(experiment, "log", lambda data, *a, **k: logged.append(dict(data)) or real_log(data, *a, **k))
    return logger, experiment, logged
