"""Validation of :class:`~lightning_flatness.FlatnessCallback` arguments, at construction time.

Every error is a ``ValueError`` that names the argument and what it accepts.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

from .functional._losses import BUILTIN_LOSSES, resolve_loss_fn
from .metrics import KNOWN_METRICS

SOURCES = ("train", "val")
ON_ERROR = ("warn", "raise")
FISHER_KINDS = ("empirical", "mc")


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _float(name: str, value: Any, *, allow_zero: bool, maximum: float | None = None) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value
    ok = ok and (value >= 0 if allow_zero else value > 0) and value != float("inf")
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bound = (">= 0" if allow_zero else "> 0") + (f" and <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)


def _choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {list(accepted)}.")
    return value


def validate(args: dict[str, Any]) -> dict[str, Any]:
    """Checked and normalized constructor arguments."""
    out = dict(args)
    metrics = args["metrics"]
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, (list, tuple)):
        raise ValueError(f"metrics must be a list of names from {list(KNOWN_METRICS)}, got {metrics!r}.")
    for name in metrics:
        if name not in KNOWN_METRICS:
            raise ValueError(f"metrics contains unknown metric {name!r}; accepted: {list(KNOWN_METRICS)}.")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics lists a metric twice: {list(metrics)}.")
    out["metrics"] = tuple(metrics)
    out["every_n_epochs"] = _int("every_n_epochs", args["every_n_epochs"], 0)
    out["num_samples"] = _int("num_samples", args["num_samples"], 1)
    out["batch_size"] = _int("batch_size", args["batch_size"], 1)
    if "grad_cosine_regret" in metrics and out["num_samples"] < 2 * out["batch_size"]:
        raise ValueError(
            f"num_samples={out['num_samples']} must be at least 2 * batch_size = {2 * out['batch_size']} when "
            '"grad_cosine_regret" is measured (it compares at least 2 mini-batches of batch_size samples).'
        )
    out["source"] = _choice("source", args["source"], SOURCES)
    loss_fn = args["loss_fn"]
    try:
        resolve_loss_fn(loss_fn)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"loss_fn={loss_fn!r} is not accepted; use one of {sorted(BUILTIN_LOSSES)} or a callable "
            "loss_fn(model, batch) returning per-sample losses of shape (B,)."
        ) from err
    out["gap_num_samples"] = _int("gap_num_samples", args["gap_num_samples"], 0)
    out["seed"] = _int("seed", args["seed"], 0)
    out["k"] = _int("k", args["k"], 1)
    out["tol"] = _float("tol", args["tol"], allow_zero=False)
    out["max_iter"] = _int("max_iter", args["max_iter"], 1)
    if out["max_iter"] < out["k"]:
        raise ValueError(f"max_iter={out['max_iter']} must be >= k={out['k']}.")
    out["cache_chunks"] = _int("cache_chunks", args["cache_chunks"], 0)
    out["kind"] = _choice("kind", args["kind"], FISHER_KINDS)
    out["gamma"] = _float("gamma", args["gamma"], allow_zero=True)
    out["eps"] = _float("eps", args["eps"], allow_zero=False)
    if args["rho"] is not None:
        out["rho"] = _float("rho", args["rho"], allow_zero=True)
    out["num_probes"] = _int("num_probes", args["num_probes"], 1)
    if args["max_overhead"] is not None:
        out["max_overhead"] = _float("max_overhead", args["max_overhead"], allow_zero=False, maximum=1.0)
    out["entropy_gamma"] = _float("entropy_gamma", args["entropy_gamma"], allow_zero=False)
    out["entropy_noise"] = _float("entropy_noise", args["entropy_noise"], allow_zero=False)
    out["entropy_step_size"] = _float("entropy_step_size", args["entropy_step_size"], allow_zero=False)
    out["entropy_steps"] = _int("entropy_steps", args["entropy_steps"], 4)
    out["on_error"] = _choice("on_error", args["on_error"], ON_ERROR)
    out["landscape_every_n_epochs"] = _int("landscape_every_n_epochs", args["landscape_every_n_epochs"], -1)
    out["landscape_steps"] = _int("landscape_steps", args["landscape_steps"], 2)
    out["landscape_span"] = _float("landscape_span", args["landscape_span"], allow_zero=False)
    out["landscape_2d_steps"] = _int("landscape_2d_steps", args["landscape_2d_steps"], 2)
    out["landscape_eig_span"] = _float("landscape_eig_span", args["landscape_eig_span"], allow_zero=False)
    if not isinstance(args["landscape_2d"], bool):
        raise ValueError(f"landscape_2d must be True or False, got {args['landscape_2d']!r}.")
    if not isinstance(args["pacgen_screen"], bool):
        raise ValueError(f"pacgen_screen must be True or False, got {args['pacgen_screen']!r}.")
    if not isinstance(args["measure_at_start"], bool):
        raise ValueError(f"measure_at_start must be True or False, got {args['measure_at_start']!r}.")
    return out
