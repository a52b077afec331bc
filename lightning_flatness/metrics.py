"""What the callback measures: the flatness estimators and the train/test gap, as torchmetrics.

Every value is held in a torchmetrics ``Metric`` (``FlatnessCallback.metrics``, a
``MetricCollection``) so that it reduces across processes. Under DDP the estimators' data
passes are summed over ranks (``_distributed.cross_process``), so every rank computes the
value of the whole subsample and enters it in its ``MeanMetric`` (the Fisher trace, a
per-sample mean, weighted by the rank's sample count, which is also right for a per-shard
value); the gap uses ``MeanMetric`` over per-sample losses and ``MulticlassAccuracy``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .functional import fisher_trace, grad_cosine_regret, hessian_eigenvalues, local_entropy, measurement_mode, pacgen
from .functional._losses import LossArg
from .functional._objective import Objective

FLATNESS_METRICS = ("hessian_top_eig", "grad_cosine_regret", "fisher_trace", "pacgen")
# Measured only when asked for: far more expensive than the defaults.
OPTIONAL_METRICS = ("local_entropy",)
KNOWN_METRICS = FLATNESS_METRICS + OPTIONAL_METRICS
GAP_KEYS = ("gap/train_loss", "gap/test_loss", "gap/loss", "gap/train_acc", "gap/test_acc", "gap/acc")


@dataclass
class EstimatorOptions:
    loss_fn: LossArg = "cross_entropy"
    k: int = 1
    tol: float = 1e-4
    max_iter: int = 100
    cache_chunks: int = 1
    kind: str = "empirical"
    gamma: float = 0.1
    eps: float = 0.1
    rho: float | None = None
    num_probes: int = 16
    pacgen_screen: bool = True
    entropy_gamma: float = 100.0
    entropy_noise: float = 0.03
    entropy_steps: int = 100
    entropy_step_size: float = 0.002


def metric_keys(name: str, k: int) -> list[str]:
    """Logged keys of one flatness metric."""
    if name == "hessian_top_eig":  # hessian_eig_j: the j-th largest, j = 1..k, only when k > 1
        return ["flatness/hessian_top_eig"] + ([f"flatness/hessian_eig_{j}" for j in range(1, k + 1)] if k > 1 else [])
    if name == "grad_cosine_regret":
        return ["flatness/grad_cosine_regret", "flatness/grad_cosine"]
    return [f"flatness/{name}"]


def build_collection(metrics: Sequence[str], k: int, gap: bool) -> MetricCollection:
    keys = [key for name in metrics for key in metric_keys(name, k)]
    if gap:
        keys += ["gap/train_loss", "gap/test_loss"]
    keys.append("flatness/seconds")
    # nan_strategy="error": a non-finite loss fails the gap (warned once and skipped), not silently dropped.
    return MetricCollection({key: MeanMetric(nan_strategy="error") for key in keys}, compute_groups=False)


# PACGen's diagonal screen uses twice the measured top eigenvalue as the bound on every H_ii:
# Lanczos approaches λ_max from below, and a converged Ritz value under half of it would mean
# the start vector all but missed the top eigenvector.
SCREEN_MARGIN = 2.0


def measurement_seed(seed: int, step: int, name: str) -> int:
    """A seed for one metric at one measurement, a pure function of (seed, step, name)."""
    return (seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())) % (2**63 - 1)


def run_estimator(
    name: str,
    model: nn.Module,
    batches: list[Any],
    opts: EstimatorOptions,
    *,
    seed: int,
    init: Tensor | None,
    local_count: int,
    shared: dict[str, float] | None = None,
) -> tuple[dict[str, tuple[float, float]], Tensor | None]:
    """One flatness metric: ``({key: (value, weight)}, new eigenvectors or None)``.

    ``local_count`` is the number of samples in ``batches`` (this rank's shard); it weights
    per-sample means (the Fisher trace) so that the cross-process mean is the global one.
    ``shared`` carries results between the metrics of one measurement: a converged top
    eigenvalue becomes PACGen's bound on the Hessian's diagonal (``hessian_max``).
    """
    shared = {} if shared is None else shared
    if name == "hessian_top_eig":
        res = hessian_eigenvalues(
            model, batches, opts.loss_fn, k=opts.k, tol=opts.tol, max_iter=opts.max_iter, init=init, generator=seed,
            cache_chunks=opts.cache_chunks,
        )
        values = res.values.tolist()
        if res.converged:
            shared["hessian_max"] = SCREEN_MARGIN * max(values[0], 0.0)
        out = {"flatness/hessian_top_eig": (values[0], 1.0)}
        if len(values) > 1:
            out.update({f"flatness/hessian_eig_{j + 1}": (v, 1.0) for j, v in enumerate(values)})
        return out, res.vectors.detach()
    if name == "grad_cosine_regret":
        reg = grad_cosine_regret(model, batches, opts.loss_fn)
        return {"flatness/grad_cosine_regret": (reg.regret, 1.0), "flatness/grad_cosine": (reg.cosine, 1.0)}, None
    if name == "fisher_trace":
        fis = fisher_trace(model, batches, opts.loss_fn, kind=opts.kind, generator=seed)
        return {"flatness/fisher_trace": (fis.value, float(local_count))}, None
    if name == "pacgen":
        pac = pacgen(
            model, batches, opts.loss_fn, gamma=opts.gamma, eps=opts.eps, rho=opts.rho,
            num_probes=opts.num_probes, generator=seed,
            hessian_max=shared.get("hessian_max") if opts.pacgen_screen else None,
        )  # fmt: skip
        return {"flatness/pacgen": (pac.value, 1.0)}, None
    if name == "local_entropy":
        # One SGLD chain over the whole shard: cycling mini-batches at a small temperature
        # adds mini-batch noise that overheats the chain.
        whole = [_concatenate(batches)]
        ent = local_entropy(
            model, whole, opts.loss_fn, gamma=opts.entropy_gamma, num_steps=opts.entropy_steps,
            step_size=opts.entropy_step_size, noise=opts.entropy_noise, generator=seed,
        )  # fmt: skip
        return {"flatness/local_entropy": (ent.value, 1.0)}, None
    raise ValueError(f"unknown metric {name!r}; accepted: {KNOWN_METRICS}")


def _concatenate(batches: list[Any]) -> Any:
    """The mini-batches as one batch (tensors concatenated along the sample axis)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise ValueError("local_entropy needs every mini-batch to have the same structure.")
    leaves = [torch.cat(parts) if isinstance(parts[0], Tensor) else parts[0] for parts in zip(*(f for f, _ in flat))]
    return tree_unflatten(leaves, spec)


class GapMeter:
    """Eval-mode mean loss and accuracy on fixed subsamples, with torchmetrics states.

    Accuracy is measured when a batch is ``(x, y)`` with integer labels ``y`` of shape ``(B,)``
    and the model returns logits of shape ``(B, C)``; ``MulticlassAccuracy(C, average="micro")``
    is created on first use (when ``C`` is known) and added to the collection.
    """

    def __init__(self, collection: MetricCollection, loss_fn: LossArg) -> None:
        self.collection = collection
        self.loss_fn = loss_fn

    def _accuracy(self, split: str, num_classes: int, device: torch.device) -> MulticlassAccuracy:
        key = f"gap/{split}_acc"
        if key not in self.collection:
            self.collection.add_metrics({key: MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)})
        return self.collection[key]  # type: ignore[return-value]

    @torch.no_grad()
    def update(self, split: str, model: nn.Module, batches: list[Any]) -> None:
        loss_metric = self.collection[f"gap/{split}_loss"]
        with measurement_mode(model):
            objective = Objective(model, batches, self.loss_fn)
            for batch in objective.iter_batches():
                losses, logits = objective.losses_and_logits(batch)
                if logits is not None:
                    self._accuracy(split, logits.shape[1], logits.device).update(logits, batch[1])
                loss_metric.update(losses.float())

    def has_accuracy(self, split: str) -> bool:
        return f"gap/{split}_acc" in self.collection


def finite(values: dict[str, tuple[float, float]]) -> bool:
    return all(v == v and abs(v) != float("inf") for v, _ in values.values())


Reducer = Callable[[Tensor], Tensor]
