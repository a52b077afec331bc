"""How many mini-batches' gradient graphs a :class:`HessianOperator` keeps between products.

Keeping a chunk's forward pass and gradient graph makes every later product on it one second
backward pass (about 1.5–2× a gradient instead of 2.5–3×, ``benchmarks/``), for the graph's
memory. ``cache_chunks="auto"`` keeps the leading chunks while their graphs' measured size stays
within :func:`graph_budget`; the rest are rebuilt for every product, so peak memory stops
growing with the subsample once the budget is reached.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from torch import Tensor


CacheChunks = Union[int, str]
"""``"auto"`` (keep graphs within a memory budget) or the most chunks whose graphs are kept (``0``: none)."""

# On CPU the free memory says little (other processes, swap): a fixed cap.
CPU_BUDGET_BYTES = 1 << 30
# On CUDA, this fraction of the memory free when the operator is built: the products, Lanczos'
# basis and the training's own allocations after the measurement need the rest.
CUDA_BUDGET_FRACTION = 0.25


def graph_budget(device: torch.device) -> int:
    """Bytes of kept graphs ``cache_chunks="auto"`` allows: a quarter of the free memory of a CUDA
    device (when the operator is built), 1 GiB elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_BUDGET_FRACTION * free)
    return CPU_BUDGET_BYTES


def cache_limits(cache_chunks: CacheChunks, budget_bytes: int | None, device: torch.device) -> tuple[float, float]:
    """``(most chunks, most bytes)`` of graphs to keep for ``cache_chunks`` (and an explicit budget)."""
    if cache_chunks == "auto":
        return math.inf, float(graph_budget(device) if budget_bytes is None else budget_bytes)
    return float(cache_chunks), math.inf if budget_bytes is None else float(budget_bytes)


class SavedBytes:
    """Counts the memory a graph built inside it holds: the storages autograd saves for backward
    (each once, those in ``exclude`` not at all, e.g. the parameters, which live on anyway).

    The kept gradient graph also holds the gradients it outputs; :meth:`add` counts those. On an
    MLP and a CNN with batch norm this counts 93–95 % of what the allocator's own count (glibc's
    ``mallinfo2``) grows by (``tests/functional/test_graph_cache.py``).
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = set(exclude)
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: Tensor) -> Tensor:
        self.add(tensor)
        return tensor

    def add(self, *tensors: Tensor) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self.exclude:
                self.exclude.add(storage.data_ptr())
                self.nbytes += storage.nbytes()

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _unpack(tensor: Tensor) -> Tensor:
    return tensor
