"""The flat keyword arguments of ``FlatnessCallback`` before metric objects (0.1), for one release.

Each old argument belonged to one metric (or to the landscape views); it still works, with a
``FutureWarning`` that shows the new spelling, and will be removed in the next release.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from .landscape import LandscapeOptions
from .metrics import BUILTIN, FlatnessMetric, MetricSpec

# old argument -> (metric name, option of that metric)
METRIC_OPTIONS = {
    "k": ("hessian_top_eig", "k"), "tol": ("hessian_top_eig", "tol"), "max_iter": ("hessian_top_eig", "max_iter"),
    "cache_chunks": ("hessian_top_eig", "cache_chunks"), "kind": ("fisher_trace", "kind"),
    "gamma": ("pacgen", "gamma"), "eps": ("pacgen", "eps"), "rho": ("pacgen", "rho"),
    "num_probes": ("pacgen", "num_probes"), "pacgen_screen": ("pacgen", "screen"),
    "entropy_gamma": ("local_entropy", "gamma"), "entropy_noise": ("local_entropy", "noise"),
    "entropy_steps": ("local_entropy", "num_steps"), "entropy_step_size": ("local_entropy", "step_size"),
}  # fmt: skip
LANDSCAPE_OPTIONS = {
    "landscape_every_n_epochs": "every_n_epochs", "landscape_steps": "steps", "landscape_span": "span",
    "landscape_2d": "two_d", "landscape_2d_steps": "steps_2d", "landscape_eig_span": "eig_span",
}  # fmt: skip


def upgrade(
    metrics: MetricSpec | Sequence[MetricSpec], landscape: LandscapeOptions | None, legacy: dict[str, Any]
) -> tuple[list[MetricSpec], LandscapeOptions | None]:
    """``metrics`` and ``landscape`` with the old flat options applied (warns once if there are any)."""
    unknown = sorted(set(legacy) - set(METRIC_OPTIONS) - set(LANDSCAPE_OPTIONS))
    if unknown:
        accepted = sorted(set(METRIC_OPTIONS) | set(LANDSCAPE_OPTIONS))
        raise TypeError(f"FlatnessCallback got unexpected keyword argument(s) {unknown}; the deprecated flat "
                        f"options it still accepts are {accepted}.")  # fmt: skip
    items = [metrics] if isinstance(metrics, (str, FlatnessMetric)) else list(metrics)
    if not legacy:
        return items, landscape
    per_metric: dict[str, dict[str, Any]] = {}
    for old, value in legacy.items():
        if old in METRIC_OPTIONS:
            name, option = METRIC_OPTIONS[old]
            per_metric.setdefault(name, {})[option] = value
    for name, options in per_metric.items():
        built = BUILTIN[name](**options)  # validates even when the metric is not measured, as before
        if any(isinstance(m, FlatnessMetric) and m.name == name for m in items):
            raise ValueError(f"options {sorted(options)} of {name!r} were given both as flat keyword arguments and "
                             f"through a {type(built).__name__} object; pass them to the object only.")  # fmt: skip
        items = [built if m == name else m for m in items]
    landscape = _landscape(landscape, legacy)
    warnings.warn(_message(items, landscape, sorted(legacy)), FutureWarning, stacklevel=3)
    return items, landscape


def _landscape(landscape: LandscapeOptions | None, legacy: dict[str, Any]) -> LandscapeOptions | None:
    options = {LANDSCAPE_OPTIONS[k]: v for k, v in legacy.items() if k in LANDSCAPE_OPTIONS}
    if not options:
        return landscape
    if landscape is not None:
        raise ValueError("pass the landscape options either as landscape=LandscapeOptions(...) or as the deprecated "
                         "landscape_* keyword arguments, not both.")  # fmt: skip
    built = LandscapeOptions(**{"every_n_epochs": 0, **options})  # the old default was 0: off
    return built if built.every_n_epochs != 0 else None


def _message(items: list[MetricSpec], landscape: LandscapeOptions | None, old: list[str]) -> str:
    spelled = ", ".join(repr(m) for m in items)
    new = f"metrics=[{spelled}]" + (f", landscape={landscape!r}" if landscape is not None else "")
    return (f"FlatnessCallback's flat options {old} are deprecated and will be removed in the next release; each "
            f"belongs to its metric now. Write FlatnessCallback({new}, ...) with the classes from "
            "lightning_flatness.metrics (and lightning_flatness.landscape).")  # fmt: skip
