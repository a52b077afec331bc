"""What happens when a measurement fails at run time: warn once and skip, or raise (``on_error``).

The one exception is :class:`ConfigurationError`: a setup that can never be measured, found
before the first training step, is refused with its own message whatever ``on_error`` says.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn

ON_ERROR = ("warn", "raise")


class ConfigurationError(ValueError):
    """A setup the callbacks can never measure, refused before training with a message naming the argument
    to change (and what it accepts). Raised whatever ``on_error``; every other failure follows it."""


class FailurePolicy:
    """``on_error="warn"``: each failing part warns once and is skipped; ``"raise"``: re-raise.

    One policy serves every part of a callback (each metric, the gap, the landscape views, the
    hooks themselves), so the rule and its message live in one place.
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

    @contextlib.contextmanager
    def guard(self, what: str, refuse: bool) -> Iterator[None]:
        """Runs a block of a hook under this policy, so that no failure of it stops training.

        ``refuse``: before the first training step, a :class:`ConfigurationError` is raised as it
        is (the setup is refused); later one is handled like any other failure.
        """
        try:
            yield
        except Exception as err:  # noqa: BLE001 - nothing the callback does may stop training
            if refuse and isinstance(err, ConfigurationError):
                raise
            self.handle(what, err)
