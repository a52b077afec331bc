"""The metric protocol: what :class:`~lightning_flatness.FlatnessCallback` runs at every measurement.

A metric is an object with its own validated options (checked in ``__init__``), the keys it
logs, a :meth:`FlatnessMetric.compute` that turns one :class:`MeasurementContext` into
``{key: value}``, optional state carried from one measurement to the next (``state_dict``), and
optionally its own schedule (``every_n_epochs``). The callback does the rest for every metric,
built-in or yours: it puts the model in eval mode with autocast off, restores every RNG, the
modes and ``.grad`` afterwards, reduces values across processes, checks they are finite, and
warns once (or raises, ``on_error="raise"``) when a metric fails.

Your own measure, e.g. the loss increase at a fixed random perturbation::

    import torch
    from lightning_flatness.metrics import FlatnessMetric, MeasurementContext
    from lightning_flatness.validation import check_float

    class PerturbedLoss(FlatnessMetric):
        name = "perturbed_loss"

        def __init__(self, scale: float = 0.01, every_n_epochs: int | None = None) -> None:
            super().__init__(every_n_epochs)
            self.scale = check_float("scale", scale, inclusive=False)
            self.keys = ("flatness/perturbed_loss",)

        def compute(self, ctx: MeasurementContext) -> dict[str, float]:
            objective = ctx.objective()  # the loss over the measurement subsample, summed over processes
            noise = torch.randn(objective.num_params, generator=ctx.generator(self.name), dtype=torch.float64)
            moved = objective.w0 + self.scale * noise.to(objective.w0)
            return {"flatness/perturbed_loss": (objective.loss(at=moved) - objective.loss()).item()}

    FlatnessCallback(metrics=["hessian_top_eig", PerturbedLoss(scale=0.05)])

Values computed through :meth:`MeasurementContext.objective` (or the functional API on
``ctx.model`` and ``ctx.batches``) are those of the whole subsample on every process: its data
passes are summed across processes. A metric that instead averages over its own shard sets
``sample_weighted = True``, and the callback weights each process's value by its sample count.
"""

from __future__ import annotations

import inspect
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._logging import LogPosition
from ..functional import Objective
from ..functional._losses import LossArg
from ..validation import check_int


def samples_needed(num_samples: int, value: float, se: float, target: float = 0.05) -> int | None:
    """Samples for a relative standard error of ``target``, from one measured on ``num_samples``.

    A mean over ``n`` samples has a standard error ``∝ 1/√n``, so ``n_needed = n · (se / (target
    · |value|))²``. ``None`` when the value is 0 or either number is not finite.
    """
    if not (math.isfinite(value) and math.isfinite(se)) or value == 0:
        return None
    return max(1, math.ceil(num_samples * (se / (target * abs(value))) ** 2))


def measurement_seed(seed: int, epoch: int, name: str) -> int:
    """The seed of one metric at one measurement, a pure function of ``(seed, epoch, name)``."""
    return (seed * 1_000_003 + epoch * 7919 + zlib.crc32(name.encode())) % (2**63 - 1)


@dataclass
class SharedResults:
    """What the metrics of one measurement hand to each other, so nothing is computed twice.

    A metric that sets a field lists it in ``provides``, one that reads it in ``uses``: the
    callback runs providers first. Every field is ``None`` until set, and all are cleared when a
    metric fails, so no metric reads a half-finished result.

    Attributes:
        eigenvalues: the top Hessian eigenvalues of this measurement, descending, shape ``(k,)``
            (set by :class:`~lightning_flatness.metrics.HessianEigenvalues`).
        eigenvectors: their unit eigenvectors, shape ``(k, P)`` (same).
        hessian_max: an upper bound on every diagonal entry ``H_ii`` of the mean-loss Hessian:
            twice the converged top eigenvalue (same; ``None`` if Lanczos did not converge).
            :class:`~lightning_flatness.metrics.PACGen` uses it to skip the Hessian's diagonal.
        gradient: ``∇L`` over the measurement subsample, flat, in the compute dtype (set by
            :class:`~lightning_flatness.metrics.GradCosineRegret` from its mini-batch gradients);
            :class:`~lightning_flatness.metrics.HessianEigenvalues` starts Lanczos from it on a
            cold start instead of taking its own gradient pass.
        sample_sq_norms: ``‖∇ℓ_i‖²`` of every sample of this process's shard, one tensor per
            mini-batch, in order (set by :class:`~lightning_flatness.metrics.FisherTrace` with
            ``kind="empirical"``); :class:`~lightning_flatness.metrics.GradientNoiseScale` reads them.
        batch_gradient_dots: ``ḡ_b·∇L`` for every mini-batch ``b`` of this process's shard, in
            order (set by :class:`~lightning_flatness.metrics.GradCosineRegret` beside
            ``gradient``); :class:`~lightning_flatness.metrics.GradientNoiseScale`'s error bar.
    """

    eigenvalues: Tensor | None = None
    eigenvectors: Tensor | None = None
    hessian_max: float | None = None
    gradient: Tensor | None = None
    sample_sq_norms: tuple[Tensor, ...] | None = None
    batch_gradient_dots: tuple[float, ...] | None = None


