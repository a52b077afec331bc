"""Section 7 (``error``): the top Hessian eigenvalue's total error at equal cost.

The quantity estimated is the top eigenvalue of the Hessian of the mean loss over a whole data
set (the "training set", 4096 samples): the reference, float64 Lanczos to ``tol=1e-8`` over all
of it in chunks. Each method sees only part of the set, drawn afresh for each of ``R`` draws:

* ours: :func:`~lightning_flatness.functional.hessian_eigenvalues` with the options of
  :class:`~lightning_flatness.metrics.HessianEigenvalues` at its defaults (``solver_options()``:
  Lanczos stopping at a tenth of the value's running standard error, the check included; cold
  start from the gradient) on a subsample of ``n`` samples in mini-batches of 64, as the
  callback measures (its default ``n`` is 512);
* PyHessian: ``hessian(model, criterion, data=(x, y)).eigenvalues(top_n=1)`` (power iteration,
  default ``tol=1e-3``, ``maxIter=100``) on one mini-batch of ``B`` samples;
* Cockpit: its ``HessMaxEV`` quantity (default settings: power iteration from a uniform random
  vector, ``rtol=1e-3``, ``atol=1e-6``, 100 iterations at most), tracked through a real
  ``Cockpit`` around the backward pass of the current mini-batch of ``B`` samples
  (``cockpit-for-pytorch`` 1.0.2 imports ``pkg_resources``, i.e. ``setuptools<81``, ``json_tricks``
  and ``seaborn``).

Total error = root mean square over the draws of ``estimate - reference``: the sampling error
(which samples) and the solver's error together. Cost = per-sample Hessian-vector products: one
product over ``B`` samples costs ``B``, a gradient ``B / 3``. Every method's curve of (mean cost,
RMS error) over its sample sizes is measured, and each peer's error is interpolated (log error
linear in log cost) to the mean cost of ours at its defaults.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_flatness.functional import hessian_eigenvalues, measurement_mode
from lightning_flatness.metrics import HessianEigenvalues

from ._common import Config, Row, Section, attention_for, error_text, fmt_ratio, fmt_time, model_label
from .models import Workload, train_briefly, workloads

GRADIENT_COST = 1 / 3  # a gradient pass in Hessian-vector products (section 1: an HVP costs about 3 gradients)
OURS = "ours (Lanczos, callback defaults)"
PYHESSIAN = "PyHessian power iteration, 1 mini-batch"
COCKPIT = "Cockpit HessMaxEV, 1 mini-batch"
CHECKLESS = "↳ ours without the check (verify=False), for reference"
COLUMNS = ["model", "method", "draws", "rel. RMS error at ours' cost", "÷ ours", "time / draw at ours' cost",
           "÷ ours at ours' sample size", "HVPs / estimate at ours' sample size", "ours: mean se / SD over draws", "size: mean cost, rel. RMS error (all sizes)"]  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Sizes and draws of one model's measurement."""

    train_n: int  # the data set whose Hessian is the target
    draws: int  # R: subsamples / mini-batches drawn per method and size
    ours_sizes: tuple[int, ...]  # ours: subsample sizes, in mini-batches of ``batch``
    ours_default: int  # the callback's num_samples
    batch: int  # the callback's batch_size
    peer_sizes: tuple[int, ...]  # PyHessian / Cockpit: mini-batch sizes
    train_steps: int


def plan_for(cfg: Config, name: str) -> Plan:
    """The full run's plan (fewer draws and sizes on the slower models), or the quick one."""
    if cfg.quick:
        return Plan(512, 3, (64, 128, 256), 128, 32, (16, 32, 64, 128, 256, 512), 20)
    draws = {"mlp": 20, "cnn_bn": 6, "transformer": 5}[name]
    ours_sizes = (128, 256, 512, 1024, 2048) if name == "mlp" else (128, 256, 512)
    return Plan(4096, draws, ours_sizes, 512, 64, (64, 128, 256, 512, 1024, 2048), 150)


@dataclass
class Draw:
    estimate: float
    cost: float  # per-sample Hessian-vector products, gradients at GRADIENT_COST
    seconds: float
    se: float = math.nan  # ours' reported standard error
    capped: bool = False  # the iteration cap stopped it, not its rule


