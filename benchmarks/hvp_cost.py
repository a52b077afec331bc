"""Section 1: the cost of one Hessian-vector product relative to one gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_flatness.functional import measurement_mode
from lightning_flatness.functional._objective import Objective

from . import _proto
from ._common import Config, Row, Section, error_text, fmt_params, fmt_ratio, fmt_time, interleaved, math_attention, median_ratio
from .models import workloads

TARGET = 2.5
BLOCK = 8


def _lean(objective: Objective, v: torch.Tensor) -> torch.Tensor:
    with _proto.AffineBatchNorm():
        return _proto.hvps(objective, v.unsqueeze(0))


def run(cfg: Config) -> Section:
    batch_size = 64 if cfg.quick else 128
    section = Section(
        "hvp",
        f"1. One Hessian-vector product / one gradient (batch {batch_size}, median over {cfg.repeats} interleaved rounds)",
        ["model", "params", "gradient", "HVP", "HVP / gradient", "target", "met",
         f"block of {BLOCK} HVPs / gradient, per vector", "Objective.gradient / gradient",
         "proto lean + affine BN HVP", "proto cached graph", f"proto batched block of {BLOCK}"],
    )  # fmt: skip
    section.notes.append(
        "gradient = `F.cross_entropy(model(x), y).backward()` on the module in eval mode (plain autograd), the "
        "denominator of every ratio; HVP = `Objective.hvp` (a forward, a backward with `create_graph=True`, a second "
        f"backward); block = `Objective.hvps` with {BLOCK} vectors sharing the first two passes (Hutchinson probes, "
        "PACGen). `proto` columns (ratios to the same gradient) time candidate fixes in `benchmarks/_proto.py`: "
        "`hvps` under `AffineBatchNorm` (same passes, leaner accumulation and finiteness check, eval-mode "
        "BatchNorm as an explicit per-channel affine map whose double backward is two products), cached graph (the "
        "first backward's graph kept between products, so a product is one "
        f"second backward: PyHessian's single-batch trick), batched block (the {BLOCK} second backward passes as one "
        "`is_grads_batched=True` pass; timed on CUDA only: on 2 CPU threads it measured 2.2-3.8× a gradient per "
        "vector, no better than the sequential block). Forward-over-reverse (`jvp(grad(L))`, curvlinops' way, "
        "`_proto.hvp_forward_over_reverse`) measured 2.8-3.8× (CPU) and 4.5-5.9× (CUDA): no candidate."
    )
    for work in workloads("quick" if cfg.quick else "full", cfg.device, cfg.models, cfg.seed):
        model = work.model
        (x, y), = work.batches(batch_size, batch_size, cfg.seed, cfg.device)
        with measurement_mode(model):
            objective = Objective(model, [(x, y)])
            gen = torch.Generator().manual_seed(cfg.seed)
            v = torch.randn(objective.num_params, generator=gen).to(objective.w0)
            block = torch.randn(BLOCK, objective.num_params, generator=gen).to(objective.w0)

            def plain_grad() -> None:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()

            if work.name == "transformer":
                try:
                    objective.hvp(v)
                except RuntimeError as exc:
                    section.notes.append(
                        f"{work.label}: `Objective.hvp` fails with the default attention kernel ({error_text(exc)}); "
                        "every HVP on this model runs under `sdpa_kernel(SDPBackend.MATH)` (see `_common.math_attention`)."
                    )
            with math_attention():
                cached = _proto.CachedHVP(objective)
                fns = {
                    "plain": plain_grad,
                    "grad": objective.gradient,
                    "hvp": lambda: objective.hvp(v),
                    "block": lambda: objective.hvps(block),
                    "lean": lambda: _lean(objective, v),
                    "cached": lambda: cached(v),
                }
                if cfg.device.type == "cuda" or cfg.quick:  # on CPU it was slower than the sequential block
                    fns["batched"] = lambda: _proto.hvps_batched(objective, block)
                times: dict[str, list[float]] = {}
                for name, fn in list(fns.items()):
                    try:
                        fn()
                    except Exception as exc:  # a strategy that does not support the model
                        section.notes.append(f"{work.label}: {name} failed ({error_text(exc)}).")
                        del fns[name]
                times = interleaved(fns, cfg.repeats, cfg.device)
        med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}

        def r(name: str, per: int = 1) -> float | None:
            return median_ratio(times[name], times["plain"]) / per if name in times else None

        ratio = r("hvp")
        assert ratio is not None
        met = ratio <= TARGET
        section.rows.append(
            Row(
                {
                    "model": work.label,
                    "params": fmt_params(work.num_params),
                    "gradient": fmt_time(med["plain"]),
                    "HVP": fmt_time(med["hvp"]),
                    "HVP / gradient": fmt_ratio(ratio),
                    "target": f"≤ {TARGET}",
                    "met": "✅ met" if met else "❌ missed",
                    f"block of {BLOCK} HVPs / gradient, per vector": fmt_ratio(r("block", BLOCK)),
                    "Objective.gradient / gradient": fmt_ratio(r("grad")),
                    "proto lean + affine BN HVP": fmt_ratio(r("lean")),
                    "proto cached graph": fmt_ratio(r("cached")),
                    f"proto batched block of {BLOCK}": fmt_ratio(r("batched", BLOCK)),
                },
                ratio,
                f"≤ {TARGET}",
                met,
            )
        )
        section.targets.append(("HVP / gradient", work.label, fmt_ratio(ratio), f"≤ {TARGET}", met))
    return section
