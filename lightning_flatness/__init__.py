"""lightning-flatness: measure loss-landscape flatness and the generalization gap while training."""

from . import functional
from .callback import FlatnessCallback
from .optim import EntropySGD
from .perturbation import PACGenPerturbation

__version__ = "0.1.0"
__all__ = ["EntropySGD", "FlatnessCallback", "PACGenPerturbation", "functional"]
