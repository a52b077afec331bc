"""``python -m benchmarks.rho_options``: two ways to make PACGen's ρ estimate cheaper, measured against Ψ's se.

ρ̂ (:func:`lightning_flatness.functional.pacgen._rho_draws`) costs ``2 * rho_probes`` Hessian-vector
products as counted by ``n_hvp``: the ``K = 3`` products ``H(w) v_k`` (one shared pass) and one full
product ``H(w + δ_k) v_k`` per draw. Two options, each compared with the default on the same draws
(paired: the same generator seed, the same ``v_k`` and ``δ_k``):

* **A, fewer samples per perturbed pass**: draw ``k``'s difference ``H_S(w + δ_k) v_k − H_S(w) v_k`` is
  of the loss over a share ``S`` of the subsample's mini-batches, a fraction ``f``; ``H_S(w) v_k`` comes
  free from the full pass at ``w`` (its chunks' parts), which the first-order diagonal still uses whole.
  ``lead``: the same leading share for every draw; ``rot``: draw ``k`` takes the ``k``-th share in turn
  (disjoint while the shares last). Counted cost ``3 + 3f``.
* **B, draws reused across measurements**: each measurement makes one new draw (draw 0 of the default's)
  and keeps the two most recent ratios of the previous measurements, FIFO; the products ``H(w) v_k`` of the
  kept draws' vectors are taken again at the current weights (one shared pass of 3 vectors), so the
  first-order diagonal stays an unbiased estimate at ``w``; only the kept *ratios* are stale. Counted cost
  ``3 + 1``. The first measurement is the default's (3 new draws). At fixed weights B is the default (its
  draws are i.i.d. either way), so it is measured over consecutive measurements during training.

Everything else (ρ̂ = max of the ratios, the first-order diagonal or its Hutchinson fallback, the ``hessian_max``
screen, the standard error) is the library's own: each option's draws are handed to
:func:`~lightning_flatness.functional.pacgen` in place of ``_rho_draws``'s. Per workload: ``train_briefly``
(150 steps), a fixed subsample of 512 samples in mini-batches of 64 (the callback's defaults),
``normalization="sum"`` with ``num_train`` the training set of ``benchmarks/fit_cost.py``'s plan, ``hessian_max``
twice the top eigenvalue (as the callback's screen), then ``--epochs`` measurements with an epoch of SGD steps
between them, ``--seeds`` generator seeds each.

Columns: ``shift``: mean over seeds of Ψ_option − Ψ_default (± its standard error), in units of the default's
mean stated se and of the default's empirical SD over seeds; ``SD ratio``: option's SD / default's; ``se/SD``:
the option's mean stated se over its empirical SD (1 = the stated se matches the real spread); ``HVPs``:
products counted as ``n_hvp`` counts them for ρ, and the ρ step's wall time in full-HVP units.
Not a test, not a section of ``benchmarks/run.py``. 11-13 minutes on one thread with the other core busy
(the CNN's 20 seeds x 3 measurements are most of it).

Measured (20 seeds, 3 measurements, CPU): neither option stays within a tenth of Ψ's stated se. A moves Ψ up
on the teacher MLP by 1.0-1.5 se at f = 1/2 and 2.2-3.0 se at f = 1/4 (ρ̂ +13 % / +33 %: a difference over fewer
samples adds their Hessian-difference noise to its norm, which only increases it); on the CNN its shifts are
within ±0.13 se and within their own errors (±0.05-0.15 se), undecided against 0.1 but no use when the MLP fails.
B's stale ratios follow ρ's drift between epochs: +0.9 / +1.2 se on the MLP (ρ falling), +0.5 / −1.0 se on the
CNN (ρ doubling between two epochs), with its spread 1.4-1.8x the default's on the MLP.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from lightning_flatness.functional import hessian_eigenvalues, measurement_mode
from lightning_flatness.functional.objective import Objective

from .models import Workload, issue_cnn_workload, teacher_workload, train_briefly

# the module (the package's name ``pacgen`` is the function)
pg = importlib.import_module("lightning_flatness.functional.pacgen")

K = 3  # rho_probes, the default
SUBSAMPLE, CHUNK = 512, 64  # the callback's defaults
WARMUP_STEPS = 150
FRACTIONS = (0.5, 0.25)
CRITERION = 0.1  # the shift allowed, in units of the default's stated se (the first-order rule's ratio)

# name -> (build, training set size as in fit_cost's plan, train_briefly steps per epoch (batch 64))
MODELS: dict[str, tuple[Callable[[torch.device], Workload], int, int]] = {
    "teacher_mlp": (lambda d: teacher_workload(d), 4000, 4000 // 64),
    "cnn_bn": (lambda d: issue_cnn_workload(d), 2048, 2048 // 64),
}


# ----------------------------------------------------------------------------- draws
@dataclass
class Passes:
    """One seed's draws at one measurement: vectors, perturbations, and the chunks' summed products."""

    v: Tensor  # (K + extra, P): the K fresh unit vectors, then B's kept ones
    deltas: Tensor  # (K, P)
    at_w: Tensor  # (K + extra, P): full mean products at w
    at_w_chunks: Tensor  # (C, K + extra, P): each chunk's summed product at w
    pert_full: Tensor  # (K, P): full mean products at w + δ_k
    pert_chunks: Tensor  # (C, K, P)
    sizes: Tensor  # (C,) samples per chunk


def _observed(operator: pg.HessianOperator, vectors: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """``(mean products (K, P), chunk sums (C, K, P), chunk sizes)`` of one shared pass."""
    records: list[tuple[Tensor, int]] = []
    operator.chunk_observer = lambda v, hv, size: records.append((hv.detach().clone(), size))
    out = operator @ vectors.T
    k = vectors.shape[0]
    chunks = torch.stack([torch.stack([records[c * k + j][0] for j in range(k)]) for c in range(len(records) // k)])
    return out.T, chunks, [records[c * k][1] for c in range(len(records) // k)]


def passes(objective: Objective, noise: Tensor, gen: torch.Generator, kept: Tensor | None) -> Passes:
    """The default's draws exactly as ``_rho_draws`` makes them (same generator calls), with every chunk's part."""
    dim, like = objective.num_params, objective.w0
    v = torch.randn(K, dim, generator=gen, dtype=torch.float64)
    v = (v / v.norm(dim=1, keepdim=True)).to(device=like.device, dtype=like.dtype)
    u = torch.rand(K, dim, generator=gen, dtype=torch.float64) * 2 - 1
    deltas = (u.to(noise.device) * noise).to(like.dtype)
    vectors = v if kept is None else torch.cat([v, kept.to(v)])
    at_w, at_chunks, sizes = _observed(objective.hessian_operator(), vectors)
    pert, pert_chunks = [], []
    for j in range(K):
        full, chunks, _ = _observed(objective.hessian_operator(at=like + deltas[j]), v[j : j + 1])
        pert.append(full[0])
        pert_chunks.append(chunks[:, 0])
    return Passes(vectors, deltas, at_w, at_chunks, torch.stack(pert), torch.stack(pert_chunks, 1),
                  torch.tensor(sizes, dtype=torch.float64))  # fmt: skip


def default_draws(p: Passes) -> pg._RhoDraws:
    ratios = [((p.pert_full[j] - p.at_w[j]).norm() / p.deltas[j].norm()).item() for j in range(K)]
    return pg._RhoDraws(torch.tensor(ratios, dtype=torch.float64), p.v[:K], p.at_w[:K])


def shares(num_chunks: int, fraction: float, mode: str) -> list[list[int]]:
    """Draw k's chunks: ``lead``, the first ``f·C`` for every draw; ``rot``, the k-th run of ``f·C`` in turn."""
    m = max(1, round(fraction * num_chunks))
    if mode == "lead":
        return [list(range(m)) for _ in range(K)]
    return [[(k * m + i) % num_chunks for i in range(m)] for k in range(K)]