@dataclass
class MeasurementContext:
    """Everything a metric may use at one measurement.

    Attributes:
        model: the module being trained (measure it, never modify it).
        batches: this process's shard of the fixed measurement subsample: whole mini-batches
            of the callback's ``batch_size``, on the model's device.
        loss_fn: ``"cross_entropy"``, ``"bce_with_logits"``, ``"mse"`` or a callable
            ``loss_fn(model, batch)`` returning ``(B,)`` losses or ``(losses, correct)``; always
            on ``batches`` as they are here (samples along dim 0).
        epoch: the x-value of this measurement: epochs completed, 0 = initialization (loggers
            place it at Lightning's epoch index ``epoch - 1``; see :class:`LogPosition`).
        seed: the callback's seed; :meth:`seed_for` derives a metric's own.
        num_samples: the number of samples in ``batches``.
        world_size, rank: the processes measuring together (1, 0 on a single device).
        train_size: the number of training samples the trainer sees (``None`` if unknown).
        batch_indices: the position of each of ``batches`` among the whole subsample's
            mini-batches (``None``: ``0, 1, 2, ...``, one process), for draws per mini-batch that do
            not depend on the sharding (``fisher_trace(kind="mc")``).
        dtype: the compute dtype (``None``: the parameters' own, at least float32).
        shared: results handed between the metrics of this measurement.
        held_out: this process's shard of the gap's held-out (validation) subsample, whole
            mini-batches on the model's device (``None`` without validation data or with
            ``gap_num_samples=0``), for metrics measured on unseen samples.
        held_out_offsets: the position, in the whole held-out subsample, of the first sample of each
            of ``held_out`` (``None``: ``0``, then the running sum of their sizes), for draws per
            sample that depend neither on the sharding nor on the mini-batches' size, which for the
            gap depends on the number of processes.
        final: whether these are the final weights (measured once after training).
    """

    model: nn.Module
    batches: Sequence[Any]
    loss_fn: LossArg
    epoch: int
    seed: int
    num_samples: int
    world_size: int = 1
    rank: int = 0
    train_size: int | None = None
    batch_indices: Sequence[int] | None = None
    dtype: torch.dtype | None = None
    shared: SharedResults = field(default_factory=SharedResults)
    held_out: Sequence[Any] | None = None
    held_out_offsets: Sequence[int] | None = None
    final: bool = False

    def seed_for(self, name: str) -> int:
        """A seed for the metric called ``name`` at this measurement (the same on every process)."""
        return measurement_seed(self.seed, self.epoch, name)

    def generator(self, name: str) -> torch.Generator:
        """A CPU generator seeded with :meth:`seed_for` ``(name)``."""
        return torch.Generator().manual_seed(self.seed_for(name))

    def objective(self) -> Objective:
        """The mean loss over ``batches`` as an :class:`~lightning_flatness.functional.Objective`
        (gradients, Hessian operator, per-sample norms), its passes summed over processes."""
        return Objective(self.model, self.batches, self.loss_fn, dtype=self.dtype)


