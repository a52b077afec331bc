"""Section 1: the cost of one Hessian-vector product relative to one gradient."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lightning_flatness.functional import measurement_mode
from lightning_flatness.functional import Objective
from lightning_flatness.functional import lanczos
from lightning_flatness.functional import unflatten
from lightning_flatness.functional.hessian_eigenvalues import ChunkRayleighQuotients

from . import _proto
from ._common import (
    Config, Row, Section, error_text, fmt_params, fmt_ratio, fmt_time, interleaved, math_attention, median_ratio, met_str, middle,
    plain_gradient,
)  # fmt: skip
from .models import Workload, workloads

TARGET = 2.5
BLOCK = 8
LANCZOS_ITERATIONS = (5, 20, 100)
LANCZOS_TARGET = 2.0
LANCZOS_BATCH = 256
LANCZOS_K = 10  # the top Ritz value can converge exactly (to float64) in fewer iterations
LANCZOS_COLUMN = "Lanczos product, kept graph / gradient at 5 / 20 / 100 iterations"
LANCZOS_OBSERVED = "the same, with the standard-error observer"


def _raw_hvp(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor]) -> None:
    """The bare double backward on the module: the floor under ``Objective.hvp``'s bookkeeping."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    torch.autograd.grad(g, params, grad_outputs=v)


def _note() -> str:
    return (
        "gradient = `F.cross_entropy(model(x), y).backward()` on the module in eval mode (plain autograd), the "
        "denominator of every ratio; HVP = `Objective.hvp`, one product on its own (a forward, a backward with "
        "`create_graph=True`, a second backward); kept graph = a product of `Objective.hessian_operator(cache_chunks=1)`, which "
        "`hessian_eigenvalues` uses: the forward and first backward are built once and kept, so each Lanczos "
        "product is one second backward (here on a single chunk; by default, `cache_chunks=\"auto\"`, the graphs of as many leading chunks as fit in a memory budget are kept); "
        f"block = `Objective.hvps` with {BLOCK} vectors sharing the first two passes (Hutchinson probes, PACGen's "
        "diagonal); raw double backward = the same passes on the bare module (`torch.autograd.grad` twice, no "
        "bookkeeping), the floor under `Objective.hvp`. Eval-mode BatchNorm runs as an explicit affine map inside "
        "every HVP (`_affine_batch_norm.py`): its double backward is two products, which is why the "
        f"CNN's HVP costs less than the bare module's (3.53× before it). proto batched block = the {BLOCK} second backward passes as one `is_grads_batched=True` pass "
        "(`benchmarks/_proto.py`), timed on CUDA only: on 2 CPU threads it measured 2.2-3.8× a gradient per vector, no "
        "better than the sequential block. Forward-over-reverse (`jvp(grad(L))`, curvlinops' way, "
        "`_proto.hvp_forward_over_reverse`) measured 2.8-3.8× (CPU) and 4.5-5.9× (CUDA): no candidate."
    )


def _note_default_attention(objective: Objective, v: torch.Tensor, label: str, notes: list[str]) -> None:
    """Note when ``Objective.hvp`` fails with the default (fused) attention kernel."""
    try:
        objective.hvp(v)
    except RuntimeError as exc:
        notes.append(
            f"{label}: `Objective.hvp` fails with the default attention kernel ({error_text(exc)}); "
            "every HVP on this model runs under `sdpa_kernel(SDPBackend.MATH)` (see `_common.math_attention`)."
        )


def _timers(
    model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], objective: Objective, v: torch.Tensor,
    block: torch.Tensor, cfg: Config,
) -> dict[str, Callable[[], object]]:
    """Every product strategy on one batch, and the two gradients they are compared with."""
    x, y = batch
    kept = objective.hessian_operator(1)
    v_list = [t.detach() for t in unflatten(v, objective.shapes)]
    fns: dict[str, Callable[[], object]] = {
        "plain": plain_gradient(model, [(x, y)]),
        "grad": objective.gradient,
        "hvp": lambda: objective.hvp(v),
        "kept": lambda: kept @ v,
        "block": lambda: objective.hvps(block),
        "raw": lambda: _raw_hvp(model, x, y, v_list),
    }
    if cfg.device.type == "cuda" or cfg.quick:  # on CPU it was slower than the sequential block
        fns["batched"] = lambda: _proto.hvps_batched(objective, block)
    return fns