@contextlib.contextmanager
def _counting(owner: Any, attribute: str, count: list[int]) -> Iterator[None]:
    """Count the calls of ``owner.attribute`` (a module function or a method) made inside."""
    original = getattr(owner, attribute)

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    setattr(owner, attribute, counted)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def _chunks(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the peers' ``backward(create_graph=True)`` reference-cycle warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
        yield


def ours(model: nn.Module, x: Tensor, y: Tensor, batch: int, seed: int, verify: bool = True) -> Draw:
    """``hessian_eigenvalues`` with the metric's default options on ``(x, y)`` in mini-batches of ``batch``."""
    options = HessianEigenvalues(verify=verify).solver_options()
    start = time.perf_counter()
    res = hessian_eigenvalues(model, _chunks(x, y, batch), k=1, generator=seed, **options)
    seconds = time.perf_counter() - start
    cost = (res.n_hvp + GRADIENT_COST * res.n_grad) * len(y)
    return Draw(res.values[0].item(), cost, seconds, res.se[0].item(), capped=not res.converged)


def pyhessian(model: nn.Module, x: Tensor, y: Tensor, seed: int) -> Draw:
    """PyHessian as shipped on one mini-batch: ``hessian(..., data=(x, y)).eigenvalues(top_n=1)``."""
    from pyhessian import hessian

    module = importlib.import_module("pyhessian.hessian")  # ``pyhessian.hessian`` is also the class
    count = [0]
    with measurement_mode(model), _quiet(), _counting(module, "hessian_vector_product", count):
        torch.manual_seed(seed)  # its start vector
        start = time.perf_counter()
        values, _ = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda).eigenvalues(top_n=1)
        seconds = time.perf_counter() - start
    return Draw(float(values[0]), (count[0] + GRADIENT_COST) * len(y), seconds, capped=count[0] >= 100)


def cockpit(model: nn.Module, x: Tensor, y: Tensor, seed: int) -> Draw:
    """Cockpit's ``HessMaxEV`` around the backward pass of the mini-batch ``(x, y)``."""
    with warnings.catch_warnings():  # cockpit imports pkg_resources
        warnings.simplefilter("ignore")
        from cockpit import Cockpit
        from cockpit.quantities import HessMaxEV
        from cockpit.quantities.hess_max_ev import HVPLinearOperator

    count = [0]
    with measurement_mode(model), _quiet(), _counting(HVPLinearOperator, "hessian_vector_product", count):
        warnings.filterwarnings("always", message="Exceeded maximum number")
        params = [p for p in model.parameters() if p.requires_grad]
        tracker = Cockpit(params, quantities=[HessMaxEV(track_schedule=lambda step: True)])
        torch.manual_seed(seed)  # its start vector
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        with warnings.catch_warnings(record=True) as caught, tracker(0, info={"loss": loss, "batch_size": len(y)}):
            loss.backward(create_graph=tracker.create_graph(0))
        seconds = time.perf_counter() - start
        value = float(tracker.get_output()[0]["HessMaxEV"])
    capped = any("Exceeded maximum number" in str(w.message) for w in caught)
    return Draw(value, (count[0] + GRADIENT_COST) * len(y), seconds, capped=capped)


@dataclass
class Curve:
    """One method's draws, by sample size."""

    draws: dict[int, list[Draw]] = field(default_factory=dict)
    error: str | None = None

    def cost(self, size: int) -> float:
        return statistics.fmean(d.cost for d in self.draws[size])

    def point(self, size: int, ref: float) -> tuple[float, float, float, int]:
        """``(mean cost, relative RMS error, median seconds, size)`` at ``size``."""
        draws = self.draws[size]
        rms = math.sqrt(statistics.fmean((d.estimate - ref) ** 2 for d in draws))
        return self.cost(size), rms / abs(ref), statistics.median(d.seconds for d in draws), size

    def points(self, ref: float) -> list[tuple[float, float, float, int]]:
        """:meth:`point` at every size."""
        return [self.point(size, ref) for size in self.draws]


