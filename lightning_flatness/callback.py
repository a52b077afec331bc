"""``FlatnessCallback``: flatness curves and the generalization gap, per epoch, in any logger."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MetricCollection

from . import _subsample as sub
from ._config import validate
from ._distributed import cross_process, rank_zero_buffers
from .landscape import LandscapeOptions, LandscapeRecorder
from ._logging import LoggerWriter, status
from .metrics import FLATNESS_METRICS, EstimatorOptions, GapMeter, build_collection, finite, measurement_seed, run_estimator


class FlatnessCallback(Callback):
    """Measures loss-landscape flatness and the train/test gap during ``Trainer.fit``.

    At the end of every ``every_n_epochs``-th epoch (0: only at the end of training), and
    optionally before the first (``measure_at_start``), the callback evaluates ``metrics`` on a
    fixed measurement subsample of ``num_samples`` samples (drawn once, seeded by ``seed``, from
    the training set, or the validation set with ``source="val"``) split into mini-batches of
    ``batch_size``, plus the eval-mode loss and accuracy on fixed train and validation subsamples
    of ``gap_num_samples`` (0 disables the gap). The final weights are always measured once in
    ``on_train_end``. Values go to every logger at ``x = epochs completed`` (0 is the
    initialization), to ``trainer.callback_metrics`` and to :attr:`metrics`.

    Args:
        metrics: any of ``"hessian_top_eig"``, ``"grad_cosine_regret"``, ``"fisher_trace"``, ``"pacgen"``
            (the default: all four), and ``"local_entropy"`` (off by default: costly).
        every_n_epochs: measure after every n-th epoch; 0 measures only the final weights.
        num_samples: size of the measurement subsample.
        batch_size: mini-batch size of the regret's mini-batches and of the chunks evaluated at once.
        source: ``"train"`` or ``"val"``: where the measurement subsample is drawn from.
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable ``loss_fn(model, batch) -> (B,)``.
        gap_num_samples: size of the train and validation subsamples of the gap (all if fewer).
        seed: seeds the subsample draws and the stochastic estimators.
        k, tol, max_iter: Hessian eigenvalues (``hessian_eigenvalues``); warm-started from the last ones.
        cache_chunks: Hessian eigenvalues: keep the gradient graphs between Lanczos products when the
            subsample (this process's shard) has at most this many mini-batches, which makes each
            product about half as costly for that many mini-batches' graphs held in memory at once.
        kind: Fisher trace, ``"empirical"`` or ``"mc"``.
        gamma, eps, rho, num_probes: PACGen options (``pacgen``).
        pacgen_screen: when ``hessian_top_eig`` is measured too (and converged), pass twice its value to
            ``pacgen`` as ``hessian_max``, which skips the ``num_probes`` products of the Hessian's
            diagonal when no ``H_ii`` below that bound could change Ψ (``docs/metrics.md``).
        entropy_gamma, entropy_noise, entropy_steps, entropy_step_size: ``local_entropy`` options
            (``gamma``, ``noise``, ``num_steps``, ``step_size``); it costs ``9 * entropy_steps``
            gradient passes over the measurement subsample.
        measure_at_start: also measure in ``on_train_start`` so curves start at initialization.
        max_overhead: skip epoch-end measurements while the time spent measuring exceeds this
            fraction of the training wall time (``None``: no budget).
        on_error: ``"warn"``: a failing metric (non-finite, out of memory, unsupported layer) warns
            once and is skipped for that measurement; ``"raise"``: re-raise.
        log_hyperparams: log this configuration as hyperparameters to every logger.
        landscape_every_n_epochs: loss-landscape views (a 1-D filter-normalized slice, optionally a
            2-D one, and the slice along the top Hessian eigenvector on train and validation data)
            logged as images and to ``<log_dir>/landscape/epoch_<x>.json``: 0 off (default), -1 only
            for the final weights, n at every measured epoch divisible by n and for the final weights.
            Rank 0 only. See ``docs/metrics.md``.
        landscape_steps, landscape_span: grid points and half-width of the 1-D slices (the random
            direction's and, with ``landscape_eig_span``, the eigenvector's).
        landscape_2d, landscape_2d_steps: also the 2-D slice, on a ``landscape_2d_steps²`` grid.
    """

    def __init__(
        self,
        metrics: Sequence[str] = FLATNESS_METRICS,
        every_n_epochs: int = 1,
        num_samples: int = 512,
        batch_size: int = 64,
        source: str = "train",
        loss_fn: Union[str, Callable] = "cross_entropy",
        gap_num_samples: int = 2048,
        seed: int = 0,
        k: int = 1,
        tol: float = 1e-4,
        max_iter: int = 100,
        cache_chunks: int = 1,
        kind: str = "empirical",
        gamma: float = 0.1,
        eps: float = 0.1,
        rho: Union[float, None] = None,
        num_probes: int = 16,
        pacgen_screen: bool = True,
        entropy_gamma: float = 100.0,
        entropy_noise: float = 0.03,
        entropy_steps: int = 100,
        entropy_step_size: float = 0.002,
        measure_at_start: bool = False,
        max_overhead: Union[float, None] = None,
        on_error: str = "warn",
        log_hyperparams: bool = True,
        landscape_every_n_epochs: int = 0,
        landscape_steps: int = 21,
        landscape_span: float = 1.0,
        landscape_2d: bool = False,
        landscape_2d_steps: int = 15,
        landscape_eig_span: float = 1.0,
    ) -> None:
        super().__init__()
        cfg = validate(
            dict(
                metrics=metrics, every_n_epochs=every_n_epochs, num_samples=num_samples, batch_size=batch_size,
                source=source, loss_fn=loss_fn, gap_num_samples=gap_num_samples, seed=seed, k=k, tol=tol,
                max_iter=max_iter, cache_chunks=cache_chunks, kind=kind, gamma=gamma, eps=eps, rho=rho,
                num_probes=num_probes, pacgen_screen=pacgen_screen,
                entropy_gamma=entropy_gamma, entropy_noise=entropy_noise, entropy_steps=entropy_steps,
                entropy_step_size=entropy_step_size, measure_at_start=measure_at_start, max_overhead=max_overhead, on_error=on_error,
                landscape_every_n_epochs=landscape_every_n_epochs, landscape_steps=landscape_steps,
                landscape_span=landscape_span, landscape_2d=landscape_2d, landscape_2d_steps=landscape_2d_steps,
                landscape_eig_span=landscape_eig_span,
            )
        )  # fmt: skip
        self.config = {**cfg, "log_hyperparams": bool(log_hyperparams)}
        self.options = EstimatorOptions(
            loss_fn=loss_fn, k=cfg["k"], tol=cfg["tol"], max_iter=cfg["max_iter"], cache_chunks=cfg["cache_chunks"],
            kind=cfg["kind"],
            gamma=cfg["gamma"], eps=cfg["eps"], rho=cfg["rho"], num_probes=cfg["num_probes"],
            pacgen_screen=cfg["pacgen_screen"],
            entropy_gamma=cfg["entropy_gamma"], entropy_noise=cfg["entropy_noise"],
            entropy_steps=cfg["entropy_steps"], entropy_step_size=cfg["entropy_step_size"],
        )  # fmt: skip
        self.metrics: MetricCollection = build_collection(cfg["metrics"], cfg["k"], cfg["gap_num_samples"] > 0)
        self.history: list[tuple[int, dict[str, float]]] = []
        self._gap = GapMeter(self.metrics, loss_fn)
        self._writer = LoggerWriter()
        self._indices: dict[str, Tensor] = {}
        self._data: dict[str, list[Any]] | None = None
        self._recorder: sub.BatchRecorder | None = None
        self._eig_vectors: Tensor | None = None
        self._last_x: int | None = None
        self._last_step: int | None = None
        self._spent = 0.0
        self._fit_start = 0.0
        self._warned: set[str] = set()
        self._landscape = LandscapeRecorder(
            LandscapeOptions(
                every_n_epochs=cfg["landscape_every_n_epochs"], steps=cfg["landscape_steps"],
                span=cfg["landscape_span"], two_d=cfg["landscape_2d"], steps_2d=cfg["landscape_2d_steps"], eig_span=cfg["landscape_eig_span"],
            ),
            seed=measurement_seed(cfg["seed"], 0, "landscape"), on_error=cfg["on_error"],
        )  # fmt: skip

    # ------------------------------------------------------------------ hooks
    @property
    def state_key(self) -> str:
        return self._generate_state_key(seed=self.config["seed"], source=self.config["source"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.metrics.to(pl_module.device)
        if stage == "fit" and self.config["log_hyperparams"]:  # before Lightning writes hparams.yaml
            self._writer.write_hyperparams(trainer, {k: v for k, v in self.config.items() if k != "log_hyperparams"})

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self.metrics.to(pl_module.device)
        self._prepare_data(trainer, pl_module)
        if self.config["measure_at_start"] and self._last_step != trainer.global_step:
            if self._data is None:
                rank_zero_warn("FlatnessCallback: measure_at_start skipped: the subsample of an iterable dataset "
                               "is copied from the first training batches, which have not been seen yet.")
            else:
                self._measure_and_log(trainer, pl_module, trainer.current_epoch, use_module_log=False)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._recorder is not None and not self._recorder.full:
            self._recorder.add(batch)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.config["every_n_epochs"]
        x = trainer.current_epoch + 1
        if n == 0 or x % n != 0:
            return
        if not self._within_budget(trainer):
            status(trainer, f"flatness: epoch {x} skipped (max_overhead={self.config['max_overhead']})")
            return
        self._measure_and_log(trainer, pl_module, x, use_module_log=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_step == trainer.global_step and self._last_x is not None:
            # the final weights were just measured; their landscape views may still be due
            last = self.history[-1][1] if self.history else {}
            self._draw_landscape(trainer, pl_module, self._last_x, last, final=True)
            return
        x = trainer.current_epoch
        if self._last_x is not None and x <= self._last_x:
            x = self._last_x + 1
        self._measure_and_log(trainer, pl_module, x, use_module_log=False, final=True)

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
        source = train if cfg["source"] == "train" else val
        if source is None:
            raise ValueError(f'FlatnessCallback(source="{cfg["source"]}") needs a {cfg["source"]} DataLoader; '
                             "the trainer has none.")  # fmt: skip
        if cfg["source"] == "train" and not sub.is_indexable(source):
            if self._recorder is None:
                self._recorder = sub.BatchRecorder(max(cfg["num_samples"], cfg["gap_num_samples"]))
            if not self._recorder.batches:
                return  # copied from the first training batches once the loop yields them
            recorded = self._recorder.batches
            self._data = {
                "measure": sub.rebatch(recorded, cfg["batch_size"], cfg["num_samples"]),
                "gap_train": sub.rebatch(recorded, cfg["batch_size"], cfg["gap_num_samples"]),
            }
            self._recorder = None
        else:
            self._data = {"measure": self._draw(trainer, pl_module, "measure", source, cfg["num_samples"], 0)}
            if cfg["gap_num_samples"] > 0:
                self._data["gap_train"] = self._draw(trainer, pl_module, "gap_train", train, cfg["gap_num_samples"], 1)
        if cfg["gap_num_samples"] > 0:
            if val is None:
                rank_zero_warn("FlatnessCallback: no validation data; the gap logs only its train side "
                               "(gap/train_loss, gap/train_acc).")  # fmt: skip
            else:
                self._data["gap_val"] = self._draw(trainer, pl_module, "gap_val", val, cfg["gap_num_samples"], 2)

    def _draw(self, trainer: Trainer, pl_module: LightningModule, name: str, loader: Any, num: int, offset: int) -> list:
        size = self.config["batch_size"]
        if name != "measure":  # bigger chunks for the gap, but at least one per process
            size = max(size, min(256, -(-num // max(1, trainer.world_size))))
        if sub.is_indexable(loader):
            if name not in self._indices:
                self._indices[name] = sub.draw_indices(len(loader.dataset), num, self.config["seed"] + offset)
            batches = sub.collate_indices(loader.dataset, self._indices[name].tolist(), loader.collate_fn, size)
        else:  # an iterable validation set: its first batches, read without touching any RNG
            with sub.preserved_rng():
                taken, count = [], 0
                for batch in loader:
                    taken.append(batch)
                    count += sub.batch_size_of(batch)
                    if count >= num:
                        break
            batches = sub.rebatch(taken, size, num)
        return [self._to_device(trainer, pl_module, b) for b in batches]

    @staticmethod
    def _to_device(trainer: Trainer, pl_module: LightningModule, batch: Any) -> Any:
        handler = getattr(pl_module, "_apply_batch_transfer_handler", None)
        with sub.preserved_rng():
            if handler is not None:
                return handler(batch, pl_module.device)
            return sub.move(batch, pl_module.device)

    # --------------------------------------------------------------- measuring
    def _measure_and_log(
        self, trainer: Trainer, pl_module: LightningModule, x: int, use_module_log: bool, final: bool = False
    ) -> None:
        self._prepare_data(trainer, pl_module)
        if self._data is None:
            return
        values = self.measure(trainer, pl_module, x)
        self._last_x, self._last_step = x, trainer.global_step
        self.history.append((x, values))
        self._writer.write(trainer, values, x)
        self._draw_landscape(trainer, pl_module, x, values, final)
        if use_module_log:
            for key, value in values.items():
                # identical on every rank already; sync_dist only silences Lightning's DDP warning
                pl_module.log(key, value, logger=False, on_step=False, on_epoch=True, sync_dist=trainer.world_size > 1)

    def _draw_landscape(self, trainer: Trainer, pl_module: LightningModule, x: int, values: dict, final: bool) -> None:
        """The loss-landscape views at ``x`` if due: rank 0 only, no collectives (see ``_landscape.py``)."""
        if self._data is None or not self._landscape.options.due(x, final) or self._landscape.last_x == x:
            return
        start = time.perf_counter()
        status(trainer, f"flatness: epoch {x}: loss-landscape views")
        fresh = "flatness/hessian_top_eig" in values and self._eig_vectors is not None  # this measurement's
        self._landscape.record(
            trainer, pl_module, self._data, x, self.options.loss_fn, vector=self._eig_vectors[0] if fresh else None,
            eigenvalue=values.get("flatness/hessian_top_eig"),
            eigen_kwargs={"tol": self.options.tol, "max_iter": self.options.max_iter},
        )  # fmt: skip
        self._spent += time.perf_counter() - start

    def measure(self, trainer: Trainer, pl_module: LightningModule, x: int) -> dict[str, float]:
        """Measure now; returns ``{key: value}`` (also left in :attr:`metrics`)."""
        start = time.perf_counter()
        assert self._data is not None
        rank, world = trainer.global_rank, trainer.world_size
        self.metrics.reset()
        updated: list[str] = []
        if len(self._data["measure"]) < world:
            raise ValueError(
                f"FlatnessCallback: the measurement subsample has {len(self._data['measure'])} mini-batches of "
                f"batch_size={self.config['batch_size']}, fewer than the {world} processes; lower batch_size."
            )
        batches = sub.shard(self._data["measure"], rank, world)
        local = sum(sub.batch_size_of(b) for b in batches)
        # The top eigenvalue first: it bounds the Hessian's diagonal for PACGen's screen.
        names = sorted(self.config["metrics"], key=lambda name: name != "hessian_top_eig")
        shared: dict[str, float] = {}
        strategy = trainer.strategy if world > 1 else None
        with rank_zero_buffers(strategy, pl_module), cross_process(strategy):
            for i, name in enumerate(names):
                status(trainer, f"flatness: epoch {x}: {name} ({i + 1}/{len(names)})")
                result = self._guard(trainer, name, lambda: self._estimate(name, pl_module, batches, x, local, shared))
                if result is None:
                    shared.clear()  # failed on some rank: no rank may use what it left behind
                else:
                    for key, (value, weight) in result.items():
                        self.metrics[key].update(torch.tensor(value, dtype=torch.float64), weight)
                        updated.append(key)
            if self.config["gap_num_samples"] > 0:
                status(trainer, f"flatness: epoch {x}: train/test gap")
                for split, data in (("train", self._data.get("gap_train")), ("test", self._data.get("gap_val"))):
                    if data is not None:
                        part = sub.shard(data, rank, world)
                        update = lambda: (self._gap.update(split, pl_module, part) if part else None) or {}  # noqa: E731
                        if self._guard(trainer, "gap", update) is not None:
                            updated.append(f"gap/{split}_loss")
        values = {key: float(self.metrics[key].compute()) for key in updated}
        for split in ("train", "test"):
            if self._gap.has_accuracy(split) and f"gap/{split}_loss" in values and self.metrics[f"gap/{split}_acc"].update_called:
                values[f"gap/{split}_acc"] = float(self.metrics[f"gap/{split}_acc"].compute())
        if "gap/test_loss" in values and "gap/train_loss" in values:
            values["gap/loss"] = values["gap/test_loss"] - values["gap/train_loss"]
        if "gap/test_acc" in values and "gap/train_acc" in values:
            values["gap/acc"] = values["gap/train_acc"] - values["gap/test_acc"]
        seconds = time.perf_counter() - start
        self._spent += seconds
        self.metrics["flatness/seconds"].update(torch.tensor(seconds, dtype=torch.float64))
        values["flatness/seconds"] = float(self.metrics["flatness/seconds"].compute())
        status(trainer, f"flatness: epoch {x} measured in {seconds:.1f}s")
        return values

    def _estimate(self, name: str, pl_module: LightningModule, batches: list, x: int, local: int, shared: dict) -> dict:
        seed = measurement_seed(self.config["seed"], x, name)
        init = self._eig_vectors if name == "hessian_top_eig" else None
        if init is not None and init.shape[-1] != sum(p.numel() for p in pl_module.parameters() if p.requires_grad):
            init = None  # the trainable parameters changed (e.g. unfrozen): start afresh
        out, vectors = run_estimator(
            name, pl_module, batches, self.options, seed=seed, init=init, local_count=local, shared=shared
        )
        if not finite(out):
            raise FloatingPointError(f"{name} returned a non-finite value: {out}")
        if vectors is not None:
            self._eig_vectors = vectors
        return out

    def _guard(self, trainer: Trainer, name: str, fn: Callable[[], dict]) -> dict | None:
        """Run one metric; on failure warn once (or re-raise) and skip it on every rank."""
        result, error = None, None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - any failure of one metric must not stop training
            if self.config["on_error"] == "raise":
                raise
            error = err
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if trainer.world_size > 1:
            failed = trainer.strategy.reduce(torch.tensor(float(error is not None)), reduce_op="sum")
            if float(failed) > 0 and error is None:
                error = RuntimeError("failed on another process")
        if error is None:
            return result
        if name not in self._warned:
            self._warned.add(name)
            rank_zero_warn(
                f"FlatnessCallback: {name} failed and is skipped for this measurement "
                f"({type(error).__name__}: {error}). Further failures of {name} are not reported; "
                'pass on_error="raise" to stop instead.'
            )
        return None

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "seed": self.config["seed"],
            "indices": {k: v.clone() for k, v in self._indices.items()},
            "eig_vectors": None if self._eig_vectors is None else self._eig_vectors.detach().cpu(),
            "last_x": self._last_x,
            "last_step": self._last_step,
            "spent": self._spent,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._indices = {k: torch.as_tensor(v) for k, v in state_dict.get("indices", {}).items()}
        self._eig_vectors = state_dict.get("eig_vectors")
        self._last_x = state_dict.get("last_x")
        self._last_step = state_dict.get("last_step")
        self._spent = float(state_dict.get("spent", 0.0))
        self._data = None