def share_draws(p: Passes, chunks: list[list[int]]) -> pg._RhoDraws:
    """Option A: each difference of the loss over its share; the products at w (for the diagonal) whole."""
    ratios = []
    for j, share in enumerate(chunks):
        count = p.sizes[share].sum().item()
        diff = (p.pert_chunks[share, j].sum(0) - p.at_w_chunks[share, j].sum(0)) / count
        ratios.append((diff.norm() / p.deltas[j].norm()).item())
    return pg._RhoDraws(torch.tensor(ratios, dtype=torch.float64), p.v[:K], p.at_w[:K])


@dataclass
class Pool:
    """Option B's draws carried from one measurement to the next: ratios and their unit vectors, newest first."""

    ratios: list[float] = field(default_factory=list)
    vectors: list[Tensor] = field(default_factory=list)


def reused_draws(p: Passes, pool: Pool) -> pg._RhoDraws:
    """Option B: draw 0 new, the pool's two newest kept (their products at w taken again, at the current w)."""
    new = ((p.pert_full[0] - p.at_w[0]).norm() / p.deltas[0].norm()).item()
    ratios = [new, *pool.ratios[: K - 1]]
    rows = [0, *range(K, K + len(pool.ratios[: K - 1]))]  # the kept vectors sit after the K fresh ones
    return pg._RhoDraws(torch.tensor(ratios, dtype=torch.float64), p.v[rows], p.at_w[rows])


