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


_UNSET = object()


def _compiled_entries(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """``(module, attribute, its eager value)`` for every compiled entry point in ``model``: a
    ``torch.compile``d submodule (``OptimizedModule.forward``), a module compiled in place
    (``Module.compile()``'s ``_compiled_call_impl``) and a LightningModule compiled whole
    (Lightning's ``from_compiled`` keeps the eager ``forward`` in ``_compiler_ctx``)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        OptimizedModule = ()  # noqa: N806
    out = []
    for m in model.modules():
        if isinstance(m, OptimizedModule) and _compiled(m.__dict__.get("forward")):
            out.append((m, "forward", m._orig_mod.__call__))
        if getattr(m, "_compiled_call_impl", None) is not None:
            out.append((m, "_compiled_call_impl", None))
        ctx = getattr(m, "_compiler_ctx", None)
        if isinstance(ctx, dict) and callable(ctx.get("original_forward")) and _compiled(m.__dict__.get("forward")):
            out.append((m, "forward", ctx["original_forward"]))
    return out


def _compiled(forward: object) -> bool:
    """Whether ``forward`` is still Dynamo's wrapper (or the lazy check in front of it), not a ``forward`` user
    code set since: that one is left alone."""
    target = getattr(forward, "__func__", None)
    if target is not None and getattr(target, "__name__", "") == "_call_lazy_check":
        return True
    return hasattr(forward, "_torchdynamo_orig_callable")


@contextlib.contextmanager
def eager_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Compiled parts of ``model`` run as their original eager modules (same parameters) in the block.

    A compiled graph cannot be differentiated twice (AOTAutograd), and calling it in eval mode or
    with substituted parameters would compile new graphs, which the training loop would then
    guard against or recompile. The entry points are switched on the instances and put back on
    exit, so training runs its own compiled code, untouched.
    """
    entries = _compiled_entries(model)
    saved = [(m, name, m.__dict__.get(name, _UNSET)) for m, name, _ in entries]
    try:
        for m, name, eager in entries:
            m.__dict__[name] = eager
        yield model
    finally:
        for m, name, value in reversed(saved):
            if value is _UNSET:
                m.__dict__.pop(name, None)
            else:
                m.__dict__[name] = value


def _device_types(model: nn.Module) -> set[str]:
    return {t.device.type for t in list(model.parameters()) + list(model.buffers())} | {"cpu"}


@contextlib.contextmanager
def measurement_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with autocast off and its compiled parts eager (:func:`eager_modules`),
    and restore everything on exit.

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
    autocast_off.enter_context(eager_modules(model))
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
