"""Timing, result rows and small helpers shared by the benchmark sections."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F


@dataclass
class Config:
    device: torch.device
    quick: bool
    models: tuple[str, ...] | None
    seed: int = 0
    repeats: int = 7
    threads: int | None = None
    eigsh_warm: bool = False


@dataclass
class Row:
    """One line of a results table; ``met`` is ``None`` for rows without a target."""

    cells: dict[str, str]
    ratio: float | None = None
    target: str = ""
    met: bool | None = None


@dataclass
class Section:
    key: str
    title: str
    columns: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Summary lines: (what, model, measured ratio, target, met)
    targets: list[tuple[str, str, str, str, bool | None]] = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_gradient(model: torch.nn.Module, batches: list[Any]) -> Callable[[], None]:
    """One plain-autograd gradient of the mean cross-entropy over ``batches``, chunk by chunk:
    the denominator of every "/ gradient" ratio."""
    n = sum(len(y) for _, y in batches)

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            (F.cross_entropy(model(x), y, reduction="sum") / n).backward()

    return gradient


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of every function, run in turn ``rounds`` times after ``warmup`` rounds.

    Interleaving makes each round's ratios robust to load that changes during the run (other
    processes on a shared machine, CPU frequency): compare functions within a round.
    """
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device)[0])
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return statistics.median(a / b for a, b in zip(num, den))


def middle(values: list[float]) -> float:
    """The middle value (the upper one of an even count): the time reported for interleaved rounds."""
    return sorted(values)[len(values) // 2]


def fmt_time(seconds: float) -> str:
    if seconds != seconds:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(r: float | None, digits: int = 2) -> str:
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return "n/a"
    if math.isinf(r):
        return "∞"
    return f"{r:.{digits}f}×"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def model_label(label: str, num_params: int) -> str:
    """A model's name with its parameter count, as in the tables' model column."""
    return f"{label} ({fmt_params(num_params)})"


def met_str(met: bool | None) -> str:
    return {True: "✅ met", False: "❌ missed", None: "—"}[met]


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Force the math kernel of ``scaled_dot_product_attention``.

    The fused kernels (flash / memory-efficient, CPU and CUDA) have no double backward and no
    vmap batching rule, so Hessian-vector products through ``nn.MultiheadAttention`` fail and
    per-sample gradients fall back to a slow per-sample loop without this.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def attention_for(model_name: str) -> ContextManager[None]:
    """:func:`math_attention` for the transformer, nothing for the models without attention."""
    return math_attention() if model_name == "transformer" else contextlib.nullcontext()


def error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 140 else text[:137] + "..."