# ----------------------------------------------------------------------------- Ψ from given draws
@contextlib.contextmanager
def given_draws(draws: pg._RhoDraws, cache: dict[bytes, Any]) -> Iterator[None]:
    """Inside, :func:`pacgen` takes ``draws`` for ρ̂ (consuming the generator as ``_rho_draws`` does, so any later
    Hutchinson probes are the default's) and reuses a Hutchinson diagonal already estimated from the same generator
    state, and exact ``H_ii`` already computed, at the same weights (``cache``, one per measurement): that changes
    no number (each product is its own column's autograd call either way) and no ``n_hvp``, only the time."""
    rho_draws, estimated = pg._rho_draws, pg._estimated_diagonal

    def replay(objective: Objective, noise: Tensor, num_probes: int, gen: torch.Generator) -> pg._RhoDraws:
        assert num_probes == K
        torch.randn(K, objective.num_params, generator=gen, dtype=torch.float64)
        torch.rand(K, objective.num_params, generator=gen, dtype=torch.float64)
        return draws

    def cached(operator: Any, num_probes: int, gen: torch.Generator) -> Any:
        key = gen.get_state().numpy().tobytes() + bytes([num_probes])
        if key not in cache:  # (result, the generator's state after it)
            cache[key] = (estimated(operator, num_probes, gen), gen.get_state())
        gen.set_state(cache[key][1])
        return cache[key][0]

    def screened(objective: Objective, noise: Tensor, rho: float, hessian_max: float, scale: float, num_probes: int,
                 gen: torch.Generator) -> tuple[Tensor, int, Tensor | None]:  # fmt: skip
        """``_screened_diagonal``, each exact ``H_ii`` computed once per measurement (the same column products)."""
        needed = pg._coordinates_that_need_h(noise, rho, hessian_max, scale)
        if needed.numel() > num_probes:
            return pg._estimated_diagonal(objective.hessian_operator(), num_probes, gen)
        diag = torch.full_like(noise, float(hessian_max))
        missing = [i for i in needed.tolist() if ("h", i) not in cache]
        if missing:
            w0 = objective.w0
            units = torch.zeros(len(missing), objective.num_params, dtype=w0.dtype, device=w0.device)
            units[torch.arange(len(missing)), torch.tensor(missing)] = 1
            products = (objective.hessian_operator() @ units.T).T
            for row, i in enumerate(missing):
                cache[("h", i)] = products[row, i].to(diag)
        for i in needed.tolist():
            diag[i] = cache[("h", i)]
        return diag, needed.numel(), None

    saved = pg._screened_diagonal
    pg._rho_draws = replay  # type: ignore[assignment]
    pg._estimated_diagonal = cached  # type: ignore[assignment]
    pg._screened_diagonal = screened  # type: ignore[assignment]
    try:
        yield
    finally:
        pg._rho_draws, pg._estimated_diagonal, pg._screened_diagonal = rho_draws, estimated, saved


def psi(work: Workload, batches: list, num_train: int, hessian_max: float | None, seed: int,
        draws: pg._RhoDraws, cache: dict) -> pg.PACGenResult:  # fmt: skip
    with given_draws(draws, cache):
        return pg.pacgen(work.model, batches, num_train=num_train, generator=seed, hessian_max=hessian_max)


