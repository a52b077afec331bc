"""A context manager that measures a model without leaving a trace on it."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _math_attention() -> contextlib.AbstractContextManager:
    """Scaled-dot-product attention through its plain (math) kernel.

    The fused kernels (flash, memory-efficient) have no double backward and no ``vmap`` rule,
    so Hessian-vector products through them fail and per-sample gradients fall back to a loop.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no selector, the kernel choice is left to torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _device_types(model: nn.Module) -> set[str]:
    return {t.device.type for t in list(model.parameters()) + list(model.buffers())} | {"cpu"}


@contextlib.contextmanager
def measurement_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with autocast off, and restore everything on exit.

    Attention runs through the math kernel (the fused ones cannot be differentiated twice).
    Restored: every submodule's ``training`` flag, each parameter's ``.grad``, parameter and
    buffer values (BatchNorm running statistics included), and the global CPU and CUDA RNG
    states. Estimators never write to the model (they evaluate it functionally), so restoring
    values is a safeguard against user loss functions with side effects.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    saved = [(t, t.detach().clone()) for t in params + list(model.buffers())]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    autocast_off = contextlib.ExitStack()
    for device_type in _device_types(model):
        autocast_off.enter_context(torch.autocast(device_type=device_type, enabled=False))
    autocast_off.enter_context(_math_attention())
    try:
        model.eval()
        with autocast_off:
            yield model
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                if not torch.equal(tensor, value):
                    tensor.copy_(value)
        for p, g in zip(params, grads):
            p.grad = g
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