def at_cost(points: list[tuple[float, float, float, int]], cost: float) -> tuple[float, float] | None:
    """Error and time at ``cost`` on the lower front of ``points`` (a size that costs more and errs more than
    another is dropped: nobody would choose it), each log-linear in log cost between the two points around
    ``cost``; ``None`` outside their costs."""
    front: list[tuple[float, float, float, int]] = []
    for point in sorted(points):
        if not front or point[1] < front[-1][1]:
            front.append(point)
    for (c0, e0, t0, _), (c1, e1, t1, _) in zip(front, front[1:]):
        if c0 <= cost <= c1:
            w = 0.0 if c1 == c0 else math.log(cost / c0) / math.log(c1 / c0)
            return e0 ** (1 - w) * e1**w, t0 ** (1 - w) * t1**w
    if len(front) == 1 and math.isclose(front[0][0], cost):
        return front[0][1], front[0][2]
    return None


def _methods(plan: Plan) -> dict[str, tuple[tuple[int, ...], Callable[[nn.Module, Tensor, Tensor, int], Draw]]]:
    return {
        OURS: (plan.ours_sizes, lambda m, x, y, s: ours(m, x, y, plan.batch, s)),
        PYHESSIAN: (plan.peer_sizes, pyhessian),
        COCKPIT: (plan.peer_sizes, cockpit),
        CHECKLESS: ((plan.ours_default,), lambda m, x, y, s: ours(m, x, y, plan.batch, s, verify=False)),
    }


def measure(work: Workload, plan: Plan, x: Tensor, y: Tensor, seed: int) -> dict[str, Curve]:
    """Every method's draws. Draw ``r`` takes the first ``n`` samples of one permutation of the set for
    every method and size (common random numbers); the methods take turns draw by draw. The default
    size comes first; a peer's sizes above it stop once its mean cost passed ours' (the bracket is
    closed)."""
    methods = _methods(plan)
    curves = {name: Curve() for name in methods}
    perms = [torch.randperm(plan.train_n, generator=torch.Generator().manual_seed(seed * 1000 + r)) for r in range(plan.draws)]
    sizes = sorted({s for sizes, _ in methods.values() for s in sizes}, key=lambda s: (s != plan.ours_default, s))
    for size in sizes:
        active = [name for name, (sizes_of, _) in methods.items() if size in sizes_of and _wanted(curves, name, size, plan)]
        for r, perm in enumerate(perms):
            idx = perm[:size].to(x.device)
            for name in active:
                curve = curves[name]
                if curve.error is not None:
                    continue
                try:
                    draw = methods[name][1](work.model, x[idx], y[idx], seed * 1000 + r)
                except Exception as exc:  # a peer that is missing or does not support the model
                    curve.error = error_text(exc)
                    continue
                curve.draws.setdefault(size, []).append(draw)
    return curves


def _wanted(curves: dict[str, Curve], name: str, size: int, plan: Plan) -> bool:
    """Ours: every size. A peer: every size up to the default, then while its costs stay below ours'."""
    if name == OURS or size <= plan.ours_default:
        return True
    ours_curve, curve = curves[OURS], curves[name]
    if plan.ours_default not in ours_curve.draws or not curve.draws:
        return True
    return max(curve.cost(s) for s in curve.draws) < ours_curve.cost(plan.ours_default)


def _k(cost: float) -> str:
    return f"{cost / 1e3:.1f}k" if cost >= 1e3 else f"{cost:.0f}"


def _pct(rel: float) -> str:
    return f"{100 * rel:.1f}%" if rel < 1 else f"{100 * rel:.0f}%"


def _raw(curve: Curve, ref: float, peer: bool) -> str:
    parts = []
    for size in sorted(curve.draws):
        cost, err, _, _ = curve.point(size, ref)
        capped = sum(d.capped for d in curve.draws[size])
        parts.append(f"{'B=' if peer else 'n='}{size}: {_k(cost)}, {_pct(err)}" + (f" ({capped} capped)" if capped else ""))
    return "; ".join(parts)


def _calibration(draws: list[Draw]) -> str:
    se = statistics.fmean(d.se for d in draws)
    sd = statistics.stdev(d.estimate for d in draws) if len(draws) > 1 else math.nan
    return f"{se:.3g} / {sd:.3g} ({fmt_ratio(se / sd) if sd > 0 else 'n/a'})"


