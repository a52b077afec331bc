"""Section 6: ``FlatnessCallback()`` at its defaults in ``Trainer.fit``, measured as a user would.

For each workload, ``Trainer.fit`` runs twice from the same initial weights on the same data
(same seed, same shuffles): without the callback and with ``FlatnessCallback()`` at its defaults
(every epoch, 512 samples in mini-batches of 64, the four default metrics and the gap on 2048
train and 2048 validation samples). Inside the fit with the callback, right after every
measurement, one plain gradient over a subsample of the measurement's shape is timed, so each
measurement has its own denominator measured under the same load; each metric's ``compute``
and the gap's ``GapMeter.update`` are clocked where the callback calls them, so the parts are
those of the very measurement whose logged ``flatness/seconds`` is the total.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from lightning_flatness.functional import measurement_mode
from lightning_flatness.metrics import DEFAULT_METRICS

from ._common import (
    Config, Row, Section, error_text, fmt_ratio, fmt_time, middle, model_label, plain_gradient, sync, timed,
)  # fmt: skip
from .callback_cost import _epoch_timer, _skipped, fit_module, loaders
from .models import Workload, issue_cnn_workload, readme_workload, resnet_workload, teacher_workload, workloads

TARGET_TOTAL = 10.0  # gradient-equivalents of one warm measurement
TARGET_PROJECTED = 1.10  # fit time with / without on a 50k-sample epoch
TARGET_PACGEN = 4.0  # gradient-equivalents of PACGen at its defaults
PROJECTED_EPOCH = 50_000
METRICS = DEFAULT_METRICS  # every part of the default measurement is clocked
PARTS = (*METRICS, "gap", "other")
PRODUCTS_COLUMN = "HVPs: eigenvalue / PACGen (warm)"


@dataclass
class Plan:
    """A workload and how it is fitted: training set size, batch size, epochs."""

    work: Workload
    train_size: int
    batch_size: int
    epochs: int


@dataclass
class FitResult:
    """What the two fits measured: wall seconds, training epochs (measurement excluded) and, per measurement,
    its logged seconds, its parts and the gradient timed right after it."""

    with_callback: float
    without: float
    epochs: list[float]
    measurements: list[dict[str, float]]
    skipped: list[str]


# Section 6's own workloads beside the benchmark's three: name -> (full size, toy size for ``--quick``).
EXTRA = {
    "teacher_mlp": (lambda d, seed: teacher_workload(d, seed), lambda d, seed: teacher_workload(d, seed, (40, 64))),
    "resnet": (lambda d, seed: resnet_workload(d, seed), lambda d, seed: resnet_workload(d, seed, (8, 16), 8)),
}


def _plans(cfg: Config) -> list[Plan]:
    """The issue's workloads; ``--quick``: the toy models, two epochs of 256 samples."""
    if cfg.quick:
        names = cfg.models or ("mlp", "cnn_bn", "transformer", *EXTRA)
        toys = {w.name: w for w in workloads("quick", cfg.device, names, cfg.seed)}
        toys.update({name: EXTRA[name][1](cfg.device, cfg.seed) for name in names if name in EXTRA})
        return [Plan(toys[name], 256, 32, 2) for name in names if name in toys]
    plans = {
        "mlp": lambda: Plan(readme_workload(cfg.device, cfg.seed), 4000, 64, 3),  # the sweep's MLP on mnist1d's size
        "cnn_bn": lambda: Plan(issue_cnn_workload(cfg.device, cfg.seed), 2048, 128, 3),
        "transformer": lambda: Plan(workloads("eigen", cfg.device, ("transformer",), cfg.seed)[0], 4000, 64, 3),
        # the user's report: 4000 samples, batch 64, 6 epochs
        "teacher_mlp": lambda: Plan(EXTRA["teacher_mlp"][0](cfg.device, cfg.seed), 4000, 64, 6),
        "resnet": lambda: Plan(EXTRA["resnet"][0](cfg.device, cfg.seed), 2048, 128, 3),  # as the CNN
    }
    return [plans[name]() for name in (cfg.models or tuple(plans))]


