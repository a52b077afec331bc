"""What happens when a measurement fails at run time: warn once and skip, or raise (``on_error``)."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

ON_ERROR = ("warn", "raise")


class FailurePolicy:
    """``on_error="warn"``: each failing part warns once and is skipped; ``"raise"``: re-raise.

    One policy serves every part of a callback (each metric, the gap, the landscape views), so
    the rule and its message live in one place.
    """

    def __init__(self, on_error: str, who: str = "FlatnessCallback") -> None:
        self.on_error, self.who = on_error, who
        self._warned: set[str] = set()

    def handle(self, what: str, error: BaseException) -> None:
        """Called in an ``except`` block: re-raises, or warns the first time ``what`` fails."""
        if self.on_error == "raise":
            raise error
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory failure must not starve training
        if what in self._warned:
            return
        self._warned.add(what)
        rank_zero_warn(
            f"{self.who}: {what} failed and is skipped for this measurement ({type(error).__name__}: {error}). "
            f'Further failures of {what} are not reported; pass on_error="raise" to stop instead.'
        )
