"""Cross-rank reduction of the estimators' data passes, through Lightning's strategy API.

Under DDP every rank holds a shard of whole mini-batches of the measurement subsample. The
functional estimators accumulate sums over their batches (loss, gradient and Hessian-vector
product totals, the regret's running sums, and the sample counts, in ``Objective.reduce``).
Inside :func:`cross_process` these are summed over ranks
(hook ``lightning_flatness.functional.objective.CrossProcess``), so every rank sees the
objective of the whole subsample and the iterative solvers run identically on every rank.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor

from .functional.objective import CrossProcess, cross_process_reduction


def _sum(strategy: Any, tensor: Tensor) -> Tensor:
    return strategy.reduce(tensor.detach().clone(), reduce_op="sum")


@contextlib.contextmanager
def cross_process(strategy: Any | None) -> Iterator[None]:
    """Estimators called inside reduce their data passes over ranks (no-op for ``None``)."""
    if strategy is None:
        yield
        return
    hook = CrossProcess(sum=lambda t: _sum(strategy, t))
    with cross_process_reduction(hook):
        yield


@contextlib.contextmanager
def rank_zero_buffers(strategy: Any | None, module: torch.nn.Module) -> Iterator[None]:
    """Use rank 0's buffers (e.g. BatchNorm statistics, which drift apart per rank) while measuring.

    Each rank's own buffers are put back afterwards, so training is unaffected whatever the
    strategy's ``broadcast_buffers`` setting.
    """
    buffers = [b for b in module.buffers() if b.numel() > 0]
    if strategy is None or not buffers:
        yield
        return
    saved = [b.detach().clone() for b in buffers]
    source = strategy.broadcast([b.detach().cpu() for b in buffers], src=0)
    try:
        with torch.no_grad():
            for b, value in zip(buffers, source):
                b.copy_(value.to(b.device))
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, saved):
                b.copy_(value)
