"""Argument checks, in one place for the whole package (estimators, metrics, callbacks, the study).

Every check raises at the call that received the bad value (construction time for classes),
naming the argument and what it accepts. A value of the wrong type raises
:class:`ArgumentTypeError`, which is both a ``TypeError`` and a ``ValueError`` (like NumPy's
``AxisError`` is both a ``ValueError`` and an ``IndexError``), so code that catches either
keeps working. User-defined metrics can use the same checks::

    from lightning_flatness.validation import check_float

    class PerturbedLoss(FlatnessMetric):
        def __init__(self, scale: float = 0.01) -> None:
            super().__init__()
            self.scale = check_float("scale", scale, minimum=0.0, inclusive=False)
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Mapping, Sequence, TypeVar

import torch

T = TypeVar("T")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (also a ``ValueError``, which bad values raise)."""


def check_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; bools are not integers here."""
    bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer {bound}, got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}.")
    return int(value)


def check_float(
    name: str,
    value: Any,
    minimum: float = 0.0,
    *,
    inclusive: bool = True,
    maximum: float | None = None,
    inclusive_maximum: bool = True,
) -> float:
    """``value`` as a finite ``float`` ``>= minimum`` (``> minimum`` unless ``inclusive``) and
    ``<= maximum`` (``< maximum`` unless ``inclusive_maximum``)."""
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
    if maximum is not None:
        bound += f" and {'<=' if inclusive_maximum else '<'} {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a finite number {bound}, got {value!r}.")
    low_ok = value >= minimum if inclusive else value > minimum
    high_ok = maximum is None or (value <= maximum if inclusive_maximum else value < maximum)
    if not (math.isfinite(value) and low_ok and high_ok):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def check_choice(name: str, value: T, accepted: Sequence[T]) -> T:
    """``value`` if it is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {list(accepted)}.")
    return value


def check_cache_chunks(value: Any) -> int | str:
    """``"auto"`` or an integer ``>= 0`` (how many mini-batches' gradient graphs a Hessian operator keeps)."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"cache_chunks must be 'auto' or an integer >= 0, got {value!r}.")
        return value
    return check_int("cache_chunks (or 'auto')", value, 0)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}.")
    return value


def check_generator(generator: torch.Generator | int | None) -> torch.Generator:
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
    raise ArgumentTypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}.")


BY_MODULE = "by_module"
_BLOCK_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_block_name(name: Any) -> str:
    """``name`` if it can end a logged key: letters, digits, ``_`` and ``-`` only (no ``/``; no ``.``,
    which a key of the callback's torchmetrics collection cannot contain)."""
    if not isinstance(name, str) or not _BLOCK_NAME.fullmatch(name):
        raise ValueError(
            f"blocks: block name {name!r} is not accepted; use letters, digits, '_' and '-' only "
            "(it ends the logged keys, e.g. flatness/hessian_top_eig/<name>)."
        )
    return name


def check_blocks(blocks: Any) -> str | dict[str, tuple[str, ...]]:
    """``"by_module"``, or ``{block name: (parameter-name glob patterns, ...)}`` from a mapping of
    names to one pattern or a sequence of patterns (checked without the model)."""
    if isinstance(blocks, str):
        if blocks != BY_MODULE:
            raise ValueError(f"blocks={blocks!r} is not accepted; pass {BY_MODULE!r} or a mapping "
                             "{block name: parameter-name glob pattern(s)}.")  # fmt: skip
        return blocks
    if not isinstance(blocks, Mapping) or not blocks:
        raise ArgumentTypeError(f"blocks must be {BY_MODULE!r} or a non-empty mapping {{block name: parameter-name "
                                f"glob pattern(s)}}, e.g. {{'conv': 'features.*'}}, got {blocks!r}.")  # fmt: skip
    out = {}
    for name, patterns in blocks.items():
        pats = (patterns,) if isinstance(patterns, str) else patterns
        if not isinstance(pats, (list, tuple)) or not pats or not all(isinstance(p, str) and p for p in pats):
            raise ArgumentTypeError(f"blocks[{name!r}] must be a glob pattern or a non-empty list of them, "
                                    f"got {patterns!r}.")  # fmt: skip
        out[check_block_name(name)] = tuple(pats)
    return out


SAMPLE_DIMS = (
    "an integer >= 0 (the axis of every tensor of a batch that holds its samples), or a tuple, list or dict that "
    "matches the batch's structure with one such integer per element, as torch.func.vmap's in_dims, e.g. (1, 0) "
    "for batches (x, y) with x of shape (T, B) and y of shape (B,)"
)


def check_sample_dims(name: str, value: Any) -> Any:
    """``value`` if it is an integer >= 0 or a (nested) tuple, list or dict of them (checked without a batch)."""

    def valid(v: Any) -> bool:
        if isinstance(v, (tuple, list)):
            return bool(v) and all(valid(item) for item in v)
        if isinstance(v, Mapping):
            return bool(v) and all(valid(item) for item in v.values())
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0

    if not valid(value):
        raise ArgumentTypeError(f"{name} must be {SAMPLE_DIMS}; got {value!r}.")
    return value
