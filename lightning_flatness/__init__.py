"""lightning-flatness: measure loss-landscape flatness and the generalization gap while training."""

from . import functional
from .callback import FlatnessCallback

__version__ = "0.1.0"
__all__ = ["FlatnessCallback", "functional"]
