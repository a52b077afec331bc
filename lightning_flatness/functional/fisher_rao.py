"""The Fisher-Rao norm of the weights (Liang, Poggio, Rakhlin & Stokes 2019)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.func import jvp

from ._losses import LossArg
from ._params import unflatten
from ._restore import measurement_mode
from ._stats import MeanAccumulator
from .objective import Objective


@dataclass(frozen=True)
class FisherRaoResult:
    """``value``: ``‖w‖²_fr``, the mean of ``⟨w, ∇ℓ_i⟩²``; ``se``: its standard error over the
    draw of the samples (per-sample values, ``s/√N``). ``forward_mode``: whether the
    directional derivatives came from forward-mode AD (``False``: the double-backward fallback)."""

    value: float
    se: float
    num_samples: int
    forward_mode: bool


def fisher_rao_norm(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> FisherRaoResult:
    r"""The (empirical) Fisher-Rao norm :math:`\|w\|_{fr}^2 = \frac1N\sum_i \langle w, \nabla_w\ell_i(w)\rangle^2`,
    i.e. :math:`w^\top F w` with the empirical Fisher :math:`F = \frac1N\sum_i\nabla\ell_i\nabla\ell_i^\top`.

    :math:`\langle w,\nabla\ell_i\rangle = \frac{d}{dt}\ell_i((1+t)w)|_{t=0}`, so it is unchanged
    by every linear reparametrization ``w ↦ Tw`` that leaves the function unchanged (a ReLU
    layer's weights and biases times ``α``, the next layer's weights times ``1/α``), biases or
    not. For a bias-free network of ``L+1`` layers that is positively homogeneous (ReLU or
    linear activations, no normalization), Euler's theorem gives
    :math:`\langle w,\nabla\ell_i\rangle = (L+1)\langle \partial\ell_i/\partial f, f(x_i)\rangle`,
    a function of the outputs alone (Liang et al. 2019, Lemma 2.1); with biases or
    normalization that identity does not hold.

    All ``B`` directional derivatives of a batch come from one forward-mode pass: the Jacobian-
    vector product of the per-sample loss vector along ``w`` (``torch.func.jvp`` through
    ``functional_call``). Where a layer has no forward-mode rule it falls back, for the whole
    call, to the double-backward trick: ``g(u) = ∇_w (uᵀℓ)`` with a dummy ``u``, then
    ``∂⟨w, g(u)⟩/∂u = J w`` (one forward, two backward passes). Cost: about 1.5 gradients (an MLP, forward mode).

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import fisher_rao_norm
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> batches = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
        >>> fisher_rao_norm(model, batches).value > 0
        True
    """
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        acc, forward_mode = MeanAccumulator(device=objective.device), True
        for batch in objective.iter_batches():
            derivatives, forward_mode = directional_derivatives(objective, batch, objective.w0, forward_mode)
            acc.add(derivatives.pow(2))
        mean, se = acc.result(objective.reduce_sum)
        count = int(objective.reduce_sum(acc.sums[0]).item())
    if count == 0:
        raise ValueError("batches is empty: the loss function returned no samples.")
    if not torch.isfinite(mean).all():
        raise ValueError("loss_fn produced non-finite directional derivatives (NaN or inf).")
    return FisherRaoResult(mean.item(), se.item(), count, forward_mode)


def directional_derivatives(
    objective: Objective, batch: Any, direction: Tensor, forward_mode: bool = True
) -> tuple[Tensor, bool]:
    """``⟨direction, ∇ℓ_i(w0)⟩`` for every sample of one prepared batch, and whether forward mode worked.

    Forward mode (one ``jvp``) is tried when ``forward_mode``; a layer without a forward-mode
    rule (``NotImplementedError``, or a ``RuntimeError`` from an ``autograd.Function`` that
    functorch cannot transform) switches to the double-backward trick.
    """
    if forward_mode:
        try:
            return jvp(lambda w: objective.losses(w, batch), (objective.w0,), (direction,))[1], True
        except (NotImplementedError, RuntimeError):
            pass
    leaves = objective.leaves()
    with torch.enable_grad():
        losses = objective.losses(leaves, batch)
        u = torch.zeros_like(losses, requires_grad=True)
        grads = torch.autograd.grad(
            losses, leaves, grad_outputs=u, create_graph=True, allow_unused=True, materialize_grads=True
        )
        inner = sum((g * d).sum() for g, d in zip(grads, unflatten(direction, objective.shapes), strict=True))
        return torch.autograd.grad(inner, u, allow_unused=True, materialize_grads=True)[0].detach(), False
