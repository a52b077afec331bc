"""lightning-flatness: measure loss-landscape flatness and the generalization gap while training."""

from . import functional

__version__ = "0.1.0"
__all__ = ["functional"]
