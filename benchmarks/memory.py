"""Section 4: peak memory of each metric vs the subsample size, chunks of a fixed size.

The metrics run one after the other in a child process (``python -m benchmarks.memory --child
...``) that, for each metric, builds the model and the largest subsample, runs the metric once on
the smallest subsample to warm up, and then, for each size, resets the peak and runs the metric
on the first ``size`` samples. The peak is the extra memory above what was held just before the call:

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``;
* CPU (Linux): the peak resident set size ``VmHWM``, reset through ``/proc/self/clear_refs``,
  minus the resident size before the call; glibc is told to return every allocation above
  64 KiB to the system at once (``MALLOC_MMAP_THRESHOLD_``), so freed tensors cannot hide a
  later peak. Elsewhere a 1 ms sampling thread reads the RSS with psutil (or, without psutil,
  the growth of the process's lifetime peak ``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import torch

from ._common import Config, Row, Section, error_text, met_str, model_label

GRAPH_BUDGET = 5 << 19  # 2.5 MiB: two chunks' gradient graphs of the MLP (about 1 MiB each)
METRICS = ("gradient", "hessian_top_eig", "hessian_trace", "grad_cosine_regret", "fisher_trace", "pacgen")
FLAT = 1.25  # peak at the largest size / peak at the smallest size ...
SLACK = 2**20  # ... or at most 1 MiB more (allocator granularity on small peaks)


def _metric(name: str) -> Callable[[torch.nn.Module, list[Any]], object]:
    from lightning_flatness import functional as fn
    from lightning_flatness.functional import Objective

    def gradient(model: torch.nn.Module, batches: list[Any]) -> object:
        with fn.measurement_mode(model):
            return Objective(model, batches).gradient()

    return {
        "gradient": gradient,
        # a fixed number of Lanczos iterations, so the basis (5 flat vectors) is the same at every size;
        # graphs kept as by default ("auto"), within a budget the smallest size already fills
        "hessian_top_eig": lambda m, b: fn.hessian_eigenvalues(m, b, tol=1e-12, max_iter=5, cache_bytes=GRAPH_BUDGET),
        "hessian_trace": lambda m, b: fn.hessian_trace(m, b, num_probes=8, generator=0),
        "grad_cosine_regret": lambda m, b: fn.grad_cosine_regret(m, b),
        "fisher_trace": lambda m, b: fn.fisher_trace(m, b),
        "pacgen": lambda m, b: fn.pacgen(m, b, num_probes=8, rho_probes=1, generator=0),
    }[name]



class _PeakMeter:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.proc = os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)
        self._psutil: Any = None
        if device.type != "cuda" and not self.proc:
            try:
                import psutil

                self._psutil = psutil.Process()
            except ImportError:  # last resort: the process's lifetime peak, which cannot be reset
                self._psutil = None

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024  # type: ignore[union-attr]

    def measure(self, fn: Callable[[], object]) -> int:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        if self.proc:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = self._status("VmRSS")
            fn()
            return self._status("VmHWM") - base
        if self._psutil is None:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            fn()
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - base
        base = self._psutil.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], self._psutil.memory_info().rss)
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        fn()
        done.set()
        thread.join()
        return max(peak[0], self._psutil.memory_info().rss) - base


def child(metric: str, sizes: list[int], chunk: int, scale: str, device: str, seed: int) -> dict[str, Any]:
    """Peak memory of one metric at each size (model and data built first, one warm-up run)."""
    from .models import workloads

    dev = torch.device(device)
    work = workloads(scale, dev, ("mlp",), seed)[0]
    data = work.batches(max(sizes), chunk, seed, dev)
    fn = _metric(metric)
    meter = _PeakMeter(dev)
    fn(work.model, data[: max(2, sizes[0] // chunk)])  # warm-up: lazy initializations, thread pools
    peaks = {}
    for size in sizes:
        batches = data[: size // chunk]
        peaks[str(size)] = meter.measure(lambda: fn(work.model, batches))
    return {"metric": metric, "peaks": peaks, "num_params": work.num_params, "label": work.label}


def _child_results(cfg: Config, sizes: list[int], chunk: int, scale: str) -> tuple[dict[str, dict[str, Any]], str]:
    """Every metric's result from the child process, and the last line it printed (why a metric is missing)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    # One child process for all metrics (importing torch and Lightning dominates a quick run); with
    # MALLOC_MMAP_THRESHOLD_ every large tensor goes back to the system when freed, so one metric's
    # allocations cannot hide the next one's peak.
    cmd = [sys.executable, "-m", "benchmarks.memory", "--child", ",".join(METRICS), "--sizes", ",".join(map(str, sizes)),
           "--chunk", str(chunk), "--scale", scale, "--device", str(cfg.device), "--seed", str(cfg.seed)]  # fmt: skip
    if cfg.threads:
        cmd += ["--threads", str(cfg.threads)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            results[item["metric"]] = item
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return results, tail[0]


def _record(section: Section, metric: str, result: dict[str, Any], sizes: list[int]) -> str:
    """One metric's row and target: the growth of its peak from the smallest size to the largest.

    Returns the model's label, for the note.
    """
    label = model_label(result["label"], result["num_params"])
    peaks = [result["peaks"][str(s)] for s in sizes]
    growth = peaks[-1] / peaks[0] if peaks[0] >= SLACK else float("nan")  # a ratio of tiny peaks means nothing
    met = growth <= FLAT or peaks[-1] - peaks[0] <= SLACK
    difference = f"{(peaks[-1] - peaks[0]) / 2**20:+.1f} MiB"
    cells = {"metric": metric}
    cells.update({f"N={s}": f"{p / 2**20:.1f} MiB" for s, p in zip(sizes, peaks)})
    cells[f"N={sizes[-1]} / N={sizes[0]}"] = f"{growth:.2f}×" if growth == growth else "—"
    cells["difference"] = difference
    cells["target"] = f"≤ {FLAT:g}× or ≤ +1 MiB"
    cells["met"] = met_str(met)
    section.rows.append(Row(cells, growth, f"≤ {FLAT:g}×", met))
    measured = f"{growth:.2f}×" if growth == growth else difference
    section.targets.append((f"peak memory N={sizes[-1]} / N={sizes[0]}: {metric}", label, measured, f"≤ {FLAT:g}× or +1 MiB", met))
    return label


def run(cfg: Config) -> Section:
    sizes = [256, 512] if cfg.quick else [256, 4096]
    chunk = 128  # N=256 is then 2 mini-batches, the fewest grad_cosine_regret accepts
    scale = "quick" if cfg.quick else "eigen"  # the 85k-parameter MLP: the 1M one takes minutes at N=4096
    section = Section(
        "memory",
        f"4. Peak memory above the model and data vs subsample size (chunks of {chunk})",
        ["metric"] + [f"N={s}" for s in sizes] + [f"N={sizes[-1]} / N={sizes[0]}", "difference", "target", "met"],
    )
    results, tail = _child_results(cfg, sizes, chunk, scale)
    label = None
    for metric in METRICS:
        if metric not in results:
            section.rows.append(Row({"metric": metric, f"N={sizes[0]}": f"error: {error_text(RuntimeError(tail))}"}))
            continue
        label = _record(section, metric, results[metric], sizes)
    how = "torch.cuda.max_memory_allocated" if cfg.device.type == "cuda" else "peak RSS (VmHWM reset per call)"
    section.notes.append(
        f"Model: {label}. Peak = {how} minus the memory held just before the call (model and data included in the latter). "
        "hessian_top_eig runs exactly 5 Lanczos iterations, keeping the gradient graphs of the leading chunks "
        "(`cache_chunks=\"auto\"`, the default) within a budget of 2.5 MiB (`cache_bytes`; by default 1 GiB on CPU, a "
        "quarter of the free memory on CUDA), which two chunks fill: beyond it each product rebuilds the rest; hessian_trace 8 probes, pacgen 8 probes + 1 ρ probe; "
        "`gradient` is one full gradient through `Objective`, for scale."
    )
    return section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", required=True, help=f"comma-separated subset of {METRICS}")
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--chunk", type=int, required=True)
    parser.add_argument("--scale", default="full")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    for metric in args.child.split(","):
        if metric not in METRICS:
            raise SystemExit(f"unknown metric {metric!r}; choose from {METRICS}")
        print(json.dumps(child(metric, sizes, args.chunk, args.scale, args.device, args.seed)), flush=True)


if __name__ == "__main__":
    main()