class FlatnessMetric:
    """Base class of the measures :class:`~lightning_flatness.FlatnessCallback` runs.

    Subclasses set ``name`` (a class attribute: the shorthand, and the salt of the metric's
    seed), ``keys`` (the keys :meth:`compute` returns, known after ``__init__``, or after
    :meth:`setup` for keys that depend on the model), and implement
    :meth:`compute`. Store every ``__init__`` option under its own name, as scikit-learn
    estimators do: :meth:`hparams` and ``repr`` read them back.

    Args:
        every_n_epochs: measure this metric only at the callback's measurements whose epoch is
            a multiple of ``n`` (and at the final weights); ``None`` (default): at every one.
    """

    name: ClassVar[str] = ""
    provides: ClassVar[tuple[str, ...]] = ()  # SharedResults fields this metric sets
    uses: ClassVar[tuple[str, ...]] = ()  # SharedResults fields it reads
    min_batches: ClassVar[int] = 1  # mini-batches of the subsample it needs (per process)
    sample_weighted: ClassVar[bool] = False

    def __init__(self, every_n_epochs: int | None = None) -> None:
        self.every_n_epochs = None if every_n_epochs is None else check_int("every_n_epochs", every_n_epochs)
        self.keys: tuple[str, ...] = ()

    def setup(self, model: nn.Module) -> None:
        """Called by the callback with the model, in its ``setup`` hook, before any measurement.

        A metric whose keys depend on the model (e.g. one per module) sets ``keys`` here, and may
        leave them empty in ``__init__``; the callback then checks them and logs them like the
        others. The default does nothing.
        """

    def check_setup(self, loss_fn: LossArg, train_size: int | None) -> None:
        """Called by the callback when training starts, before the first training step, with the loss the
        metric will get (:attr:`MeasurementContext.loss_fn`) and the training set's size (``None``: it
        has no length, e.g. an iterable dataset).

        Raise here, with a message that names the option to change, for a setup this metric can
        never measure: the fit is refused at once, instead of the metric failing at every
        measurement. The default accepts everything.
        """

    def on_start(self, ctx: MeasurementContext) -> Mapping[str, Any]:
        """Called once by the callback when training starts, after the loss has been checked, with a context
        whose ``batches`` are the first mini-batch of this process's measurement subsample.

        Decide here what is decided once per fit (e.g. how per-sample gradients are formed) and
        return what to log about it with the hyperparameters, as ``{name: value}`` (logged as
        ``<metric name>.<name>``). A failure follows the callback's ``on_error``. The default
        decides nothing.
        """
        return {}

    def compute(self, ctx: MeasurementContext) -> Mapping[str, float]:
        """``{key: value}`` for this measurement; every key of ``self.keys`` that was measured."""
        raise NotImplementedError

    def log_artifacts(self, loggers: Sequence[Any], at: LogPosition) -> None:
        """Write the non-scalar results of the last :meth:`compute` (figures, histograms, files) to ``loggers``.

        Called by the callback on rank 0 only, right after every successful :meth:`compute`,
        with ``trainer.loggers`` and the measurement's position: ``at.step`` (a TensorBoard
        ``global_step``), ``at.epoch`` (Lightning's epoch index, ``-1`` at initialization) and
        ``at.epochs_completed`` (``ctx.epoch``); it must not call collectives.
        A failure follows the callback's ``on_error`` like one of :meth:`compute`. No-op by default.
        """

    def due(self, epoch: int, final: bool) -> bool:
        """Whether to measure at the callback's measurement at ``epoch``."""
        return final or self.every_n_epochs is None or epoch % self.every_n_epochs == 0

    def remeasure_at_final(self) -> bool:
        """Whether the final weights need a measurement of their own even when the epoch's measurement
        of the same weights ran this metric (it measures more at ``ctx.final``); only the keys that
        measurement did not log are added to its row. ``False`` by default."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """State carried between measurements and saved in checkpoints (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def hparams(self) -> dict[str, Any]:
        """The ``__init__`` options and their values (logged as hyperparameters)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: getattr(self, p) for p in names if hasattr(self, p)}

    def __repr__(self) -> str:
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = {k: v for k, v in self.hparams().items() if defaults.get(k, inspect.Parameter.empty) != v}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"
