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


def run(cfg: Config) -> Section:
    batch_size = 64 if cfg.quick else 128
    section = Section(
        "hvp",
        f"1. One Hessian-vector product / one gradient (batch {batch_size}, median over {cfg.repeats} interleaved rounds)",
        ["model", "params", "gradient (plain autograd)", "gradient (Objective)", "HVP (Objective.hvp)",
         f"HVP in a block of {BLOCK} (per vector)", "HVP / gradient", "block HVP / gradient", "HVP / Objective.gradient",
         "target", "met"],
    )  # fmt: skip
    section.notes.append(
        "gradient (plain autograd) = `F.cross_entropy(model(x), y).backward()` on the module in eval mode, the "
        "denominator of every ratio; HVP = `Objective.hvp` (one forward, a backward with `create_graph=True`, a "
        "second backward); block = `Objective.hvps` with 8 vectors sharing the first two passes (Hutchinson probes, "
        "PACGen). ↳ rows: candidate fixes for `functional/` in `benchmarks/_proto.py`: `hvps` (leaner accumulation "
        "and finiteness check, same passes) in the HVP column, `hvps_batched` (the 8 second backward passes as one "
        "`is_grads_batched=True` pass) in the block column."
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

            def hvp() -> None:
                with math_attention():
                    objective.hvp(v)

            def hvp_block() -> None:
                with math_attention():
                    objective.hvps(block)

            def proto_hvp() -> None:
                with math_attention():
                    _proto.hvps(objective, v.unsqueeze(0))

            def proto_block() -> None:
                with math_attention():
                    _proto.hvps_batched(objective, block)

            fns = {"plain": plain_grad, "grad": objective.gradient, "hvp": hvp, "block": hvp_block, "proto": proto_hvp,
                   "proto_block": proto_block}  # fmt: skip
            times = interleaved(fns, cfg.repeats, cfg.device)
        med = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
        ratio = median_ratio(times["hvp"], times["plain"])
        block_ratio = median_ratio(times["block"], times["plain"]) / BLOCK
        proto_ratio = median_ratio(times["proto"], times["plain"])
        proto_block_ratio = median_ratio(times["proto_block"], times["plain"]) / BLOCK
        met = ratio <= TARGET
        section.rows.append(
            Row(
                {
                    "model": work.label,
                    "params": fmt_params(work.num_params),
                    "gradient (plain autograd)": fmt_time(med["plain"]),
                    "gradient (Objective)": fmt_time(med["grad"]),
                    "HVP (Objective.hvp)": fmt_time(med["hvp"]),
                    f"HVP in a block of {BLOCK} (per vector)": fmt_time(med["block"] / BLOCK),
                    "HVP / gradient": fmt_ratio(ratio),
                    "block HVP / gradient": fmt_ratio(block_ratio),
                    "HVP / Objective.gradient": fmt_ratio(median_ratio(times["hvp"], times["grad"])),
                    "target": f"≤ {TARGET}",
                    "met": "✅ met" if met else "❌ missed",
                },
                ratio,
                f"≤ {TARGET}",
                met,
            )
        )
        section.rows.append(
            Row(
                {
                    "model": "↳ prototypes: `_proto.hvps`, `_proto.hvps_batched`",
                    "HVP (Objective.hvp)": fmt_time(med["proto"]),
                    f"HVP in a block of {BLOCK} (per vector)": fmt_time(med["proto_block"] / BLOCK),
                    "HVP / gradient": fmt_ratio(proto_ratio),
                    "block HVP / gradient": fmt_ratio(proto_block_ratio),
                    "target": f"≤ {TARGET}",
                    "met": "✅ met" if proto_ratio <= TARGET else "❌ missed",
                },
            )
        )
        section.targets.append(("HVP / gradient", work.label, fmt_ratio(ratio), f"≤ {TARGET}", met))
    return section
