"""What :class:`~lightning_flatness.FlatnessCallback` measures: one object per measure.

``FlatnessCallback(metrics=[HessianEigenvalues(k=3), GradCosineRegret(), FisherTrace(kind="mc"),
PACGen(gamma=0.1)])``; the names ``"hessian_top_eig"``, ``"grad_cosine_regret"``,
``"fisher_trace"``, ``"pacgen"``, ``"local_entropy"``, ``"block_curvature"``, ``"hessian_density"``, ``"adaptive_sharpness"``, ``"fisher_rao_norm"``, ``"adversarial_robustness"``, ``"flatness_ratio"`` and ``"hessian_min_eig"`` stand for the default-configured
objects. Subclass :class:`FlatnessMetric` for your own (see :mod:`.base`).
"""

from .._logging import LogPosition
from .adaptive_sharpness import AdaptiveSharpness
from .adversarial import AdversarialRobustness
from .base import FlatnessMetric, MeasurementContext, SharedResults, measurement_seed, samples_needed
from .block_curvature import BlockCurvature
from .fisher import FisherTrace
from .fisher_rao import FisherRaoNorm
from .flatness_ratio import FlatnessRatio
from .gap import GapMeter
from .grad_noise_scale import GradientNoiseScale
from .hessian import HessianEigenvalues
from .hessian_min import HessianMinEigenvalue
from .local_entropy import LocalEntropy
from .pacgen import PACGen
from .sample_size import NoisyMeasurementWarning
from .registry import BUILTIN, DEFAULT_METRICS, MetricSpec, check_keys, execution_order, resolve_metrics
from .regret import GradCosineRegret
from .spectral_density import HessianDensity

__all__ = [
    "BUILTIN",
    "DEFAULT_METRICS",
    "FisherTrace",
    "FlatnessMetric",
    "GapMeter",
    "GradCosineRegret",
    "GradientNoiseScale",
    "HessianEigenvalues",
    "LocalEntropy",
    "LogPosition",
    "MeasurementContext",
    "MetricSpec",
    "NoisyMeasurementWarning",
    "PACGen",
    "SharedResults",
    "check_keys",
    "execution_order",
    "measurement_seed",
    "resolve_metrics",
    "samples_needed",
    "BlockCurvature",
    "HessianDensity",
    "AdaptiveSharpness",
    "AdversarialRobustness",
    "FisherRaoNorm",
    "FlatnessRatio",
    "HessianMinEigenvalue",
]