def _rows(section: Section, work: Workload, plan: Plan, curves: dict[str, Curve], ref: float) -> None:
    label = model_label(work.label, work.num_params)
    ours_curve = curves[OURS]
    if ours_curve.error is not None or plan.ours_default not in ours_curve.draws:
        section.rows.append(Row({"model": label, "method": OURS, "rel. RMS error at ours' cost": f"error: {ours_curve.error}"}))
        return
    n = plan.ours_default
    c0, e0, t0, _ = ours_curve.point(n, ref)
    section.rows.append(Row({
        "model": label, "method": f"{OURS}, n={n} in {n // plan.batch}×{plan.batch}",
        "draws": str(plan.draws), "rel. RMS error at ours' cost": f"{_pct(e0)} at {_k(c0)}", "÷ ours": "1.00×",
        "time / draw at ours' cost": fmt_time(t0), "÷ ours at ours' sample size": "1.00×",
        "HVPs / estimate at ours' sample size": f"{c0 / n:.1f}", "ours: mean se / SD over draws": _calibration(ours_curve.draws[n]),
        "size: mean cost, rel. RMS error (all sizes)": _raw(ours_curve, ref, peer=False),
    }))  # fmt: skip
    errors: dict[str, float] = {}
    products = {"ours": f"{c0 / n:.1f}"}
    same = []
    for name in (PYHESSIAN, COCKPIT, CHECKLESS):
        row = _peer_row(curves[name], label, name, plan, ref, c0, e0)
        section.rows.append(row)
        if row.ratio is not None and name != CHECKLESS:
            errors[name] = row.ratio * e0
        if n in curves[name].draws:
            cost, err, _, _ = curves[name].point(n, ref)
            products["ours without the check" if name == CHECKLESS else name.split()[0]] = f"{cost / n:.1f}"
            same += [err / e0] if name != CHECKLESS else []
    best = min(errors.values(), default=None)
    ratio = None if best is None else e0 / best
    met = None if ratio is None else ratio < 1
    section.targets.append(("top eig total error at equal cost, ours / best peer", work.label, fmt_ratio(ratio), "< 1", met))
    text = f"{work.label}: ours is {'the lowest' if met else 'not the lowest'} at its cost ({fmt_ratio(ratio)} the best peer's error)"
    if same:
        spread = max(abs(r - 1) for r in same)
        text += f". On the same {n} samples the peers' errors are {min(same):.3f}–{max(same):.3f}× ours'"
        text += ": the sampling error swamps every solver's, so at equal cost the order is that of" if spread < 0.02 else ";"
        text += " HVPs per estimate (" + ", ".join(f"{who} {count}" for who, count in products.items()) + ")"
    section.notes.append(text + ".")


def _peer_row(curve: Curve, label: str, name: str, plan: Plan, ref: float, c0: float, e0: float) -> Row:
    """A peer's row; its ``ratio`` is its error at ours' cost over ours' (``None``: not measured there)."""
    cells = {"model": label, "method": name, "draws": str(plan.draws)}
    if curve.error is not None:
        cells["rel. RMS error at ours' cost"] = f"error: {curve.error}"
        return Row(cells)
    points = curve.points(ref)
    hit = at_cost(points, c0)
    ratio = None
    if hit is None:
        low, high = _k(min(points)[0]), _k(max(points)[0])
        cells["rel. RMS error at ours' cost"] = f"n/a: its costs span {low}–{high}" if low != high else f"n/a: measured at {low} only"
    else:
        err, seconds = hit
        ratio = err / e0
        cells.update({"rel. RMS error at ours' cost": _pct(err), "÷ ours": fmt_ratio(ratio), "time / draw at ours' cost": fmt_time(seconds)})
    if plan.ours_default in curve.draws:
        cost, err, _, _ = curve.point(plan.ours_default, ref)
        cells["÷ ours at ours' sample size"] = fmt_ratio(err / e0)
        cells["HVPs / estimate at ours' sample size"] = f"{cost / plan.ours_default:.1f}"
    cells["size: mean cost, rel. RMS error (all sizes)"] = _raw(curve, ref, peer=name != CHECKLESS)
    return Row(cells, ratio)


def reference(work: Workload, x: Tensor, y: Tensor, chunk: int, seed: int) -> tuple[float, str]:
    """λ_max of the whole set's mean-loss Hessian: float64 Lanczos, ``tol=1e-8`` (no check: see the notes)."""
    res = hessian_eigenvalues(work.model, _chunks(x, y, chunk), tol=1e-8, dtype=torch.float64, max_iter=300, generator=seed, verify=False)
    ref = res.values[0].item()
    return ref, f"reference λ_max = {ref:.6g} ({res.n_hvp} float64 HVPs over {len(y)} samples, converged={res.converged})"


