"""``FlatnessCallback``: flatness curves and the generalization gap, per epoch, in any logger."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Callable, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection

from . import _legacy, keys
from . import _subsample as sub
from ._distributed import cross_process, rank_zero_buffers
from ._failures import ON_ERROR, ConfigurationError, FailurePolicy
from ._logging import LoggerWriter, position, status
from ._preflight import check_strategy, probe_loss
from .functional import measurement_mode
from .functional._losses import LossArg, check_batch_keys, check_loss_fn, with_batch_keys
from .landscape import LandscapeOptions, LandscapeRecorder
from .metrics import (
    DEFAULT_METRICS,
    FlatnessMetric,
    GapMeter,
    HessianEigenvalues,
    MeasurementContext,
    MetricSpec,
    SharedResults,
    check_keys,
    execution_order,
    measurement_seed,
    resolve_metrics,
)
from .metrics.sample_size import NoisyMeasurementWarning, is_noisy, noisy_notice
from .validation import check_bool, check_choice, check_float, check_int, check_sample_dims

SOURCES = ("train", "val")


class FlatnessCallback(Callback):
    """Measures loss-landscape flatness and the train/test gap during ``Trainer.fit``.

    At the end of every ``every_n_epochs``-th epoch (0: only at the end of training), and
    optionally before the first (``measure_at_start``), the callback runs ``metrics`` on a fixed
    measurement subsample of ``num_samples`` samples (drawn once, seeded by ``seed``, from the
    training set, or the validation set with ``source="val"``) split into mini-batches of
    ``batch_size``, plus the eval-mode loss and accuracy on fixed train and validation subsamples
    of ``gap_num_samples`` (0 disables the gap). The final weights are always measured once in
    ``on_train_end``. Values go to every logger where Lightning logs its own metrics of the same
    weights (Lightning's ``step``, and ``epoch`` = its index of the epoch that produced them, ``-1``
    for the initialization; ``docs/configuration.md``), to ``trainer.callback_metrics``, to
    :attr:`history` (as ``(x, {key: value})``, ``x`` = epochs completed, 0 = initialization) and to
    :attr:`values`.

    Args:
        metrics: metric objects from :mod:`lightning_flatness.metrics` (or your own
            :class:`~lightning_flatness.metrics.FlatnessMetric`), or their names as shorthand
            for the default-configured ones: ``"hessian_top_eig"``, ``"grad_cosine_regret"``,
            ``"fisher_trace"``, ``"pacgen"``, ``"grad_noise_scale"`` (the default: these five), and
            the opt-in ``"local_entropy"``, ``"block_curvature"``, ``"hessian_density"``,
            ``"adaptive_sharpness"``, ``"fisher_rao_norm"`` (``metrics.BUILTIN``).
        every_n_epochs: measure after every n-th epoch; 0 measures only the final weights.
        num_samples: size of the measurement subsample.
        batch_size: mini-batch size of the measurement subsample (the regret's mini-batches) and
            of every data pass (peak memory).
        source: ``"train"`` or ``"val"``: where the measurement subsample is drawn from.
        loss_fn: ``"cross_entropy"``, ``"bce_with_logits"`` (one logit per sample), ``"mse"``
            (batches ``(inputs, targets)`` or dicts, see ``batch_keys``; they call ``model(inputs)``),
            ``"hf_sequence_classification"``, ``"hf_causal_lm"``, ``"hf_token_classification"``
            (Hugging Face dict batches with ``"labels"``; they call ``model(**inputs)`` and read
            ``.logits``; ``docs/configuration.md``), or a callable ``loss_fn(model, batch)``
            returning the per-sample losses ``(B,)``, or the pair ``(losses, correct)`` with
            ``correct`` a bool ``(B,)`` tensor for the gap's accuracy (a callable's accuracy is
            logged only then).
        batch_keys: ``(inputs_key, targets_key)``: the entries of dict batches that
            ``"cross_entropy"``, ``"bce_with_logits"`` and ``"mse"`` read. ``None`` (default)
            recognizes a dict holding exactly one of the pairs ``("x", "y")``,
            ``("input", "target")``, ``("inputs", "targets")``, ``("image", "label")``,
            ``("images", "labels")`` and refuses any other dict at the start of training.
        gap_num_samples: size of the train and validation subsamples of the gap (all if fewer).
        seed: seeds the subsample draws and the stochastic estimators.
        measure_at_start: also measure in ``on_train_start`` so curves start at initialization.
        max_overhead: skip epoch-end measurements while the time spent measuring exceeds this
            fraction of the training wall time (``None``: no budget).
        on_error: ``"warn"``: a failing metric (non-finite, out of memory, unsupported layer) warns
            once and is skipped for that measurement; ``"raise"``: re-raise.
        log_hyperparams: log this configuration (and every metric's options) as hyperparameters.
        landscape: :class:`~lightning_flatness.landscape.LandscapeOptions` to log loss-landscape
            views (rank 0 only; ``docs/metrics.md``), or ``None`` (default): none.
        sample_dims: where each tensor of a batch holds its samples: ``0`` (default: dim 0 of
            every tensor), or a tuple, list or dict matching the batch, as ``torch.func.vmap``'s
            ``in_dims``, e.g. ``(1, 0)`` for sequence-first batches ``(x, y)`` with ``x`` of shape
            ``(T, B)``. The callback keeps its subsamples with the samples along dim 0 and hands
            ``loss_fn`` every batch back in this layout.
        **legacy_options: the flat options of version 0.1 (``k``, ``tol``, ``kind``, ``gamma``,
            ``landscape_every_n_epochs``, ...), deprecated: each is passed to its metric (or to
            ``landscape``) with a ``FutureWarning`` that shows the new spelling.
    """

    def __init__(
        self,
        metrics: Union[MetricSpec, Sequence[MetricSpec]] = DEFAULT_METRICS,
        every_n_epochs: int = 1,
        num_samples: int = 512,
        batch_size: int = 64,
        source: str = "train",
        loss_fn: Union[str, Callable] = "cross_entropy",
        batch_keys: Union[tuple[str, str], None] = None,
        gap_num_samples: int = 2048,
        seed: int = 0,
        measure_at_start: bool = False,
        max_overhead: Union[float, None] = None,
        on_error: str = "warn",
        log_hyperparams: bool = True,
        landscape: Union[LandscapeOptions, None] = None,
        sample_dims: Any = 0,
        **legacy_options: Any,
    ) -> None:
        super().__init__()
        specs, landscape = _legacy.upgrade(metrics, landscape, legacy_options)
        self.metrics: list[FlatnessMetric] = resolve_metrics(specs)
        self.config = _checked_config(
            self.metrics, every_n_epochs=every_n_epochs, num_samples=num_samples, batch_size=batch_size, source=source,
            loss_fn=loss_fn, batch_keys=batch_keys, gap_num_samples=gap_num_samples, seed=seed, measure_at_start=measure_at_start,
            max_overhead=max_overhead, on_error=on_error, log_hyperparams=log_hyperparams, sample_dims=sample_dims,
        )  # fmt: skip
        if landscape is not None and not isinstance(landscape, LandscapeOptions):
            raise TypeError(f"landscape must be a LandscapeOptions or None, got {landscape!r}.")
        self.loss_fn: LossArg = loss_fn
        self._layout = sub.SampleLayout(self.config["sample_dims"])
        # what the metrics and the gap evaluate: on samples-first batches, dict entries named by batch_keys
        self._loss = self._layout.loss(with_batch_keys(loss_fn, self.config["batch_keys"]))
        self.values: MetricCollection = _collection(self.metrics, self.config["gap_num_samples"] > 0)
        self.history: list[tuple[int, dict[str, float]]] = []
        self._order = execution_order(self.metrics)
        self._failures = FailurePolicy(self.config["on_error"])
        self._gap = GapMeter(self.values, self._loss)
        self._writer = LoggerWriter()
        self._indices: dict[str, Tensor] = {}
        self._data: dict[str, list[Any]] | None = None
        self._recorder: sub.BatchRecorder | None = None
        self._shared = SharedResults()  # the last measurement's (the landscape's eigenvector)
        self._last_x: int | None = None
        self._last_step: int | None = None
        self._spent = 0.0
        self._fit_start = 0.0
        self._train_size: int | None = None
        self._train_path: tuple = ()  # where the measured loader's share sits in a combined training batch
        self._dataset_sizes: dict[str, int] = {}  # "train", "val": the data sets' sizes, where known
        self._sizes_pending = False  # the drawn sizes go with the next row written
        self._probe_pending = False
        self._before_training = False  # until the first training step: a ConfigurationError refuses the fit
        self._noisy: set[str] = set()  # keys already warned about
        self._landscape = LandscapeRecorder(
            landscape or LandscapeOptions(every_n_epochs=0), seed=measurement_seed(self.config["seed"], 0, "landscape"),
            failures=self._failures,
        )  # fmt: skip

    # ------------------------------------------------------------------ hooks
    @property
    def state_key(self) -> str:
        return self._generate_state_key(seed=self.config["seed"], source=self.config["source"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, "FlatnessCallback")
        self._setup_metrics(pl_module)
        self.values.to(pl_module.device)
        if stage == "fit" and self.config["log_hyperparams"]:  # before Lightning writes hparams.yaml
            with self._failures.guard("logging the hyperparameters", refuse=False):
                self._writer.write_hyperparams(trainer, self.hparams())

    def _setup_metrics(self, pl_module: LightningModule) -> None:
        """Hand the model to every metric (:meth:`FlatnessMetric.setup`); keys that depend on it are checked
        for clashes and get their state in :attr:`values`."""
        for metric in self.metrics:
            metric.setup(pl_module)
        check_keys(self.metrics)
        new = [key for metric in self.metrics for key in metric.keys if key not in self.values]
        if new:
            self.values.add_metrics({key: MeanMetric(nan_strategy="error") for key in new})

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._before_training = True
        self.values.to(pl_module.device)
        self._check_start(trainer)
        with self._failures.guard("drawing the measurement subsample", refuse=True):
            self._prepare_data(trainer, pl_module)
        self._probe_pending = True
        if self._data is not None:  # else the first training batch is probed (an iterable dataset)
            self._probe(pl_module, self._data["measure"][0], refuse=True)
            self._start_metrics(trainer, pl_module)
        if self.config["measure_at_start"] and self._last_step != trainer.global_step:
            if self._data is None:
                rank_zero_warn("FlatnessCallback: measure_at_start skipped: the subsample of an iterable dataset "
                               "is copied from the first training batches, which have not been seen yet.")  # fmt: skip
            else:
                with self._failures.guard("the measurement", refuse=True):
                    self._measure_and_log(trainer, pl_module, trainer.current_epoch, use_module_log=False)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        refuse, self._before_training = self._before_training, False
        if not self._probe_pending and (self._recorder is None or self._recorder.full):
            return
        with self._failures.guard("copying the first training batches", refuse=refuse):
            own = sub.part(batch, self._train_path)  # several training loaders: the measured one's share
            if own is None:
                return
            if self._probe_pending:
                self._probe(pl_module, self._layout.first(own), refuse)
            if self._recorder is not None and not self._recorder.full:
                self._recorder.add(own)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.config["every_n_epochs"]
        x = trainer.current_epoch + 1
        if n == 0 or x % n != 0:
            return
        with self._failures.guard("the measurement", refuse=False):
            if not self._within_budget(trainer):
                status(trainer, f"flatness: epoch {x} skipped (max_overhead={self.config['max_overhead']})")
                return
            self._measure_and_log(trainer, pl_module, x, use_module_log=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with self._failures.guard("the measurement of the final weights", refuse=False):
            self._measure_final(trainer, pl_module)

    def _measure_final(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_step == trainer.global_step and self._last_x is not None:
            # the final weights were just measured; metrics on their own schedule and the landscape
            # views may still be due
            self._complete_final(trainer, pl_module, self._last_x)
            last = self.history[-1][1] if self.history else {}
            self._draw_landscape(trainer, pl_module, self._last_x, last, final=True)
            return
        x = trainer.current_epoch
        if self._last_x is not None and x <= self._last_x:
            x = self._last_x + 1
        self._measure_and_log(trainer, pl_module, x, use_module_log=False, final=True)

    def hparams(self) -> dict[str, Any]:
        """The configuration logged as hyperparameters: the callback's options and each metric's."""
        out = {k: v for k, v in self.config.items() if k != "log_hyperparams"}
        out["metrics"] = tuple(m.name for m in self.metrics)
        for metric in self.metrics:
            out.update({f"{metric.name}.{k}": v for k, v in metric.hparams().items()})
        if self._landscape.options.every_n_epochs != 0:
            out.update({f"landscape.{k}": v for k, v in vars(self._landscape.options).items()})
        return out

    def _probe(self, pl_module: LightningModule, batch: Any, refuse: bool) -> None:
        """Once per fit, on a batch with its samples along dim 0: a module the loss cannot call, or batches it
        cannot read or count, fail here with one clear message (and what to do) instead of once per metric."""
        self._probe_pending = False
        with self._failures.guard("the loss probe", refuse=refuse):
            self._layout.count(batch)
            probe_loss(pl_module, batch, self._loss, "FlatnessCallback")

    def _start_metrics(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Each metric's once-per-fit decisions (:meth:`FlatnessMetric.on_start`), on the first measurement
        mini-batch, logged with the hyperparameters. With an iterable dataset there is no subsample yet, and
        the metrics decide at their first measurement instead."""
        ctx = self._context(trainer, pl_module, 0)
        if not ctx.batches:
            return
        ctx = dataclasses.replace(ctx, batches=list(ctx.batches[:1]), num_samples=sub.batch_size_of(ctx.batches[0]))
        decided: dict[str, Any] = {}
        for metric in self.metrics:
            with self._failures.guard(f"{metric.name}'s start", refuse=True):  # a ConfigurationError refuses the fit
                decided.update({f"{metric.name}.{k}": v for k, v in metric.on_start(ctx).items()})
        if decided and self.config["log_hyperparams"]:
            self._writer.write_hyperparams(trainer, decided)

    def _check_start(self, trainer: Trainer) -> None:
        """What the trainer's data shows about the configuration, refused before the first training step."""
        train, self._train_path = sub.first_loader_path(trainer.train_dataloader)
        self._train_size = sub.dataset_size(train)
        source = self.config["source"]
        if (train if source == "train" else sub.first_loader(trainer.val_dataloaders)) is None:
            raise ConfigurationError(f'FlatnessCallback(source="{source}") needs a {source} DataLoader; the trainer '
                                     "has none.")  # fmt: skip
        for metric in self.metrics:
            metric.check_setup(self._loss, self._train_size)

    # ------------------------------------------------------------ scheduling
    def _within_budget(self, trainer: Trainer) -> bool:
        budget = self.config["max_overhead"]
        if budget is None:
            return True
        elapsed = time.perf_counter() - self._fit_start
        ok = torch.tensor(float(self._spent <= budget * elapsed))
        # Every rank must take the same decision: rank 0's clock decides.
        return bool(trainer.strategy.broadcast(ok, src=0).item() > 0)

    # ------------------------------------------------------------------- data
    def _prepare_data(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._data is not None:
            return
        cfg = self.config
        train = sub.first_loader(trainer.train_dataloader)
        val = sub.first_loader(trainer.val_dataloaders)
        sizes = {"train": sub.dataset_size(train), "val": sub.dataset_size(val)}
        self._dataset_sizes = {split: n for split, n in sizes.items() if n is not None}
        source = train if cfg["source"] == "train" else val
        assert source is not None, "checked in on_train_start"
        if cfg["source"] == "train" and not sub.is_indexable(source):
            data = self._recorded_data(cfg)
        else:
            data = {"measure": self._draw(trainer, pl_module, "measure", source, cfg["num_samples"], 0)}
            if cfg["gap_num_samples"] > 0:
                data["gap_train"] = self._draw(trainer, pl_module, "gap_train", train, cfg["gap_num_samples"], 1)
        if data is None:
            return
        if cfg["gap_num_samples"] > 0:
            if val is None:
                rank_zero_warn("FlatnessCallback: no validation data; the gap logs only its train side "
                               "(gap/train_loss, gap/train_acc).")  # fmt: skip
            else:
                data["gap_val"] = self._draw(trainer, pl_module, "gap_val", val, cfg["gap_num_samples"], 2)
        if len(data["measure"]) < trainer.world_size:
            raise ConfigurationError(
                f"FlatnessCallback: the measurement subsample has {len(data['measure'])} mini-batches of "
                f"batch_size={cfg['batch_size']}, fewer than the {trainer.world_size} processes; lower batch_size."
            )
        self._data = data
        self._sizes_pending = True

    def _recorded_data(self, cfg: dict[str, Any]) -> dict[str, list[Any]] | None:
        """The subsamples of an iterable training set: copies of its first batches, once seen."""
        if self._recorder is None:
            self._recorder = sub.BatchRecorder(max(cfg["num_samples"], cfg["gap_num_samples"]), self._layout)
        if not self._recorder.batches:
            return None  # copied from the first training batches once the loop yields them
        recorded = self._recorder.batches
        self._recorder = None
        return {
            "measure": sub.rebatch(recorded, cfg["batch_size"], cfg["num_samples"]),
            "gap_train": sub.rebatch(recorded, cfg["batch_size"], cfg["gap_num_samples"]),
        }

    def _draw(self, trainer: Trainer, pl_module: LightningModule, name: str, loader: Any, num: int, offset: int) -> list:
        size = self.config["batch_size"]
        if name != "measure":  # bigger chunks for the gap, but at least one per process
            size = max(size, min(256, -(-num // max(1, trainer.world_size))))
        # Each batch goes through the module's transfer hooks as it came, then gets its samples along dim 0.
        if sub.is_indexable(loader):
            if name not in self._indices:
                self._indices[name] = sub.draw_indices(len(loader.dataset), num, self.config["seed"] + offset)
            batches = sub.collate_indices(loader.dataset, self._indices[name].tolist(), loader.collate_fn, size)
            return [self._layout.first(sub.to_device(pl_module, b)) for b in batches]
        # an iterable validation set: its first batches, read without touching any RNG
        taken = sub.first_batches(loader, num, self._layout)
        return sub.rebatch([self._layout.first(sub.to_device(pl_module, b)) for b in taken], size, num)

    # --------------------------------------------------------------- measuring
    def _measure_and_log(
        self, trainer: Trainer, pl_module: LightningModule, x: int, use_module_log: bool, final: bool = False
    ) -> None:
        with self._failures.guard("drawing the measurement subsample", refuse=False):  # warned once, at start
            self._prepare_data(trainer, pl_module)
        if self._data is None:
            return
        values = self.measure(trainer, pl_module, x, final=final)
        self._last_x, self._last_step = x, trainer.global_step
        self.history.append((x, values))
        self._writer.write(trainer, {**values, **self._logged_sizes()}, position(trainer, x))
        self._draw_landscape(trainer, pl_module, x, values, final)
        if use_module_log:
            for key, value in values.items():
                # identical on every rank already; sync_dist only silences Lightning's DDP warning
                pl_module.log(key, value, logger=False, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    def _draw_landscape(self, trainer: Trainer, pl_module: LightningModule, x: int, values: dict, final: bool) -> None:
        """The loss-landscape views at ``x`` if due: rank 0 only, no collectives (see ``landscape/``)."""
        if self._data is None or not self._landscape.options.due(x, final) or self._landscape.last_x == x:
            return
        start = time.perf_counter()
        status(trainer, f"flatness: epoch {x}: loss-landscape views")
        vectors = self._shared.eigenvectors if keys.HESSIAN_TOP_EIG in values else None  # this measurement's
        eig = next((m for m in self.metrics if isinstance(m, HessianEigenvalues)), HessianEigenvalues())
        self._landscape.record(
            trainer, pl_module, self._data, x, self._loss, vector=None if vectors is None else vectors[0],
            eigenvalue=values.get(keys.HESSIAN_TOP_EIG), eigen_kwargs=eig.solver_options(),
        )  # fmt: skip
        self._spent += time.perf_counter() - start

    def measure(self, trainer: Trainer, pl_module: LightningModule, x: int, *, final: bool = False) -> dict[str, float]:
        """Measure now at x-value ``x``; returns ``{key: value}`` (also left in :attr:`values`).

        ``final``: the final weights, where every metric is due whatever its own schedule.
        """
        start = time.perf_counter()
        values = self._measure(trainer, pl_module, self._context(trainer, pl_module, x), self._order, final, gap=True)
        values[keys.SECONDS] = self._seconds_since(start)
        status(trainer, f"flatness: epoch {x} measured in {values[keys.SECONDS]:.1f}s")
        self._warn_if_noisy(values)
        return values

    def _seconds_since(self, start: float) -> float:
        """The wall time since ``start``, added to the time spent measuring; returned as the mean over
        processes (every rank logs the same row). Call on every rank, after :meth:`_measure`."""
        seconds = time.perf_counter() - start
        self._spent += seconds
        self.values[keys.SECONDS].update(torch.tensor(seconds, dtype=torch.float64))
        return float(self.values[keys.SECONDS].compute())

    def _warn_if_noisy(self, values: dict[str, float]) -> None:
        """Once per key: its relative standard error is above ``keys.RELATIVE_SE_WARNING``, with the samples it
        would need, and what else helps when the data set holds fewer (:class:`NoisyMeasurementWarning`)."""
        drawn = self.sample_sizes()
        for key in keys.RELATIVE_SE_KEYS:
            value, se = values.get(key), values.get(keys.se(key))
            if key in self._noisy or value is None or se is None or not is_noisy(value, se):
                continue
            self._noisy.add(key)
            part = keys.subsample_of(key)
            option = "num_samples" if part == "measure" else "gap_num_samples"
            split = keys.split_of(part, self.config["source"])
            data = "training set" if split == "train" else "validation set"
            notice = noisy_notice(key, value, se, drawn[part], option, self.config[option],
                                  self._dataset_sizes.get(split), data)  # fmt: skip
            rank_zero_warn(notice, category=NoisyMeasurementWarning)

    def sample_sizes(self) -> dict[str, int]:
        """How many samples each subsample holds as drawn (``"measure"``, ``"gap_train"``, ``"gap_val"``):
        at most the data set it comes from, so possibly fewer than ``num_samples`` / ``gap_num_samples``."""
        return {part: sum(sub.batch_size_of(b) for b in batches) for part, batches in (self._data or {}).items()}

    def _logged_sizes(self) -> dict[str, int]:
        """The drawn subsample sizes and the data set sizes, for the first row after the subsamples are drawn
        (the report's sample-size guide reads them); ``{}`` after that."""
        if not self._sizes_pending:
            return {}
        self._sizes_pending = False
        out = {keys.drawn_samples(part): n for part, n in self.sample_sizes().items()}
        return out | {keys.dataset_size(split): n for split, n in self._dataset_sizes.items()}

    def _complete_final(self, trainer: Trainer, pl_module: LightningModule, x: int) -> None:
        """The final weights were measured at an epoch end, where metrics on their own schedule may
        not have been due (or measure more at the final weights, ``remeasure_at_final``): measure those now, into
        the same row (and at the same step), whose ``flatness/seconds`` then includes their time. Keys the row
        already holds keep their value."""
        skipped = [m for m in self._order if not m.due(x, final=False) or m.remeasure_at_final()]
        if not skipped or self._data is None:
            return
        start = time.perf_counter()
        ctx = self._context(trainer, pl_module, x)
        ctx.shared = self._shared  # what that measurement's metrics left, e.g. PACGen's bound
        values = self._measure(trainer, pl_module, ctx, skipped, final=True, gap=False)
        row = self.history[-1][1]
        # A metric measured again (remeasure_at_final) adds its keys only: those the row holds keep their logged
        # value, written once at this step, which the metrics that read its results (PACGen's bound, the
        # ratio of flatnesses' eigenpair) used.
        values = {key: value for key, value in values.items() if key not in row}
        # the row's seconds cover every metric of these weights: logged again, at the same step, with the total
        values[keys.SECONDS] = row.get(keys.SECONDS, 0.0) + self._seconds_since(start)
        row.update(values)
        self._writer.write(trainer, values, position(trainer, x))

    def _measure(
        self, trainer: Trainer, pl_module: LightningModule, ctx: MeasurementContext, metrics: list[FlatnessMetric],
        final: bool, gap: bool,
    ) -> dict[str, float]:  # fmt: skip
        """``metrics`` (those due) and, with ``gap``, the train/test gap, reduced over processes."""
        self.values.reset()
        strategy = trainer.strategy if trainer.world_size > 1 else None
        with rank_zero_buffers(strategy, pl_module), cross_process(strategy):
            updated = self._measure_metrics(trainer, ctx, metrics, final)
            if gap:
                updated += self._measure_gap(trainer, pl_module, ctx.epoch)
        values = {key: float(self.values[key].compute()) for key in updated}
        values.update(self._gap.derived(values))
        return values

    def _context(self, trainer: Trainer, pl_module: LightningModule, x: int) -> MeasurementContext:
        assert self._data is not None, "the measurement subsample is drawn in on_train_start"
        rank, world = trainer.global_rank, trainer.world_size
        batches = sub.shard(self._data["measure"], rank, world)
        held_out = self._data.get("gap_val")
        sizes = [] if held_out is None else [sub.batch_size_of(b) for b in held_out]
        return MeasurementContext(
            model=pl_module, batches=batches, loss_fn=self._loss, epoch=x, seed=self.config["seed"],
            num_samples=sum(sub.batch_size_of(b) for b in batches), world_size=world, rank=rank,
            train_size=self._train_size, batch_indices=sub.shard(range(len(self._data["measure"])), rank, world),
            held_out=None if held_out is None else sub.shard(held_out, rank, world),
            held_out_offsets=None if held_out is None else sub.shard([0, *itertools.accumulate(sizes)][:-1], rank, world),
        )  # fmt: skip

    def _measure_metrics(
        self, trainer: Trainer, ctx: MeasurementContext, metrics: list[FlatnessMetric], final: bool
    ) -> list[str]:
        updated: list[str] = []
        ctx.final = final
        due = [m for m in metrics if m.due(ctx.epoch, final)]
        for i, metric in enumerate(due):
            status(trainer, f"flatness: epoch {ctx.epoch}: {metric.name} ({i + 1}/{len(due)})")
            result = self._guard(trainer, metric.name, lambda: _run_metric(metric, ctx))
            if result is None:
                ctx.shared = SharedResults()  # failed on some rank: no rank may use what it left behind
                continue
            if trainer.is_global_zero:
                self._log_artifacts(trainer, metric, ctx.epoch)
            weight = float(ctx.num_samples) if metric.sample_weighted else 1.0
            for key, value in result.items():
                self.values[key].update(torch.tensor(value, dtype=torch.float64), weight)
                updated.append(key)
        self._shared = ctx.shared
        return updated

    def _log_artifacts(self, trainer: Trainer, metric: FlatnessMetric, x: int) -> None:
        """The metric's figures, histograms and files (rank 0 only, no collectives); failures follow ``on_error``."""
        with self._failures.guard(f"{metric.name}'s figures", refuse=False):  # a failing figure must not stop training
            metric.log_artifacts(trainer.loggers, position(trainer, x))

    def _measure_gap(self, trainer: Trainer, pl_module: LightningModule, x: int) -> list[str]:
        if self.config["gap_num_samples"] == 0:
            return []
        assert self._data is not None
        status(trainer, f"flatness: epoch {x}: train/test gap")
        updated = []
        for split, data in (("train", self._data.get("gap_train")), ("test", self._data.get("gap_val"))):
            if data is not None:
                part = sub.shard(data, trainer.global_rank, trainer.world_size)
                update = lambda: self._gap.update(split, pl_module, part) or {}  # noqa: E731
                if self._guard(trainer, "gap", update) is not None:
                    updated.append(keys.split_loss(split))
        return updated

    def _guard(self, trainer: Trainer, name: str, fn: Callable[[], dict]) -> dict | None:
        """Run one metric; on failure warn once (or re-raise) and skip it on every rank."""
        result, error = None, None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - any failure of one metric must not stop training
            if self.config["on_error"] == "raise":
                raise
            error = err
        if trainer.world_size > 1:
            failed = trainer.strategy.reduce(torch.tensor(float(error is not None)), reduce_op="sum")
            if float(failed) > 0 and error is None:
                error = RuntimeError("failed on another process")
        if error is None:
            return result
        self._failures.handle(name, error)
        return None

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "seed": self.config["seed"],
            "indices": {k: v.clone() for k, v in self._indices.items()},
            "metrics": {m.name: m.state_dict() for m in self.metrics},
            "last_x": self._last_x,
            "last_step": self._last_step,
            "spent": self._spent,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._indices = {k: torch.as_tensor(v) for k, v in state_dict.get("indices", {}).items()}
        saved = dict(state_dict.get("metrics", {}))
        if "eig_vectors" in state_dict:  # version 1 kept the eigenvectors beside the callback's own state
            saved.setdefault(HessianEigenvalues.name, {"vectors": state_dict["eig_vectors"]})
        for metric in self.metrics:
            if metric.name in saved:
                metric.load_state_dict(saved[metric.name])
        self._last_x = state_dict.get("last_x")
        self._last_step = state_dict.get("last_step")
        self._spent = float(state_dict.get("spent", 0.0))
        self._data = None


def _run_metric(metric: FlatnessMetric, ctx: MeasurementContext) -> dict[str, float]:
    """``metric.compute(ctx)`` with the model measured in place and every RNG restored; finite values only."""
    with sub.preserved_rng(), measurement_mode(ctx.model):
        out = {key: float(value) for key, value in metric.compute(ctx).items()}
    unknown = sorted(set(out) - set(metric.keys))
    if unknown:
        raise KeyError(f"{type(metric).__name__}.compute returned keys {unknown} that are not in its keys {metric.keys}.")
    if not all(v == v and abs(v) != float("inf") for v in out.values()):
        raise FloatingPointError(f"{metric.name} returned a non-finite value: {out}")
    return out


def _checked_config(metrics: list[FlatnessMetric], **cfg: Any) -> dict[str, Any]:
    """The callback's own options, validated (each error names the argument and what it accepts)."""
    out = dict(cfg)
    for name in ("every_n_epochs", "gap_num_samples", "seed"):
        out[name] = check_int(name, cfg[name], 0)
    out["num_samples"] = check_int("num_samples", cfg["num_samples"])
    out["batch_size"] = check_int("batch_size", cfg["batch_size"])
    needs = max((m.min_batches for m in metrics), default=1)
    if needs > 1 and out["num_samples"] < needs * out["batch_size"]:
        which = ", ".join(repr(m.name) for m in metrics if m.min_batches == needs)
        raise ValueError(
            f"num_samples={out['num_samples']} must be at least {needs} * batch_size = {needs * out['batch_size']} "
            f"when {which} is measured (it compares at least {needs} mini-batches of batch_size samples)."
        )
    out["source"] = check_choice("source", cfg["source"], SOURCES)
    check_loss_fn(cfg["loss_fn"])
    out["batch_keys"] = check_batch_keys(cfg["batch_keys"])
    with_batch_keys(cfg["loss_fn"], out["batch_keys"])  # refuses batch_keys with a callable or an "hf_*" loss
    if cfg["max_overhead"] is not None:
        out["max_overhead"] = check_float("max_overhead", cfg["max_overhead"], inclusive=False, maximum=1.0)
    out["on_error"] = check_choice("on_error", cfg["on_error"], ON_ERROR)
    out["measure_at_start"] = check_bool("measure_at_start", cfg["measure_at_start"])
    out["log_hyperparams"] = bool(cfg["log_hyperparams"])
    out["sample_dims"] = check_sample_dims("sample_dims", cfg["sample_dims"])
    return out


def _collection(metrics: list[FlatnessMetric], gap: bool) -> MetricCollection:
    names = [key for metric in metrics for key in metric.keys]
    if gap:
        names += [keys.TRAIN_LOSS, keys.TEST_LOSS]
    names.append(keys.SECONDS)
    # nan_strategy="error": a non-finite loss fails the gap (warned once and skipped), not silently dropped.
    return MetricCollection({key: MeanMetric(nan_strategy="error") for key in names}, compute_groups=False)
