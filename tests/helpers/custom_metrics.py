"""User-defined metrics, importable (so they pickle for ddp_spawn), as in docs/extending.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_flatness.metrics import FlatnessMetric, MeasurementContext


class PerturbedLoss(FlatnessMetric):
    """``L(w + σu) - L(w)`` through ``ctx.objective()``: the whole subsample on every process."""

    name = "perturbed_loss"

    def __init__(self, scale: float = 0.05) -> None:
        super().__init__()
        self.scale = scale
        self.keys = ("flatness/perturbed_loss",)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        objective = ctx.objective()
        noise = torch.randn(objective.num_params, generator=ctx.generator(self.name), dtype=torch.float64)
        moved = objective.w0 + self.scale * noise.to(objective.w0)
        return {"flatness/perturbed_loss": (objective.loss(at=moved) - objective.loss()).item()}


class ShardMeanLoss(FlatnessMetric):
    """The mean loss over this process's own shard (no objective): the callback weights it by samples."""

    name = "shard_mean_loss"
    sample_weighted = True

    def __init__(self) -> None:
        super().__init__()
        self.keys = ("flatness/shard_mean_loss",)

    @torch.no_grad()
    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        total = sum(F.cross_entropy(ctx.model(x), y, reduction="sum").item() for x, y in ctx.batches)
        return {"flatness/shard_mean_loss": total / ctx.num_samples}


class SlowMetric(FlatnessMetric):
    """Takes ``seconds`` of wall time and logs a constant (the cost of a rarely scheduled metric)."""

    name = "slow"

    def __init__(self, seconds: float = 0.3, every_n_epochs: int | None = None) -> None:
        super().__init__(every_n_epochs)
        self.seconds = seconds
        self.keys = ("flatness/slow",)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        import time

        time.sleep(self.seconds)
        return {"flatness/slow": 1.0}
