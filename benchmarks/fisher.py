"""Section 3: Fisher trace, ours (ghost norms, vmap or a loop per sample) vs a Python loop vs BackPACK, and the\ncost of each per-sample path."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional import fisher_trace, measurement_mode
from lightning_flatness.functional import Objective, per_sample_sq_norms

from ._common import (
    Config, Row, Section, attention_for, error_text, fmt_params, fmt_ratio, fmt_time, interleaved, median_ratio, met_str, middle,
    plain_gradient,
)  # fmt: skip
from .models import Workload, workloads

TARGET_LOOP = 10.0
TARGET_BACKPACK = 1.5


def loop_sq_norms(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """‖∇ℓ_i‖² one sample at a time: the naive Python loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(len(y), dtype=torch.float64, device=x.device)
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[i] = sum((g.double() ** 2).sum() for g in grads if g is not None)
    return out


class BackPACKFisher:
    """``BatchL2Grad`` on an extended copy of the model (eval mode, summed loss)."""

    def __init__(self, model: nn.Module) -> None:
        from backpack import extend

        self.model = extend(copy.deepcopy(model).eval())
        self.loss = extend(nn.CrossEntropyLoss(reduction="sum"))
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def sq_norms(self, x: Tensor, y: Tensor) -> Tensor:
        from backpack import backpack
        from backpack.extensions import BatchL2Grad

        self.model.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            self.loss(self.model(x), y).backward()
        missing = [i for i, p in enumerate(self.params) if not hasattr(p, "batch_l2")]
        if missing:
            raise NotImplementedError(f"BackPACK computed no batch_l2 for {len(missing)} of {len(self.params)} parameters")
        out = sum(p.batch_l2.double() for p in self.params)
        for p in self.params:
            del p.batch_l2
        return out


def _max_rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()


def _note() -> str:
    return (
        "ours = `fisher_trace(model, [(x, y)])` (per-sample squared gradient norms: ghost norms for every linear, "
        "conv2d, layer norm, eval batch norm, embedding and broadcast-add use of a parameter, plain self-attention "
        "included; `vmap(grad)` for anything else, here nothing); gradient = one plain batched "
        "`F.cross_entropy(model(x), y).backward()`: no per-sample method can cost less, so loop / gradient bounds "
        "loop / ours; loop = one forward and backward per sample; BackPACK = `BatchL2Grad` on an `extend`ed copy with `CrossEntropyLoss(reduction='sum')`. "
        f"Targets: loop / ours ≥ {TARGET_LOOP:g}, ours / BackPACK ≤ {TARGET_BACKPACK:g}. Max rel. diff compares the "
        "per-sample squared gradient norms with the loop's, sample by sample."
    )


@dataclass
class _Measured:
    """One model's timings, and the per-sample squared norms of each implementation that ran."""

    times: dict[str, list[float]]
    norms: dict[str, Tensor]  # "ours", "loop", and "backpack" when BackPACK ran
    backpack_error: str | None


def _backpack(model: nn.Module) -> tuple[BackPACKFisher | None, str | None]:
    """BackPACK on a copy of ``model``, or the reason it cannot run."""
    try:
        return BackPACKFisher(model), None
    except Exception as exc:  # pragma: no cover - peer missing or model unsupported
        return None, error_text(exc)


def _measure(work: Workload, cfg: Config, batch_size: int, rounds: int) -> _Measured:
    """The three implementations' norms once (to compare), then their times with a plain gradient's."""
    model = work.model
    (x, y), = work.batches(batch_size, batch_size, cfg.seed, cfg.device)
    backpack_impl, backpack_error = _backpack(model)
    with measurement_mode(model), attention_for(work.name):
        objective = Objective(model, [(x, y)])
        norms = {"ours": per_sample_sq_norms(objective, (x, y)), "loop": loop_sq_norms(model, x, y)}
        if backpack_impl is not None:
            try:
                norms["backpack"] = backpack_impl.sq_norms(x, y)
            except Exception as exc:
                backpack_impl, backpack_error = None, error_text(exc)
        fns = {
            "gradient": plain_gradient(model, [(x, y)]),
            "ours": lambda: fisher_trace(model, [(x, y)]),
            "loop": lambda: loop_sq_norms(model, x, y),
        }
        if backpack_impl is not None:
            impl = backpack_impl
            fns["backpack"] = lambda: impl.sq_norms(x, y)
        return _Measured(interleaved(fns, rounds, cfg.device), norms, backpack_error)


def _backpack_cells(section: Section, label: str, m: _Measured) -> tuple[dict[str, str], bool | None]:
    """BackPACK's columns and whether its target is met (``None``: it did not run, noted)."""
    if "backpack" not in m.times:
        section.notes.append(f"{label}: BackPACK does not support this model ({m.backpack_error}).")
        return {"BackPACK BatchL2Grad": "unsupported", "ours / BackPACK": "n/a"}, None
    bp_ratio = median_ratio(m.times["ours"], m.times["backpack"])
    met_bp = bp_ratio <= TARGET_BACKPACK
    section.targets.append(("Fisher: ours time / BackPACK", label, fmt_ratio(bp_ratio), f"≤ {TARGET_BACKPACK:g}", met_bp))
    return {"BackPACK BatchL2Grad": fmt_time(middle(m.times["backpack"])), "ours / BackPACK": fmt_ratio(bp_ratio)}, met_bp


