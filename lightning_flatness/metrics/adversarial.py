"""Robustness to adversaries on the gap's held-out subsample: accuracy and loss under FGSM and PGD."""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

from .. import keys
from .._failures import ConfigurationError
from ..functional.adversarial import (
    AdversarialResult, BlockDraws, attack_options, attack_statistics, perturbable_inputs,
)  # fmt: skip
from ..functional.objective import process_sum
from .base import FlatnessMetric, MeasurementContext


class AdversarialRobustness(FlatnessMetric):
    r"""Accuracy and loss on inputs perturbed by FGSM and PGD, on the gap's held-out subsample.

    Yao et al. (2018) compare, beside the Hessian spectrum, how robust models trained with small
    and large batches are to adversarial inputs. This metric measures it while training, on the
    samples of ``gap/test_acc`` (the validation subsample of ``gap_num_samples``), and logs per
    attack ``a`` in ``attacks``: ``robust/{a}_acc`` (the accuracy on attacked inputs),
    ``robust/{a}_loss`` (their mean loss) and ``robust/{a}_drop`` (clean minus attacked accuracy,
    paired per sample), each with ``<key>_se`` over the samples. The attacks are those of
    :func:`~lightning_flatness.functional.adversarial_accuracy` (FGSM; PGD from a random start,
    never weaker than FGSM); the inputs are perturbed, never the model. Under DDP each process
    attacks its shard of the subsample and the sums are combined, with each sample's random start
    drawn by its place in the subsample (not its mini-batch's), so the values equal one process's.

    Needs validation data (``gap_num_samples > 0``) with floating-point inputs in batches
    ``(inputs, targets, ...)``, and a loss that gives each sample's correctness: otherwise the fit
    is refused before its first step, naming what to change.

    Args:
        attacks: any of ``"fgsm"``, ``"pgd"``; measuring both costs what PGD alone does.
        norm: ``"linf"`` or ``"l2"``: the ball of radius ``epsilon`` around each input.
        epsilon: the ball's radius, in the units of the inputs as the model sees them (after any
            normalization in the data pipeline).
        steps: PGD's steps.
        step_size: PGD's step; ``None``: ``2.5 * epsilon / steps`` (Madry et al. 2018).
        random_start: PGD starts from a uniform point of the ball.
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.

    Cost per measurement, on ``n`` held-out samples: FGSM ``n`` input-gradient passes and ``n``
    forward passes; PGD (with FGSM) ``(1 + steps)·n`` input-gradient passes and ``2n`` forward
    passes. With the default 10 steps and ``gap_num_samples=2048``, about 11 gradients of 2048 samples.

    Example:
        >>> from lightning_flatness import FlatnessCallback
        >>> from lightning_flatness.metrics import AdversarialRobustness
        >>> metric = AdversarialRobustness(epsilon=0.1, attacks=("fgsm", "pgd"))
        >>> metric.keys[:3]
        ('robust/fgsm_acc', 'robust/fgsm_loss', 'robust/fgsm_drop')
        >>> callback = FlatnessCallback(metrics=["hessian_top_eig", metric])
    """

    name = "adversarial_robustness"

    def __init__(
        self, attacks: Sequence[str] = ("fgsm", "pgd"), norm: str = "linf", epsilon: float = 0.1, steps: int = 10,
        step_size: float | None = None, random_start: bool = True, every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        if isinstance(attacks, str):
            attacks = (attacks,)
        self._opts = attack_options(tuple(attacks), norm, epsilon, steps, step_size, random_start)
        self.attacks, self.norm, self.epsilon = self._opts["attacks"], norm, epsilon
        self.steps, self.step_size, self.random_start = steps, step_size, random_start
        values = tuple(key for a in self.attacks for key in keys.robust_keys(a))
        self.keys = values + tuple(keys.se(key) for key in values)

    def on_start(self, ctx: MeasurementContext) -> Mapping[str, Any]:
        batch = next(iter(self._held_out(ctx)), None)
        if batch is not None:
            try:
                perturbable_inputs(batch)
            except TypeError as err:
                raise ConfigurationError(f"AdversarialRobustness: {err}") from None
        return {}

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        batches = self._held_out(ctx)
        sizes = [perturbable_inputs(batch).shape[0] for batch in batches]
        offsets = ctx.held_out_offsets if ctx.held_out_offsets is not None else [0, *itertools.accumulate(sizes)][:-1]
        # each sample's start drawn by its place in the whole subsample: equal however it is batched and sharded
        # (the gap's held-out mini-batches are sized by the number of processes)
        block = lambda b: ctx.generator(f"{self.name}/{b}")  # noqa: E731
        generators = [BlockDraws(block, start) for start in offsets]
        results = attack_statistics(ctx.model, batches, ctx.loss_fn, self._opts, generators, process_sum())
        return {key: v for a, r in results.items() for key, v in _logged(a, r).items()}

    def _held_out(self, ctx: MeasurementContext) -> Sequence[Any]:
        if ctx.held_out is None:
            raise ConfigurationError(
                "AdversarialRobustness measures the gap's held-out subsample: give the Trainer validation data and "
                "FlatnessCallback(gap_num_samples=) > 0."
            )
        return ctx.held_out


def _logged(attack: str, r: AdversarialResult) -> dict[str, float]:
    acc, loss, drop = keys.robust_keys(attack)
    values = {acc: r.accuracy, loss: r.loss, drop: r.drop}
    errors = {keys.se(acc): r.accuracy_se, keys.se(loss): r.loss_se, keys.se(drop): r.drop_se}
    return values | {k: v for k, v in errors.items() if v == v}  # one sample has no spread: no error bar
