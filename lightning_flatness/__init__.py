"""lightning-flatness: measure loss-landscape flatness and the generalization gap while training."""

from . import functional, metrics
from ._preflight import LossFnError, UnsupportedStrategyError
from .callback import FlatnessCallback
from .landscape import LandscapeOptions
from .metrics import FisherTrace, FlatnessMetric, GradCosineRegret, HessianEigenvalues, LocalEntropy, PACGen
from .metrics import GradientNoiseScale
from .optim import EntropySGD
from .perturbation import PACGenPerturbation

__version__ = "0.2.0"
__all__ = [
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
    "PACGen",
    "PACGenPerturbation",
    "UnsupportedStrategyError",
    "functional",
    "metrics",
]
