"""The built-in metrics by name, and turning the callback's ``metrics`` argument into objects."""

from __future__ import annotations

from typing import Sequence, Union

from .adaptive_sharpness import AdaptiveSharpness
from .adversarial import AdversarialRobustness
from .base import FlatnessMetric
from .block_curvature import BlockCurvature
from .fisher import FisherTrace
from .fisher_rao import FisherRaoNorm
from .flatness_ratio import FlatnessRatio
from .grad_noise_scale import GradientNoiseScale
from .hessian import HessianEigenvalues
from .hessian_min import HessianMinEigenvalue
from .local_entropy import LocalEntropy
from .pacgen import PACGen
from .regret import GradCosineRegret
from .spectral_density import HessianDensity

BUILTIN: dict[str, type[FlatnessMetric]] = {
    cls.name: cls
    for cls in (
        HessianEigenvalues, GradCosineRegret, FisherTrace, PACGen, GradientNoiseScale, LocalEntropy,
        BlockCurvature, HessianDensity, AdaptiveSharpness, FisherRaoNorm, AdversarialRobustness,
        FlatnessRatio, HessianMinEigenvalue,
    )  # fmt: skip
}
DEFAULT_METRICS = ("hessian_top_eig", "grad_cosine_regret", "fisher_trace", "pacgen", "grad_noise_scale")
# grad_noise_scale reuses the regret's and the Fisher's passes: ~0.06 gradient on top of them. The others
# are measured only when asked for, being far more expensive than the defaults: local_entropy (a Langevin
# chain), block_curvature (a Lanczos run and a trace per block), hessian_density (probes x Lanczos steps
# products), adaptive_sharpness (num_draws + 1 forward passes: ~8.5 gradients at 16 draws); fisher_rao_norm
# (~1.5 gradients) answers a different question than the defaults; adversarial_robustness ((1 + steps) input
# gradients of the held-out subsample) measures robustness, not flatness; flatness_ratio (a Lanczos run per
# mini-batch: about as many products again as hessian_top_eig's); hessian_min_eig (a Lanczos run on the
# slow-converging bottom of the spectrum, 1 product more beside hessian_top_eig) answers Li et al.'s convexity question.

MetricSpec = Union[str, FlatnessMetric]


def resolve_metrics(spec: MetricSpec | Sequence[MetricSpec]) -> list[FlatnessMetric]:
    """Metric objects for the callback's ``metrics`` argument: names become default-configured
    built-ins, objects are kept; each name at most once."""
    items = [spec] if isinstance(spec, (str, FlatnessMetric)) else spec
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"metrics must be a list of metric names {list(BUILTIN)} or FlatnessMetric objects, got {spec!r}.")
    out: list[FlatnessMetric] = []
    for item in items:
        if isinstance(item, str):
            if item not in BUILTIN:
                raise ValueError(f"metrics contains unknown metric {item!r}; accepted names: {list(BUILTIN)}, "
                                 "or a FlatnessMetric object.")  # fmt: skip
            item = BUILTIN[item]()
        elif not isinstance(item, FlatnessMetric):
            raise TypeError(f"metrics entries must be names {list(BUILTIN)} or FlatnessMetric objects, got {item!r}.")
        keys_later = type(item).setup is not FlatnessMetric.setup  # keys that depend on the model
        if not item.name or not (item.keys or keys_later):
            raise ValueError(f"{type(item).__name__} must set a class attribute `name` and `keys` in __init__.")
        out.append(item)
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"metrics lists a metric twice: {names}.")
    check_keys(out)
    return out


def check_keys(metrics: Sequence[FlatnessMetric]) -> None:
    """Raise if two metrics log the same key (again after :meth:`FlatnessMetric.setup` set model-dependent keys)."""
    logged = [key for m in metrics for key in m.keys]
    if len(set(logged)) != len(logged):
        raise ValueError(f"two metrics log the same key: {sorted(k for k in set(logged) if logged.count(k) > 1)}.")


def execution_order(metrics: Sequence[FlatnessMetric]) -> list[FlatnessMetric]:
    """``metrics`` with every provider of a shared result before the metrics that use it (stable)."""
    remaining, ordered, provided = list(metrics), [], set()
    wanted = {field for m in metrics for field in m.uses}
    offered = {field for m in metrics for field in m.provides}
    while remaining:
        ready = next(
            (m for m in remaining if all(f in provided or f not in offered for f in m.uses)), remaining[0]
        )  # a cycle of uses (none among the built-ins) falls back to the given order
        remaining.remove(ready)
        ordered.append(ready)
        provided.update(f for f in ready.provides if f in wanted)
    return ordered