# ----------------------------------------------------------------------------- cost
def timed_costs(work: Workload, batches: list, repeats: int = 3) -> dict[str, float]:
    """Wall time of each option's ρ passes in units of one full product (medians over ``repeats``)."""
    with measurement_mode(work.model):
        objective = Objective(work.model, batches)
        dim, gen = objective.num_params, torch.Generator().manual_seed(0)
        vecs = torch.randn(K, dim, generator=gen).to(objective.w0)
        subs = {f: Objective(work.model, batches[: max(1, round(f * len(batches)))]) for f in FRACTIONS}

        def clock(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        one = clock(lambda: objective.hessian_operator() @ vecs[:1].T)
        shared = clock(lambda: objective.hessian_operator() @ vecs.T)
        share = {f: clock(lambda o=o: o.hessian_operator() @ vecs[:1].T) for f, o in subs.items()}
    out = {"default": (shared + K * one) / one, "B": (shared + one) / one}
    out.update({f"A{f}": (shared + K * share[f]) / one for f in FRACTIONS})
    return out


# ----------------------------------------------------------------------------- statistics
def summary(default: list[pg.PACGenResult], option: list[pg.PACGenResult]) -> dict[str, float]:
    d = [r.value for r in default]
    o = [r.value for r in option]
    diff = [a - b for a, b in zip(o, d)]
    n = len(diff)
    sd_d, sd_o = statistics.stdev(d), statistics.stdev(o)
    se_d = statistics.fmean(r.se for r in default)
    se_o = statistics.fmean(r.se for r in option)
    shift = statistics.fmean(diff)
    return {
        "psi": statistics.fmean(d), "se_d": se_d, "sd_d": sd_d, "shift": shift, "shift_err": statistics.stdev(diff) / math.sqrt(n),
        "shift_se": shift / se_d, "shift_err_se": statistics.stdev(diff) / math.sqrt(n) / se_d, "shift_sd": shift / sd_d,
        "sd_ratio": sd_o / sd_d, "cal_d": se_d / sd_d, "cal_o": se_o / sd_o,
        "rho_d": statistics.fmean(r.rho for r in default), "rho_o": statistics.fmean(r.rho for r in option),
        "hvp_d": statistics.fmean(r.n_hvp for r in default), "n": n,
    }  # fmt: skip


# ----------------------------------------------------------------------------- the run
def run_model(name: str, seeds: int, epochs: int, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    build, num_train, steps = MODELS[name]
    work = build(device)
    train_briefly(work, WARMUP_STEPS, device)
    batches = work.batches(SUBSAMPLE, CHUNK, seed=7, device=device)
    costs = timed_costs(work, batches)
    log(f"{name}: {work.num_params} parameters, timed rho cost (full-HVP units) {costs}")
    pools = [Pool() for _ in range(seeds)]
    init, rows = None, []
    for epoch in range(epochs):
        if epoch:
            train_briefly(work, steps, device, seed=epoch)
        start = time.perf_counter()
        eig = hessian_eigenvalues(work.model, batches, k=1, init=init, generator=epoch)
        init = eig.vectors
        hessian_max = 2 * max(eig.values[0].item(), 0.0) if eig.converged else None
        results: dict[str, list[pg.PACGenResult]] = {}
        cache: dict = {}
        for s in range(seeds):
            seed = 1000 * epoch + s
            gen = torch.Generator().manual_seed(seed)
            pool = pools[s]
            kept = torch.stack(pool.vectors[: K - 1]) if epoch else None
            with measurement_mode(work.model):
                objective = Objective(work.model, batches)
                noise = 0.1 * objective.w0.to(torch.float64).abs() + 0.1  # pacgen's defaults gamma = eps = 0.1
                p = passes(objective, noise, gen, kept)
            variants = {"default": default_draws(p)}
            for f in FRACTIONS:
                for mode in ("lead", "rot"):
                    variants[f"A {mode} f={f}"] = share_draws(p, shares(len(batches), f, mode))
            if epoch:
                variants["B"] = reused_draws(p, pool)
            for key, draws in variants.items():
                results.setdefault(key, []).append(psi(work, batches, num_train, hessian_max, seed, draws, cache))
            if epoch == 0 and s == 0:  # the replay is the library's pacgen, number for number
                ref = pg.pacgen(work.model, batches, num_train=num_train, generator=seed, hessian_max=hessian_max)
                got = results["default"][0]
                assert (math.isclose(ref.value, got.value, rel_tol=1e-9) and math.isclose(ref.se, got.se, rel_tol=1e-9)
                        and ref.n_hvp == got.n_hvp), (ref, got)  # fmt: skip
            # B's pool after this measurement: epoch 0, the default's 3 draws; later, the new one first (FIFO).
            b = variants.get("B", variants["default"])
            b_vectors = list(b.vectors)
            pools[s] = Pool(b.ratios.tolist(), [t.clone() for t in b_vectors])
        log(f"{name} epoch {epoch}: {time.perf_counter() - start:.0f} s, hessian_max {hessian_max}, "
            f"default rho {statistics.fmean(r.rho for r in results['default']):.4g}")  # fmt: skip
        for key, res in results.items():
            if key == "default":
                continue
            row = summary(results["default"], res)
            cost = costs["B"] if key == "B" else costs[f"A{key.split('=')[1]}"] if key.startswith("A") else math.nan
            counted = 4.0 if key == "B" else K + K * float(key.split("=")[1])
            row.update(model=name, epoch=epoch, option=key, counted=counted, timed=cost, timed_d=costs["default"],
                       hvp_o=statistics.fmean(r.n_hvp for r in res))  # fmt: skip
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | epoch | option | Ψ default (mean) | default se (stated) / SD (seeds) | shift ± err | shift / se | "
            "shift / SD | SD ratio | se/SD default → option | ρ̂ default → option | ρ HVPs counted (timed) | "
            "PACGen n_hvp default → option | within 0.1 se |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ok = abs(r["shift_se"]) + 2 * r["shift_err_se"] <= CRITERION
        bad = abs(r["shift_se"]) - 2 * r["shift_err_se"] > CRITERION
        verdict = "yes" if ok else ("no" if bad else "undecided")
        lines.append(
            f"| {r['model']} | {r['epoch']} | {r['option']} | {r['psi']:.5g} | {r['se_d']:.3g} / {r['sd_d']:.3g} | "
            f"{r['shift']:+.3g} ± {r['shift_err']:.2g} | {r['shift_se']:+.3f} ± {r['shift_err_se']:.3f} | "
            f"{r['shift_sd']:+.3f} | {r['sd_ratio']:.2f} | {r['cal_d']:.2f} → {r['cal_o']:.2f} | "
            f"{r['rho_d']:.4g} → {r['rho_o']:.4g} | {r['counted']:g} of 6 ({r['timed']:.2f} of {r['timed_d']:.2f}) | "
            f"{r['hvp_d']:.0f} → {r['hvp_o']:.0f} | {verdict} |"
        )
    return "\n".join(lines)


def pooled(rows: list[dict]) -> str:
    """Each option's shift / se averaged over the measurements it has (errors combined as independent)."""
    lines = ["| model | option | measurements | mean shift / se | mean SD ratio | mean se/SD option (default) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["option"]), []).append(r)
    for (model, option), rs in groups.items():
        n = len(rs)
        shift = statistics.fmean(r["shift_se"] for r in rs)
        err = math.sqrt(sum(r["shift_err_se"] ** 2 for r in rs)) / n
        lines.append(f"| {model} | {option} | {n} | {shift:+.3f} ± {err:.3f} | {statistics.fmean(r['sd_ratio'] for r in rs):.2f} | "
                     f"{statistics.fmean(r['cal_o'] for r in rs):.2f} ({statistics.fmean(r['cal_d'] for r in rs):.2f}) |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3, help="measurements; B needs 2+ (its first is the default's)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows += run_model(name, args.seeds, args.epochs, device, lambda s: print(s, flush=True))
    print()
    print(table(rows))
    print()
    print(pooled(rows))
    print(f"\n{args.seeds} seeds; 'within 0.1 se': |shift| + 2 err <= {CRITERION} default se (yes), "
          f"|shift| - 2 err > {CRITERION} (no), else undecided. Total {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
