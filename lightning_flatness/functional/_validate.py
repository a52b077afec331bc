"""Argument checks shared by the estimators: errors name the argument and what is accepted."""

from __future__ import annotations

import numbers

import torch


def check_positive_int(name: str, value: object, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'a non-negative' if allow_zero else 'a positive'} integer, got {value!r}.")
    return int(value)


def check_positive_float(name: str, value: object, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}.")
    return float(value)


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU generator: the one given, one seeded with an int, or a fixed default seed for ``None``.

    Random draws are made on the CPU and moved to the device, so results are identical on
    every device for the same seed.
    """
    if generator is None:
        return torch.Generator().manual_seed(0)
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}.")
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}.")


def rademacher(num: int, dim: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``(num, dim)`` independent ±1 entries, drawn on the CPU, returned like ``like``."""
    z = torch.randint(0, 2, (num, dim), generator=generator, dtype=torch.int8)
    return (2 * z - 1).to(device=like.device, dtype=like.dtype)