def _callback_options(cfg: Config) -> dict[str, int]:
    """Full run: the defaults. ``--quick``: a subsample and a gap the toy training set can hold."""
    return {"num_samples": 128, "batch_size": 32, "gap_num_samples": 128} if cfg.quick else {}


@contextlib.contextmanager
def _clocked(metrics: list[Any], parts: dict[str, float], device: torch.device) -> Iterator[None]:
    """Adds the seconds of every ``metric.compute`` and ``GapMeter.update`` call to ``parts`` while open.

    Wrapping where the callback calls them times the parts of the logged measurement itself,
    with the warm start and the weights of that epoch, instead of a replay outside the fit.
    """
    from lightning_flatness.metrics import GapMeter

    def clock(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    update = GapMeter.update
    GapMeter.update = clock("gap", update)  # type: ignore[method-assign]
    for metric in metrics:  # an instance attribute shadows the class's method until deleted
        metric.compute = clock(metric.name, metric.compute)
    try:
        yield
    finally:
        GapMeter.update = update  # type: ignore[method-assign]
        for metric in metrics:
            del metric.compute


# The estimators whose Hessian-vector products each measurement counts: (module the metric calls it from, name).
COUNTED = {"hessian_top_eig": ("lightning_flatness.metrics.hessian", "hessian_eigenvalues"),
           "pacgen": ("lightning_flatness.metrics.pacgen", "pacgen")}  # fmt: skip


@contextlib.contextmanager
def _counted(products: dict[str, float]) -> Iterator[None]:
    """Adds the ``n_hvp`` of every eigenvalue and PACGen call the metrics make to ``products["<name> products"]``."""
    import importlib

    saved = []
    for name, (module_name, attr) in COUNTED.items():
        module = importlib.import_module(module_name)
        estimator = getattr(module, attr)

        def counting(*args: Any, _estimator: Callable[..., Any] = estimator, _name: str = name, **kwargs: Any) -> Any:
            result = _estimator(*args, **kwargs)
            key = f"{_name} products"
            products[key] = products.get(key, 0) + result.n_hvp
            return result

        setattr(module, attr, counting)
        saved.append((module, attr, estimator))
    try:
        yield
    finally:
        for module, attr, estimator in saved:
            setattr(module, attr, estimator)


def _gradient_clock(flatness: Any, parts: dict[str, float], batches: list, repeats: int, device: torch.device) -> Any:
    """A callback, placed after ``flatness``, closing each measurement's record at the epoch's end.

    The record holds the logged ``flatness/seconds``, the clocked parts (``other``: the rest of the
    logged seconds, the callback's bookkeeping) and the middle of ``repeats`` plain gradients over
    ``batches`` timed right then, in eval mode like the estimators. ``.spent`` is its own time, to
    take off the fit's wall time.
    """
    import lightning as L

    class GradientClock(L.Callback):
        def __init__(self) -> None:
            self.records: list[dict[str, float]] = []
            self.spent = 0.0

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            start = time.perf_counter()
            if flatness.history and len(flatness.history) > len(self.records):
                record = {name: parts.pop(name, 0.0) for name in PARTS[:-1]}
                record["seconds"] = flatness.history[-1][1]["flatness/seconds"]
                record["other"] = record["seconds"] - sum(record[name] for name in PARTS[:-1])
                record.update({f"{name} products": parts.pop(f"{name} products", 0) for name in COUNTED})
                with measurement_mode(pl_module):  # restores weights, gradients and RNG: training goes on untouched
                    gradient = plain_gradient(pl_module, batches)
                    record["gradient"] = middle([timed(gradient, device)[0] for _ in range(repeats)])
                self.records.append(record)
            self.spent += time.perf_counter() - start

    return GradientClock()


def _fits(plan: Plan, cfg: Config, repeats: int) -> FitResult:
    """A warm-up, then the fit without the callback and the fit with ``FlatnessCallback()``, from the same weights."""
    from lightning_flatness import FlatnessCallback

    data = loaders(plan.work, cfg, plan.train_size, plan.batch_size)
    start = plan.work.model  # never trained itself: every fit gets a copy
    # the process's and the model's first steps (thread pools, kernel selection) before either timed fit
    fit_module(copy.deepcopy(start), cfg, data, [], 1, limit_train_batches=3, limit_val_batches=1)
    bare = _epoch_timer()
    without, _ = fit_module(copy.deepcopy(start), cfg, data, [bare], plan.epochs)
    flatness, parts = FlatnessCallback(**_callback_options(cfg)), dict[str, float]()
    options = flatness.config
    batches = plan.work.batches(options["num_samples"], options["batch_size"], cfg.seed + 3, cfg.device)
    clock = _gradient_clock(flatness, parts, batches, repeats, cfg.device)
    with _clocked(flatness.metrics, parts, cfg.device), _counted(parts):
        wall, caught = fit_module(copy.deepcopy(start), cfg, data, [_epoch_timer(), flatness, clock], plan.epochs)
    return FitResult(wall - clock.spent, without, bare.seconds, clock.records, _skipped(flatness, caught))


def _summary(plan: Plan, result: FitResult) -> dict[str, Any]:
    """The row's numbers. Parts and ``total`` in gradients: the median over the warm measurements (all but
    the first, whose eigenvalue starts cold) of each one's ratio to the gradient timed right after it."""
    warm, cold = result.measurements[1:] or result.measurements, result.measurements[0]
    out = {name: statistics.median(r[name] / r["gradient"] for r in warm) for name in PARTS}
    out["total"] = statistics.median(r["seconds"] / r["gradient"] for r in warm)
    out["cold"] = cold["seconds"] / cold["gradient"]
    out["seconds"] = statistics.median(r["seconds"] for r in warm)
    out["gradient"] = statistics.median(r["gradient"] for r in warm)
    for name in COUNTED:  # the range over the warm measurements
        counts = [int(r[f"{name} products"]) for r in warm]
        out[f"{name} products"] = f"{min(counts)}–{max(counts)}" if min(counts) != max(counts) else str(counts[0])
    out["epoch"], out["fit"] = middle(result.epochs), result.with_callback / result.without
    # a 50k-sample epoch takes 50k / train_size of these epochs; the measurement's size does not change
    out["projected"] = 1 + out["seconds"] / (out["epoch"] * PROJECTED_EPOCH / plan.train_size)
    return out


def _row(plan: Plan, result: FitResult, num: dict[str, Any]) -> Row:
    """One workload's cells; ``Row.met``: its three targets met."""
    cells = {"model": model_label(plan.work.label, plan.work.num_params),
             "fit": f"{plan.train_size} samples, batch {plan.batch_size}, {plan.epochs} epochs",
             "gradient (subsample)": fmt_time(num["gradient"])}  # fmt: skip
    cells.update({name: fmt_ratio(num[name], 1) for name in PARTS})
    total = f"{fmt_ratio(num['total'], 1)} ({fmt_time(num['seconds'])})" + (" †" if result.skipped else "")
    fit = f"{fmt_ratio(num['fit'])} ({fmt_time(result.with_callback)} / {fmt_time(result.without)})"
    cells[PRODUCTS_COLUMN] = " / ".join(num[f"{name} products"] for name in COUNTED)
    cells.update({"total (warm)": total, "first (cold)": fmt_ratio(num["cold"], 1), "fit with / without": fit,
                  "epoch": fmt_time(num["epoch"]),
                  "projected 50k-sample epoch": fmt_ratio(num["projected"], 3)})  # fmt: skip
    met = all(met for *_, met in _targets(plan.work.label, num))
    return Row(cells, num["total"], f"≤ {TARGET_TOTAL:g}", met)


def _targets(label: str, num: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """The section's three targets for one workload."""
    return [
        ("in `Trainer.fit`: one warm measurement / subsample gradient", label, fmt_ratio(num["total"], 1),
         f"≤ {TARGET_TOTAL:g}", num["total"] <= TARGET_TOTAL),
        ("in `Trainer.fit`: projected fit time with / without, 50k-sample epoch", label,
         fmt_ratio(num["projected"], 3), f"≤ {TARGET_PROJECTED:.2f}", num["projected"] <= TARGET_PROJECTED),
        ("in `Trainer.fit`: PACGen / subsample gradient", label, fmt_ratio(num["pacgen"], 1), f"≤ {TARGET_PACGEN:g}",
         num["pacgen"] <= TARGET_PACGEN),
    ]  # fmt: skip


def _notes(cfg: Config, repeats: int) -> list[str]:
    from lightning_flatness import FlatnessCallback

    given = _callback_options(cfg)
    options = FlatnessCallback(**given).config  # what the callback runs with, defaults included
    return [
        "Each workload is fitted twice from the same initial weights, on the same synthetic data and shuffles (SGD, "
        "momentum 0.9, lr 0.05, a validation set a quarter as large), after a 3-step warm-up fit: without the "
        f"callback and with `FlatnessCallback({', '.join(f'{k}={v}' for k, v in given.items())})` (every epoch, "
        f"{options['num_samples']} samples in mini-batches of {options['batch_size']}, the four default metrics, the "
        f"gap on {options['gap_num_samples']} train and {options['gap_num_samples']} validation samples). gradient = "
        f"one plain gradient over {options['num_samples']} samples in the measurement's mini-batches (eval mode), the "
        f"middle of {repeats} timed inside the fit right after each measurement. Part columns = that part of the "
        "measurement (each metric's `compute` and the gap's `GapMeter.update` on both splits, clocked where the "
        "callback calls them; `other` = the rest of the logged seconds: `measurement_mode`, torchmetrics) / that "
        "gradient; total = the logged `flatness/seconds` / that gradient: the median over the warm measurements "
        "(all but the first; the eigenvalue starts from the previous epoch's vectors). first (cold) = the first "
        "measurement's total. HVPs = the Hessian-vector products (full passes over the subsample's mini-batches) "
        "of the warm measurements, range: the eigenvalue's Lanczos iterations from the previous epoch's vector, and "
        "PACGen's (6: ρ's draws, the diagonal to first order; 10-22: with 4-16 Hutchinson probes of the diagonal).",
        "fit with / without = wall time of `Trainer.fit` with the callback (the gradient timings taken off) / "
        "without. epoch = the middle training epoch without the callback (its validation included). projected = 1 + "
        f"warm measurement seconds / (epoch × {PROJECTED_EPOCH} / training samples): the fit time with / without on "
        f"a {PROJECTED_EPOCH // 1000}k-sample epoch at the same batch size, where the measurement keeps its size. The "
        "MLP is the batch-size sweep's 40-256-256-10 at mnist1d's 4000 samples (synthetic 40-dimensional inputs); the "
        "CNN is 3×3 convolutions (no bias) each followed by BatchNorm, ReLU and 2×2 max-pooling, then one linear "
        "layer; the transformer is section 2's. The linear-teacher MLP is the same 40-256-256-10 on a user's task: "
        "x ~ N(0, I₄₀), label = argmax of a fixed random linear map W x plus Gaussian noise of 0.5 × the logits' std, "
        "fitted for 6 epochs. The ResNet is a 3×3 stem convolution of stride 2 (no bias) + BatchNorm + ReLU, then "
        "one residual block per stage (conv-BN-ReLU-conv-BN plus the identity, or a strided 1×1 convolution + "
        "BatchNorm where the shape changes, ReLU after the sum; every stage after the first halves the side again), "
        "global average pooling and one linear layer, on the CNN's kind of 3×32×32 images.",
    ]


def run(cfg: Config) -> Section:
    repeats = 1 if cfg.quick else 3
    section = Section(
        "fit", "6. callback in Trainer.fit: one default measurement in gradients, fit time with / without",
        ["model", "fit", "gradient (subsample)", *PARTS, PRODUCTS_COLUMN, "total (warm)", "first (cold)",
         "fit with / without", "epoch", "projected 50k-sample epoch"],
    )  # fmt: skip
    section.notes.extend(_notes(cfg, repeats))
    for plan in _plans(cfg):
        try:
            result = _fits(plan, cfg, repeats)
        except Exception as exc:
            section.rows.append(Row({"model": plan.work.label, "fit": f"error: {error_text(exc)}"}))
            continue
        num = _summary(plan, result)
        section.rows.append(_row(plan, result, num))
        section.targets.extend(_targets(plan.work.label, num))
        if result.skipped:
            section.notes.append(f"† {plan.work.label}: a metric failed in `Trainer.fit` and was skipped, so the "
                                 f"measurement omits it: {'; '.join(result.skipped)}")  # fmt: skip
    return section