def _note(plans: dict[str, Plan]) -> str:
    draws = ", ".join(f"{name} {plan.draws}" for name, plan in plans.items())
    return (
        "Total error = RMS over the draws of (estimate − reference), relative to the reference: sampling error "
        "(which samples) and solver error together. Data set = a fixed sample of each workload's distribution "
        "(4096 samples, quick 512; the model was trained on other draws of it). Reference = the top eigenvalue of the Hessian "
        "of the mean loss over the whole data set, float64 Lanczos to tol=1e-8 from the gradient start (without the check, which "
        "would double its cost). Cost = per-sample Hessian-vector products: a product over B samples costs B, a "
        f"gradient B/3 — ours (n_hvp + n_grad/3)·n (its check's products included), PyHessian (iterations + 1/3)·B "
        "(its `backward(create_graph=True)`), Cockpit (products + 1/3)·B (the step's `backward(create_graph=True)`, "
        "which training would run anyway: leaving it out lowers Cockpit's cost by B/3). Ours = "
        "`hessian_eigenvalues(k=1, **HessianEigenvalues().solver_options())`, i.e. tol=1e-4 with error_ratio=0.1, "
        "max_iter=100, the check on, a cold start from the gradient, on n samples in mini-batches of the callback's size (64; quick: 32); PyHessian = "
        "`hessian(model, CrossEntropyLoss(), data=(x, y)).eigenvalues(top_n=1)` (tol 1e-3, maxIter 100); Cockpit = "
        "`HessMaxEV` in a `Cockpit` around the mini-batch's backward pass (its power iteration: rtol 1e-3, "
        "maxiter 100). All in eval mode. Draw r gives every method and size the first n (or B) samples of one "
        "random permutation of the set, and the methods take turns draw by draw. Error at ours' cost = the peer's "
        "curve, log error linear in log cost between its two sizes around ours' mean cost at the callback's "
        "default n, on the curve's lower front (a size that costs more and errs more than another is left out); the "
        "time per draw (a median) likewise; a peer's sizes above ours' default stop once its mean "
        "cost passed ours'. ÷ ours at ours' sample size = the peer's error on one mini-batch of B = ours' default n over ours' (the same samples): the solvers' difference without the cost's; HVPs / estimate = mean cost / that size (a gradient ⅓). 'capped': draws stopped by the iteration cap. Ours: mean se / SD over draws = its "
        "reported standard error vs the spread of its estimates at the default n (a calibration check). The ↳ row: "
        "ours at the default n with `verify=False` (the check, a second Lanczos run in the complement of the found "
        "vector, off), on the same draws: not at its defaults, so outside the comparison; measured at the default n "
        "only. Fewer draws, and ours' sizes only up to its default, on the CNN and the transformer, to keep the "
        f"section near 6 minutes on 2 CPU cores. Draws: {draws}."
    )


def run(cfg: Config) -> Section:
    scale = "quick" if cfg.quick else "eigen"
    section = Section("error", "7. Top Hessian eigenvalue: total error at equal cost (ours vs PyHessian vs Cockpit)", list(COLUMNS))
    plans: dict[str, Plan] = {}
    for work in workloads(scale, cfg.device, cfg.models, cfg.seed):
        plan = plans[work.name] = plan_for(cfg, work.name)
        train_briefly(work, plan.train_steps, cfg.device, cfg.seed)
        x, y = work.sample(plan.train_n, torch.Generator().manual_seed(cfg.seed + 1))
        x, y = x.to(cfg.device), y.to(cfg.device)
        start = time.perf_counter()
        with attention_for(work.name):
            ref, text = reference(work, x, y, 512, cfg.seed)
            curves = measure(work, plan, x, y, cfg.seed)
        seconds = time.perf_counter() - start
        section.notes.append(f"{work.label}: {text}; trained {plan.train_steps} SGD steps first; measured in {seconds:.0f} s.")
        _rows(section, work, plan, curves, ref)
    section.notes.insert(0, _note(plans))
    return section
