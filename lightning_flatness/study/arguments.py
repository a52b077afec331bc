"""The command line's argument types: thin wrappers over :mod:`lightning_flatness.validation`, so
``sweep`` and ``report`` apply the package's own rule for each value and argparse prints its message."""

from __future__ import annotations

import argparse
from typing import Callable, TypeVar

from ..validation import check_float, check_int

T = TypeVar("T")


def parsed(text: str, parse: Callable[[str], T], check: Callable[[T], T]) -> T:
    """``text`` parsed, then checked; a bad value becomes an ``argparse.ArgumentTypeError`` with the rule's message."""
    try:
        return check(parse(text))
    except ValueError as err:  # also the validation module's ArgumentTypeError
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int(text: str) -> int:
    return parsed(text, int, lambda v: check_int("the value", v, minimum=1))


def nonnegative_int(text: str) -> int:
    return parsed(text, int, lambda v: check_int("the value", v, minimum=0))


def positive_float(text: str) -> float:
    return parsed(text, float, lambda v: check_float("the value", v, 0.0, inclusive=False))


def nonnegative_float(text: str) -> float:
    return parsed(text, float, lambda v: check_float("the value", v, 0.0))


def architecture(text: str) -> str:
    """A ResNet of the architecture study, ``res8x16`` or ``plain8x16`` (:mod:`.resnet`), as given."""
    from .resnet import parse_architecture

    return parsed(text, parse_architecture, lambda arch: arch).name
