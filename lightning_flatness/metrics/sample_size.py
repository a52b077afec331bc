"""How many samples a value's standard error asks for: the callback's notice and the report's guide.

A mean over ``n`` samples has a standard error ``∝ 1/√n``: a value measured on ``n`` samples
with relative error ``r = se/|value|`` needs about ``n·(r/target)²`` for ``target``
(:func:`~lightning_flatness.metrics.samples_needed`). When that is more than the data set holds,
more samples cannot help, and this says what can.
"""

from __future__ import annotations

import math

from .. import keys
from .base import samples_needed

# What narrows an error bar when the data set is exhausted: the callback's notice and the report say it.
BEYOND_THE_DATA = (
    "average the value over runs with several seeds (the error of a mean of m independent runs falls as 1/√m) "
    "or measure on a larger data set"
)


class NoisyMeasurementWarning(UserWarning):
    """A logged value's standard error is above ``keys.RELATIVE_SE_WARNING`` (20%) of the value.

    :class:`~lightning_flatness.FlatnessCallback` warns once per key (the top Hessian eigenvalue,
    the regret, the Fisher trace, the gap's losses) and says how many samples would bring the
    relative error under 5%, how many the subsample holds and how many the data set holds.

    The ``±`` is the standard error over the draw of the measurement subsample (``<key>_se``): how
    much the value would move with another subsample of the same size. What helps:

    - more samples: ``FlatnessCallback(num_samples=...)`` for ``flatness/*``,
      ``gap_num_samples=...`` for ``gap/*`` (each at most the data set it is drawn from);
    - when even the whole data set is not enough: average over runs with several seeds (``sweep
      --seeds N`` in the study app), or a larger data set. With the whole training set measured,
      the value is exact for that training set; the ``±`` then says how it would vary with
      another training set of that size;
    - nothing, if a 20% error is fine for what you compare: silence the notice with
      ``warnings.filterwarnings("ignore", category=lightning_flatness.NoisyMeasurementWarning)``.

    The method behind every ``_se``: the README's *Logged keys* and ``docs/metrics.md``
    (*Standard errors*) in the source distribution.
    """


def percent(ratio: float) -> str:
    """``ratio`` in whole percents, as the notice prints it (``0.2004`` -> ``"20%"``)."""
    return f"{ratio:.0%}"


def is_noisy(value: float, se: float) -> bool:
    """Whether ``se / |value|``, as printed, is above ``keys.RELATIVE_SE_WARNING``: compared on the
    printed percent, so the notice never reads "20%, above 20%"."""
    if not (math.isfinite(value) and math.isfinite(se)) or value == 0:
        return False
    return int(percent(abs(se / value))[:-1]) > int(percent(keys.RELATIVE_SE_WARNING)[:-1])


def noisy_notice(key: str, value: float, se: float, measured_on: int, option: str, asked: int,
                 available: int | None, data: str) -> str:  # fmt: skip
    """The callback's notice for ``key``: its relative error, the samples it was measured on and would
    need, and, when those are more than ``data`` (the data set, ``available`` samples) holds, what else helps."""
    target = keys.RELATIVE_SE_TARGET
    needed = samples_needed(measured_on, value, se, target)
    text = (f"FlatnessCallback: {key} = {value:.4g} ± {se:.2g}, a relative standard error of "
            f"{percent(abs(se / value))} (over the draw of its {measured_on} samples; {option}={asked}). About "
            f"{needed} samples would bring it under {percent(target)}")  # fmt: skip
    if available is None or needed is None or needed <= available:
        held = "" if available is None else f"; the {data} holds {available}"
        text += f": raise {option}{held}."
    else:
        text += f", more than the {available} samples the {data} holds: "
        if measured_on < available:
            whole = abs(se / value) * math.sqrt(measured_on / available)
            text += f"all of them ({option}={available}) would bring it to about {percent(whole)}; beyond that, "
        text += f"{BEYOND_THE_DATA}."
    return text + " Once per key; help(lightning_flatness.NoisyMeasurementWarning) says more."
