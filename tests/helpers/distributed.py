"""Two gloo processes on this machine, each measuring a shard with its sums reduced across both (no tests here)."""

from __future__ import annotations

import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_flatness.functional.objective import CrossProcess, cross_process_reduction


def _all_reduced(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _worker(rank: int, world: int, port: int, queue: Any, measure: Callable[[int], tuple]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        with cross_process_reduction(CrossProcess(sum=_all_reduced)):
            queue.put((rank, measure(rank)))
    finally:
        dist.destroy_process_group()


def in_two_processes(measure: Callable[[int], tuple]) -> list[tuple]:
    """``measure(rank)`` in each of 2 spawned gloo processes, inside :func:`cross_process_reduction` (the
    estimators' data passes summed over both); the results by rank. ``measure`` must be a module-level
    function (it is pickled)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue, measure)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return [result for _, result in results]
