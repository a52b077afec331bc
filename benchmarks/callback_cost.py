"""Section 5: the whole ``FlatnessCallback`` measurement at its defaults, in gradient-equivalents.

Two views of the same cost:

* per metric: each estimator as the callback runs it (``metrics.run_estimator`` with the
  callback's default options, on ``num_samples`` samples in mini-batches of ``batch_size``),
  divided by one gradient of the whole subsample (plain autograd, the same chunks). The Hessian
  eigenvalue is timed cold (first measurement) and warm-started from the vector of one SGD step
  earlier (every later measurement);
* end to end: a real ``Trainer.fit`` of two epochs with the callback at its defaults, its logged
  ``flatness/seconds`` (gap included) as a fraction of one training epoch, and in
  gradient-equivalents.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lightning_flatness.functional import measurement_mode

from ._common import (
    Config, Row, Section, error_text, fmt_params, fmt_ratio, fmt_time, interleaved, math_attention, median_ratio,
    plain_gradient,
)  # fmt: skip
from .eigen import _sgd_step
from .models import Workload, readme_workload, train_briefly, workloads

TARGET = 40.0


def _fit(work: Workload, cfg: Config, train_size: int, batch_size: int) -> tuple[float, list[float], list[str]]:
    """Two epochs of ``Trainer.fit`` with ``FlatnessCallback()``.

    Returns (epoch s, measurement s, the metrics never logged followed by the callback's warnings).
    """
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_flatness import FlatnessCallback

    gen = torch.Generator().manual_seed(cfg.seed + 7)
    x, y = work.sample(train_size, gen)
    xv, yv = work.sample(max(train_size // 4, 64), gen)
    net = work.model

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    timer, flatness = EpochTimer(), FlatnessCallback()
    trainer = L.Trainer(
        max_epochs=2, callbacks=[timer, flatness], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="gpu" if cfg.device.type == "cuda" else "cpu",
        devices=1,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(
            Module(),
            DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(xv, yv), batch_size=256),
        )
    seconds = [values["flatness/seconds"] for _, values in flatness.history]
    logged = {key for _, values in flatness.history for key in values}
    missing = [m for m in flatness.config["metrics"] if not any(k.startswith(f"flatness/{m}") for k in logged)]
    failures = [str(w.message) for w in caught if str(w.message).startswith("FlatnessCallback:")]
    return sorted(timer.seconds)[len(timer.seconds) // 2], seconds, missing + failures


def run(cfg: Config) -> Section:
    try:
        from lightning_flatness import FlatnessCallback
        from lightning_flatness.metrics import FLATNESS_METRICS, run_estimator
    except ImportError as exc:
        section = Section("callback", "5. FlatnessCallback measurement cost", [])
        section.notes.append(f"Skipped: {error_text(exc)}")
        return section
    defaults = FlatnessCallback()
    options = defaults.options
    num_samples, batch_size = defaults.config["num_samples"], defaults.config["batch_size"]
    if cfg.quick:
        num_samples, batch_size = 128, 32
    train_size = 1024 if cfg.quick else 4000  # mnist1d's training set, as in the README's study
    section = Section(
        "callback",
        f"5. FlatnessCallback at its defaults ({num_samples} samples, mini-batches of {batch_size}) in gradient-equivalents",
        ["model", "full-subsample gradient"] + [f"{m}" for m in FLATNESS_METRICS]
        + ["hessian_top_eig warm", "total (eig warm)", "target", "met", "fit: measurement / epoch", "fit: measurement in grads"],
    )  # fmt: skip
    section.notes.append(
        "Each metric column = its time as `FlatnessCallback` runs it (`metrics.run_estimator`, default options: "
        f"tol={options.tol}, max_iter={options.max_iter}, num_probes={options.num_probes}, ρ estimated) / one "
        "gradient of the whole subsample (plain autograd, same chunks), the median over "
        f"{2 if cfg.quick else 3} interleaved rounds of the ratio within a round; `hessian_top_eig` is cold (first "
        "measurement), `warm` is started from the eigenvector of one SGD step earlier, as every later measurement "
        f"is. total = the four metrics with the warm eigenvalue (the gap is excluded: forward passes only). fit = "
        f"`Trainer.fit` of 2 epochs on {train_size} synthetic samples (batch {batch_size}, SGD) with `FlatnessCallback()` "
        "at its defaults: the logged `flatness/seconds` of epoch 2 (warm-started eigenvalue, as every measurement after the first; gap included) / the median training epoch. The "
        "README's example is the batch-size study (a 40-256-256-10 MLP on mnist1d, 4000 training samples); its "
        "model and data size are used here with synthetic 40-dimensional inputs, at batch 64 (the study runs 16 to "
        "1024: the fraction scales with the number of steps per epoch)."
    )
    section.notes.append(
        "As in the callback, `pacgen` runs after `hessian_top_eig` and gets twice the converged top eigenvalue as "
        "`hessian_max` (`pacgen_screen=True`): the 16 products of the Hessian diagonal are skipped when that bound shows "
        "no `H_ii` can move Ψ off its `1/N_i` floor (0 coordinates left on the MLP and the transformer, so PACGen costs "
        "the 6 products of ρ; 69 on the CNN, whose BatchNorm scales are large, so its diagonal is still estimated)."
    )
    works = workloads("quick" if cfg.quick else "eigen", cfg.device, cfg.models, cfg.seed)
    if not cfg.quick:  # the README's model in place of the benchmark MLP
        works = [readme_workload(cfg.device, cfg.seed) if w.name == "mlp" else w for w in works]
    rounds = 2 if cfg.quick else 3
    for work in works:
        model = work.model
        train_briefly(work, 20 if cfg.quick else 100, cfg.device, cfg.seed)
        batches = work.batches(num_samples, batch_size, cfg.seed + 3, cfg.device)
        attention = math_attention() if work.name == "transformer" else contextlib.nullcontext()
        cells: dict[str, str] = {"model": f"{work.label} ({fmt_params(work.num_params)})"}

        def estimator(name: str, init: torch.Tensor | None = None) -> Callable[[], object]:
            shared: dict[str, float] = {}  # as in FlatnessCallback.measure: the eigenvalue bounds PACGen's diagonal
            if name == "pacgen":
                run_estimator("hessian_top_eig", model, batches, options, seed=cfg.seed, init=None, local_count=num_samples, shared=shared)
            return lambda: run_estimator(
                name, model, batches, options, seed=cfg.seed, init=init, local_count=num_samples, shared=shared
            )

        with attention:
            vectors = None
            try:  # the eigenvectors one SGD step earlier, to warm-start from as every later measurement does
                _, vectors = run_estimator("hessian_top_eig", model, batches, options, seed=cfg.seed, init=None, local_count=num_samples)
                _sgd_step(model, batches[0], lr=0.05)
            except Exception as exc:
                cells["hessian_top_eig warm"] = f"error: {error_text(exc)}"
            fns: dict[str, Callable[[], object]] = {"gradient": plain_gradient(model, batches)}
            for name in FLATNESS_METRICS:
                try:
                    fns[name] = estimator(name)
                    fns[name]()
                except Exception as exc:
                    cells[name] = f"error: {error_text(exc)}"
                    fns.pop(name, None)
            if vectors is not None:
                fns["hessian_top_eig warm"] = estimator("hessian_top_eig", init=vectors)
            with measurement_mode(model):  # the plain gradient in eval mode, like the estimators
                times = interleaved(fns, rounds, cfg.device, warmup=0)  # each ran once above
        grad = sorted(times["gradient"])[rounds // 2]
        cells["full-subsample gradient"] = fmt_time(grad)
        total = 0.0
        for name in [m for m in FLATNESS_METRICS if m != "hessian_top_eig"] + ["hessian_top_eig", "hessian_top_eig warm"]:
            if name in times:
                ratio = median_ratio(times[name], times["gradient"])
                cells[name] = fmt_ratio(ratio, 1)
                total += ratio if name != "hessian_top_eig" else 0.0
        grad_seconds = grad
        ratio = total
        met = ratio <= TARGET
        cells.update({"total (eig warm)": fmt_ratio(ratio, 1), "target": f"≤ {TARGET:g}", "met": "✅ met" if met else "❌ missed"})
        try:  # the real callback, outside any benchmark workaround
            epoch, measured, missing = _fit(work, cfg, train_size, batch_size)
            med = measured[-1] if measured else float("nan")  # epoch 2: warm-started, as every later one
            cells["fit: measurement / epoch"] = f"{med / epoch:.2f} ({fmt_time(med)} / {fmt_time(epoch)})"
            cells["fit: measurement in grads"] = fmt_ratio(med / grad_seconds, 1)
            if missing:
                cells["fit: measurement / epoch"] += " †"
                section.notes.append(
                    f"† {work.label}: in `Trainer.fit` a metric failed and was skipped, so the measurement time omits "
                    f"it: {'; '.join(missing)}"
                )
        except Exception as exc:
            cells["fit: measurement / epoch"] = f"error: {error_text(exc)}"
        section.rows.append(Row(cells, ratio, f"≤ {TARGET:g}", met))
        section.targets.append(("callback measurement / full-subsample gradient", work.label, fmt_ratio(ratio, 1), f"≤ {TARGET:g}", met))
    return section