def _drop_failing(fns: dict[str, Callable[[], object]], label: str, notes: list[str]) -> None:
    """Run each function once; drop (and note) those that fail."""
    for name, fn in list(fns.items()):
        try:
            fn()
        except Exception as exc:  # a strategy that does not support the model
            notes.append(f"{label}: {name} failed ({error_text(exc)}).")
            del fns[name]


def _times(work: Workload, cfg: Config, batch_size: int, notes: list[str]) -> dict[str, list[float]]:
    """Wall times of every strategy on one batch, interleaved over ``cfg.repeats`` rounds."""
    model = work.model
    (x, y), = work.batches(batch_size, batch_size, cfg.seed, cfg.device)
    with measurement_mode(model):
        objective = Objective(model, [(x, y)])
        gen = torch.Generator().manual_seed(cfg.seed)
        v = torch.randn(objective.num_params, generator=gen).to(objective.w0)
        block = torch.randn(BLOCK, objective.num_params, generator=gen).to(objective.w0)
        if work.name == "transformer":
            _note_default_attention(objective, v, work.label, notes)
        with math_attention():
            fns = _timers(model, (x, y), objective, v, block, cfg)
            _drop_failing(fns, work.label, notes)
            return interleaved(fns, cfg.repeats, cfg.device)


def _record(section: Section, work: Workload, times: dict[str, list[float]]) -> None:
    """One model's row, and its targets for one product and for a Lanczos product (kept graph)."""

    def r(name: str, per: int = 1) -> float | None:
        return median_ratio(times[name], times["plain"]) / per if name in times else None

    ratio, kept_ratio = r("hvp"), r("kept")
    assert ratio is not None
    met = ratio <= TARGET
    kept_met = kept_ratio is not None and kept_ratio <= TARGET
    cells = {
        "model": work.label,
        "params": fmt_params(work.num_params),
        "gradient": fmt_time(middle(times["plain"])),
        "HVP": fmt_time(middle(times["hvp"])),
        "HVP / gradient": fmt_ratio(ratio),
        "target": f"≤ {TARGET}",
        "met (one product / kept graph)": " / ".join(met_str(m) for m in (met, kept_met)),
        "HVP, kept graph / gradient": fmt_ratio(kept_ratio),
        f"block of {BLOCK} HVPs / gradient, per vector": fmt_ratio(r("block", BLOCK)),
        "raw double backward / gradient": fmt_ratio(r("raw")),
        "Objective.gradient / gradient": fmt_ratio(r("grad")),
        f"proto batched block of {BLOCK}": fmt_ratio(r("batched", BLOCK)),
    }
    section.rows.append(Row(cells, ratio, f"≤ {TARGET}", met))
    section.targets.append(("HVP / gradient, one product", work.label, fmt_ratio(ratio), f"≤ {TARGET}", met))
    section.targets.append(
        ("HVP / gradient, Lanczos product (kept graph)", work.label, fmt_ratio(kept_ratio), f"≤ {TARGET}", kept_met)
    )


def _lanczos_timers(work: Workload, cfg: Config) -> dict[str, Callable[[], object]]:
    """The gradient, one bare product, and Lanczos runs of exactly 5, 20 and 100 products, alone and observed.

    Kept graphs, built once outside the timing. ``"observed m"``: with the standard-error
    observer, a fresh one per run, as ``hessian_eigenvalues`` runs Lanczos. ``tol`` is tiny, so
    every run makes its ``max_iter`` products.
    """
    (x, y), = work.batches(LANCZOS_BATCH, LANCZOS_BATCH, cfg.seed, cfg.device)
    operator = Objective(work.model, [(x, y)]).hessian_operator(1)
    start = torch.randn(operator.num_params, generator=torch.Generator().manual_seed(cfg.seed))
    start = start.to(device=operator.device, dtype=operator.dtype)

    def run(iterations: int, observed: bool) -> Callable[[], object]:
        def lanczos_run() -> None:
            operator.chunk_observer = ChunkRayleighQuotients() if observed else None
            k = min(LANCZOS_K, iterations)
            out = lanczos(operator, start, k=k, tol=1e-300, max_iter=iterations, generator=cfg.seed)
            if out.n_products != iterations:
                raise RuntimeError(f"Lanczos stopped after {out.n_products} of {iterations} products.")

        return lanczos_run

    def bare() -> None:  # several, so that one slow first touch of memory freed by a long run does not dominate
        operator.chunk_observer = None
        for _ in range(LANCZOS_ITERATIONS[0]):
            operator @ start

    fns: dict[str, Callable[[], object]] = {"plain": plain_gradient(work.model, [(x, y)]), "kept": bare}
    for m in LANCZOS_ITERATIONS:
        fns[f"alone {m}"], fns[f"observed {m}"] = run(m, False), run(m, True)
    return fns


