"""Deprecated location of the estimators' argument checks: see :mod:`lightning_flatness.validation`."""

from __future__ import annotations

from ..validation import check_float, check_generator, check_int

make_generator = check_generator


def check_positive_int(name: str, value: object, allow_zero: bool = False) -> int:
    return check_int(name, value, 0 if allow_zero else 1)


def check_positive_float(name: str, value: object, allow_zero: bool = False) -> float:
    return check_float(name, value, 0.0, inclusive=allow_zero)