def _record(section: Section, work: Workload, m: _Measured) -> None:
    """One model's row, and its targets against the loop and BackPACK."""
    times = m.times
    loop_ratio = median_ratio(times["loop"], times["ours"])
    met_loop = loop_ratio >= TARGET_LOOP
    section.targets.append(("Fisher: loop time / ours", work.label, fmt_ratio(loop_ratio, 1), f"≥ {TARGET_LOOP:g}", met_loop))
    cells, met_bp = _backpack_cells(section, work.label, m)
    mets = [met_loop] if met_bp is None else [met_loop, met_bp]
    diffs = [f"{_max_rel(m.norms[name], m.norms['loop']):.1e}" for name in ("ours", "backpack") if name in m.norms]
    cells.update({
        "model": work.label,
        "params": fmt_params(work.num_params),
        "gradient": fmt_time(middle(times["gradient"])),
        "ours (fisher_trace)": fmt_time(middle(times["ours"])),
        "per-sample loop": fmt_time(middle(times["loop"])),
        "loop / ours": fmt_ratio(loop_ratio, 1),
        "loop / gradient (bound)": fmt_ratio(median_ratio(times["loop"], times["gradient"]), 1),
        "max rel. diff (ours, BackPACK vs loop)": ", ".join(diffs),
        "targets": f"≥ {TARGET_LOOP:g}, ≤ {TARGET_BACKPACK:g}",
        "met": met_str(all(mets)),
    })  # fmt: skip
    section.rows.append(Row(cells, loop_ratio, "", all(mets)))


class RecurrentClassifier(nn.Module):
    """A GRU over ``steps`` steps of ``features``, then a linear head: no ``vmap`` rule, so the per-sample loop."""

    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(features, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _path_costs(cfg: Config, batch_size: int, rounds: int) -> str:
    """A note: what each per-sample path costs, in plain gradients, beside the naive loop (``fisher_trace``'s
    ``per_sample``: ghost norms where they run, ``vmap`` or the loop for the rest)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    models = {
        "MLP 40-256-256-10": (nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                            nn.Linear(256, 10)), torch.randn(batch_size, 40, generator=gen)),
        "GRU(16, 64), 20 steps, linear head": (RecurrentClassifier(), torch.randn(batch_size, 20, 16, generator=gen)),
    }  # fmt: skip
    parts = []
    for label, (model, x) in models.items():
        model.to(cfg.device)
        x, y = x.to(cfg.device), torch.randint(0, 10, (batch_size,), generator=gen).to(cfg.device)
        batch = [(x, y)]
        with measurement_mode(model):
            path = fisher_trace(model, batch).per_sample_path
            times = interleaved({
                "gradient": plain_gradient(model, batch),
                "auto": lambda: fisher_trace(model, batch),
                "forced loop": lambda: fisher_trace(model, batch, per_sample="loop"),
                "naive loop": lambda: loop_sq_norms(model, x, y),
            }, rounds, cfg.device)  # fmt: skip
        ratio = {k: median_ratio(v, times["gradient"]) for k, v in times.items()}
        parts.append(f"{label} (gradient {fmt_time(middle(times['gradient']))}): auto = {path} "
                     f"{ratio['auto']:.1f}×, the loop for every non-ghost parameter {ratio['forced loop']:.1f}×, the naive "
                     f"loop {ratio['naive loop']:.1f}×")  # fmt: skip
    return (f"Per-sample paths at batch {batch_size}, in plain gradients of the same batch: " + "; ".join(parts)
            + ". (`vmap` fails on the GRU; on the MLP ghost norms cover every parameter, so the forced loop has "
            "nothing left to loop over and equals auto.)")


def run(cfg: Config) -> Section:
    batch_size = 32 if cfg.quick else 128
    rounds = 2 if cfg.quick else 3
    section = Section(
        "fisher",
        f"3. Empirical Fisher trace at batch {batch_size} (median over {rounds} interleaved rounds)",
        ["model", "params", "gradient", "ours (fisher_trace)", "per-sample loop", "BackPACK BatchL2Grad", "loop / ours",
         "loop / gradient (bound)", "ours / BackPACK", "max rel. diff (ours, BackPACK vs loop)", "targets", "met"],
    )  # fmt: skip
    section.notes.append(_note())
    for work in workloads("quick" if cfg.quick else "full", cfg.device, cfg.models, cfg.seed):
        _record(section, work, _measure(work, cfg, batch_size, rounds))
    section.notes.append(_path_costs(cfg, 16 if cfg.quick else 64, rounds))
    return section
