"""Eval-mode BatchNorm as an explicit affine map, for cheaper double backward passes."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_ARGUMENTS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


class AffineBatchNorm(TorchFunctionMode):
    """Inside, ``F.batch_norm(..., training=False)`` with running statistics is ``x·scale + shift``.

    With fixed statistics batch norm is the per-channel affine map
    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean·scale``: the same
    function with the same derivatives. Autograd differentiates ``native_batch_norm_backward``
    (which also serves training mode) by a long generic formula over the whole activation
    tensor; the explicit form's double backward is two elementwise products, which took a
    Hessian-vector product on a BatchNorm CNN from 3.5 to about 3 gradients (``benchmarks/``).
    Training-mode calls and calls without running statistics are left alone.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = dict(zip(_ARGUMENTS, args), **kwargs)
            if not bound.get("training", False) and bound.get("running_mean") is not None:
                x = bound["input"]
                scale = torch.rsqrt(bound["running_var"] + bound.get("eps", 1e-5))
                if bound.get("weight") is not None:
                    scale = scale * bound["weight"]
                shift = -bound["running_mean"] * scale
                if bound.get("bias") is not None:
                    shift = shift + bound["bias"]
                shape = (1, -1) + (1,) * (x.dim() - 2)
                return x * scale.reshape(shape) + shift.reshape(shape)
        return func(*args, **kwargs)


def affine_batch_norm(model: nn.Module) -> contextlib.AbstractContextManager:
    """:class:`AffineBatchNorm` if ``model`` has a BatchNorm layer, else nothing (no dispatch cost)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return AffineBatchNorm()
    return contextlib.nullcontext()
