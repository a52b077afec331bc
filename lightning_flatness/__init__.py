"""lightning-flatness: measure loss-landscape flatness and the generalization gap while training."""

from . import functional, metrics
from ._failures import ConfigurationError
from ._preflight import LossFnError, UnsupportedStrategyError
from .callback import FlatnessCallback
from .landscape import LandscapeOptions
from .metrics import (
    AdaptiveSharpness,
    AdversarialRobustness,
    BlockCurvature,
    FisherRaoNorm,
    FisherTrace,
    FlatnessMetric,
    FlatnessRatio,
    GradCosineRegret,
    GradientNoiseScale,
    HessianDensity,
    HessianEigenvalues,
    HessianMinEigenvalue,
    LocalEntropy,
    NoisyMeasurementWarning,
    PACGen,
)
from .optim import EntropySGD
from .perturbation import PACGenPerturbation

__version__ = "0.2.0"
__all__ = [
    "BlockCurvature",
    "ConfigurationError",
    "EntropySGD",
    "FisherTrace",
    "FlatnessCallback",
    "FlatnessMetric",
    "GradCosineRegret",
    "GradientNoiseScale",
    "HessianEigenvalues",
    "LandscapeOptions",
    "LocalEntropy",
    "LossFnError",
    "NoisyMeasurementWarning",
    "PACGen",
    "PACGenPerturbation",
    "UnsupportedStrategyError",
    "functional",
    "metrics",
    "HessianDensity",
    "AdaptiveSharpness",
    "AdversarialRobustness",
    "FisherRaoNorm",
    "FlatnessRatio",
    "HessianMinEigenvalue",
]
