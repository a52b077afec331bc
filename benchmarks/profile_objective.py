"""``python -m benchmarks.profile_objective [--model mlp] [--device cpu]``: where the time of a gradient and an HVP goes.

Prints ``torch.profiler`` tables (self time per op) for a plain autograd gradient,
``Objective.gradient`` and ``Objective.hvp`` on one batch of the full-size benchmark model, so
the overhead of ``Objective`` over plain autograd can be attributed to operations.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lightning_flatness.functional import measurement_mode
from lightning_flatness.functional import Objective

from ._common import math_attention
from .models import workloads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn_bn", "transformer"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = workloads("full", device, (args.model,))[0]
    model = work.model
    (x, y), = work.batches(args.batch_size, args.batch_size, 0, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with measurement_mode(model), math_attention():
        objective = Objective(model, [(x, y)])
        v = torch.randn(objective.num_params, device=device)

        def plain() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        for name, fn in (("plain autograd gradient", plain), ("Objective.gradient", objective.gradient),
                         ("Objective.hvp", lambda: objective.hvp(v))):  # fmt: skip
            for _ in range(3):
                fn()
            with profile(activities=activities) as prof:
                for _ in range(args.repeats):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            print(f"\n=== {work.label}: {name} x{args.repeats} ===")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
