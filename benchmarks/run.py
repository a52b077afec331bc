"""``python -m benchmarks``: run every section side by side and write ``benchmarks/RESULTS.md``.

Sections (``--sections`` picks some): ``hvp`` (HVP / gradient), ``eigen`` (top eigenvalue vs
PyHessian and eigsh on curvlinops), ``fisher`` (Fisher trace vs a loop and BackPACK), ``memory``
(peak memory vs subsample size), ``callback`` (the whole ``FlatnessCallback`` measurement in
gradient-equivalents), ``fit`` (the callback at its defaults in ``Trainer.fit``: one measurement in
gradients, fit time with / without, the projected factor on a 50k-sample epoch), ``error`` (the
top eigenvalue's total error against the whole data set's at equal cost, vs PyHessian and Cockpit's
``HessMaxEV``), ``robust`` (``AdversarialRobustness`` in gradients, adversarial training steps). Peers (``pyhessian``, ``curvlinops-for-pytorch``, ``backpack-for-pytorch``,
``cockpit-for-pytorch``) are optional: a missing one shows as an error cell, the rest still runs.

Examples::

    python -m benchmarks                      # full run (about 23 minutes on 2 CPU cores, 7 of them ``fit``, 6 ``error``)
    python -m benchmarks --quick              # smoke run, under a minute, prints only
    python -m benchmarks --device cuda        # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback
from typing import Callable

import torch

from ._common import Config, Section, error_text, met_str

SECTION_NAMES = ("hvp", "eigen", "fisher", "memory", "callback", "fit", "error", "robust")
MODEL_NAMES = ("mlp", "cnn_bn", "transformer", "teacher_mlp", "resnet")  # the last two: section ``fit`` only
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _section_fn(name: str) -> Callable[[Config], Section]:
    if name == "hvp":
        from .hvp_cost import run
    elif name == "eigen":
        from .eigen import run
    elif name == "fisher":
        from .fisher import run
    elif name == "memory":
        from .memory import run
    elif name == "fit":
        from .fit_cost import run
    elif name == "error":
        from .eigen_error import run
    elif name == "robust":
        from .adversarial_cost import run
    else:
        from .callback_cost import run
    return run


def _peer_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("pyhessian", "curvlinops-for-pytorch", "backpack-for-pytorch", "cockpit-for-pytorch", "scipy"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} missing")
    return ", ".join(out)


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)} (TF32 off)"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def render(sections: list[Section], cfg: Config, argv: list[str], seconds: float) -> str:
    shown = [a for i, a in enumerate(argv) if a != "--out" and not (i and argv[i - 1] == "--out") and not a.startswith("--out=")]
    lines = [
        "# Benchmark results",
        "",
        f"`{' '.join(['python -m benchmarks'] + shown)}`" + f" — {datetime.date.today().isoformat()}, "
        f"{seconds / 60:.1f} min. {_device_text(cfg.device)}; torch {torch.__version__}, Python "
        f"{platform.python_version()}; {_peer_versions()}.",
        "",
        "Every number is a ratio measured side by side in one run (times are medians over interleaved rounds), "
        "so load on a shared machine cancels out to first order. Regenerate with `python -m benchmarks`.",
        "",
    ]
    if cfg.quick:
        lines += ["**Quick smoke run: toy models and sizes, where fixed per-call overheads dominate; the ratios "
                  "below say nothing about the targets.**", ""]
    lines += [
        "## Targets",
        "",
        "| what | model | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for section in sections:
        for what, model, measured, target, met in section.targets:
            lines.append(f"| {what} | {model} | {measured} | {target} | {met_str(met)} |")
    for section in sections:
        lines += ["", f"## {section.title}", ""]
        columns = [c for c in section.columns if any(c in row.cells for row in section.rows)] or section.columns
        if section.rows:
            lines.append("| " + " | ".join(columns) + " |")
            lines.append("|" + "---|" * len(columns))
            for row in section.rows:
                lines.append("| " + " | ".join(row.cells.get(c, "") for c in columns) + " |")
        for note in section.notes:
            lines += ["", note]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--quick", action="store_true", help="toy models and sizes: a smoke run under a minute")
    parser.add_argument("--sections", default=",".join(SECTION_NAMES), help=f"comma-separated subset of {SECTION_NAMES}")
    parser.add_argument("--models", default=None, nargs="+",
                        help=f"subset of {MODEL_NAMES}, comma- or space-separated (default all; quick: mlp); "
                        "teacher_mlp and resnet are measured in section fit only")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eigsh-warm", action="store_true", help="also run eigsh warm-started (always 21 products)")
    parser.add_argument("--out", default=None, help=f"markdown file to write (default {DEFAULT_OUT}; with --quick, none)")
    parser.add_argument("--strict", action="store_true", help="re-raise a failing section instead of reporting it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse(raw)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":  # TF32 would cap the attainable accuracy near 1e-3
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sections_wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    models = tuple(m.strip() for m in (",".join(args.models or ()) or ("mlp" if args.quick else ",".join(MODEL_NAMES))).split(",") if m.strip())
    for name in sections_wanted:
        if name not in SECTION_NAMES:
            raise SystemExit(f"unknown section {name!r}; choose from {SECTION_NAMES}")
    for name in models:
        if name not in MODEL_NAMES:
            raise SystemExit(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    cfg = Config(device=device, quick=args.quick, models=models, seed=args.seed, repeats=args.repeats or (3 if args.quick else 5),
                 threads=args.threads, eigsh_warm=args.eigsh_warm)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    start = time.perf_counter()
    sections: list[Section] = []
    for name in sections_wanted:
        t0 = time.perf_counter()
        print(f"[benchmarks] section {name} ...", file=sys.stderr, flush=True)
        try:
            sections.append(_section_fn(name)(cfg))
        except Exception as exc:
            if args.strict:
                raise
            traceback.print_exc()
            sections.append(Section(name, f"{name}: failed", [], notes=[f"The section failed: {error_text(exc)}"]))
        print(f"[benchmarks] section {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if out:  # after every section, so an interrupted run keeps what it measured
            with open(out, "w") as f:
                f.write(render(sections, cfg, raw, time.perf_counter() - start))
    text = render(sections, cfg, raw, time.perf_counter() - start)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
        print(f"[benchmarks] wrote {out}", file=sys.stderr)
    return text
