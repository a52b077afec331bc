"""Entropy-SGD's local entropy around the current weights (opt-in: costly)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import keys
from ..functional import local_entropy
from ..validation import check_float, check_int
from .base import FlatnessMetric, MeasurementContext


class LocalEntropy(FlatnessMetric):
    """``flatness/local_entropy``: the excess local entropy (:func:`~lightning_flatness.functional.local_entropy`).

    One SGLD chain runs on this process's whole shard at once: cycling mini-batches at a small
    temperature would add mini-batch noise that overheats the chain.

    Args:
        gamma: the coupling (Entropy-SGD's scope).
        noise: the SGLD noise scale (temperature ``noise**2 / 2``).
        num_steps: SGLD steps per rung of the thermodynamic-integration ladder (9 rungs).
        step_size: the SGLD step.
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.

    ``flatness/local_entropy_se`` is the chain's Monte-Carlo error (the estimator's own
    randomness), not the spread over redrawn subsamples. Cost: ``9 * num_steps`` gradient passes
    over the subsample.
    """

    name = "local_entropy"

    def __init__(
        self, gamma: float = 100.0, noise: float = 0.03, num_steps: int = 100, step_size: float = 0.002,
        every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        self.gamma = check_float("gamma", gamma, inclusive=False)
        self.noise = check_float("noise", noise, inclusive=False)
        self.num_steps = check_int("num_steps", num_steps, 4)
        self.step_size = check_float("step_size", step_size, inclusive=False)
        self.keys = (keys.LOCAL_ENTROPY, keys.se(keys.LOCAL_ENTROPY))

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        ent = local_entropy(
            ctx.model, [concatenate(ctx.batches)], ctx.loss_fn, gamma=self.gamma, num_steps=self.num_steps,
            step_size=self.step_size, noise=self.noise, generator=ctx.seed_for(self.name), dtype=ctx.dtype,
        )  # fmt: skip
        return {keys.LOCAL_ENTROPY: ent.value, keys.se(keys.LOCAL_ENTROPY): ent.se}


def concatenate(batches: Any) -> Any:
    """The mini-batches as one batch (tensors concatenated along the sample axis)."""
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise ValueError("local_entropy needs every mini-batch to have the same structure.")
    leaves = [torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0] for parts in zip(*(f for f, _ in flat))]
    return tree_unflatten(leaves, spec)