def _lanczos_row(section: Section, work: Workload, cfg: Config) -> None:
    """The cost of one Lanczos product (kept graph) at 5, 20 and 100 iterations, in gradients."""
    with measurement_mode(work.model):
        fns = _lanczos_timers(work, cfg)
        fns["plain"](), fns[f"observed {LANCZOS_ITERATIONS[0]}"]()  # warm-up, without a round of the long runs
        times = interleaved(fns, min(cfg.repeats, 3), cfg.device, warmup=0)

    def ratios(kind: str) -> list[float]:
        return [median_ratio([t / m for t in times[f"{kind} {m}"]], times["plain"]) for m in LANCZOS_ITERATIONS]

    alone = ratios("alone")
    met = alone[-1] <= LANCZOS_TARGET
    label = f"{work.label}, batch {LANCZOS_BATCH}"
    cells = {
        "model": label,
        "params": fmt_params(work.num_params),
        "gradient": fmt_time(middle(times["plain"])),
        "HVP, kept graph / gradient": fmt_ratio(median_ratio(times["kept"], times["plain"]) / LANCZOS_ITERATIONS[0]),
        LANCZOS_COLUMN: " / ".join(fmt_ratio(r) for r in alone),
        LANCZOS_OBSERVED: " / ".join(fmt_ratio(r) for r in ratios("observed")),
        "target": f"≤ {LANCZOS_TARGET} at {LANCZOS_ITERATIONS[-1]}",
    }
    section.rows.append(Row(cells, alone[-1], f"≤ {LANCZOS_TARGET}", met))
    what = f"Lanczos product (kept graph) / gradient, {LANCZOS_ITERATIONS[-1]} iterations"
    section.targets.append((what, label, fmt_ratio(alone[-1]), f"≤ {LANCZOS_TARGET}", met))


def _lanczos_note() -> str:
    return (
        f"{LANCZOS_COLUMN} (the MLP's last row, batch {LANCZOS_BATCH}): the wall time of `lanczos` on "
        "`Objective.hessian_operator(cache_chunks=1)` divided by the products it made (tol tiny, so exactly that "
        "many), in gradients; the graphs are built once outside the timing. 'with the standard-error observer': "
        "the same with `ChunkRayleighQuotients` attached, as `hessian_eigenvalues` runs it. 'HVP, kept graph': one "
        "bare product on the same batch; the difference is Lanczos' own work per product (the three-term "
        "recurrence, the reorthogonalizations, the tridiagonal eigenproblem; the observer's projection)."
    )


def run(cfg: Config) -> Section:
    batch_size = 64 if cfg.quick else 128
    section = Section(
        "hvp",
        f"1. One Hessian-vector product / one gradient (batch {batch_size}, median over {cfg.repeats} interleaved rounds)",
        ["model", "params", "gradient", "HVP", "HVP / gradient", "HVP, kept graph / gradient", "target",
         "met (one product / kept graph)",
         f"block of {BLOCK} HVPs / gradient, per vector", "raw double backward / gradient", "Objective.gradient / gradient",
         f"proto batched block of {BLOCK}", LANCZOS_COLUMN, LANCZOS_OBSERVED],
    )  # fmt: skip
    section.notes.append(_note())
    for work in workloads("quick" if cfg.quick else "full", cfg.device, cfg.models, cfg.seed):
        _record(section, work, _times(work, cfg, batch_size, section.notes))
        if work.name == "mlp":
            _lanczos_row(section, work, cfg)
            section.notes.append(_lanczos_note())
    return section
