"""Mini-batch gradient cosine and regret: how much mini-batch gradients disagree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ._losses import LossArg
from ._objective import Objective
from ._restore import measurement_mode


@dataclass(frozen=True)
class RegretResult:
    """Means over ordered pairs of distinct mini-batches; see :func:`grad_cosine_regret`."""

    regret: float
    regret_sgd: float
    cosine: float
    n_grad: int


def grad_cosine_regret(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> RegretResult:
    r"""Agreement of mini-batch gradients, with each element of ``batches`` one mini-batch.

    With :math:`g_j` the mean-loss gradient of mini-batch :math:`j = 1..M` (:math:`M \ge 2`)
    and means over the :math:`M(M-1)` ordered pairs :math:`i \ne j`:

    * ``cosine`` :math:`= \operatorname{mean}\cos(g_i, g_j)`;
    * ``regret`` :math:`= \operatorname{mean}\|g_j\|\,(1-\cos(g_i, g_j))` — the first-order
      decrease of mini-batch :math:`j`'s loss forgone, per unit step length, by stepping along
      :math:`-g_i/\|g_i\|` instead of :math:`-g_j/\|g_j\|` (the "local regret" of
      inference.vc, "A ratio of flatnesses"); 0 when all mini-batches agree in direction;
    * ``regret_sgd`` :math:`= \operatorname{mean}(\|g_j\|^2 - g_i\cdot g_j)` — the same for
      an SGD step :math:`-\eta g_i`, per unit :math:`\eta`.

    Cost: one gradient pass over ``batches`` (``n_grad = 1``); memory ``M`` flat vectors.
    All pair statistics come from the ``M x M`` Gram matrix, computed in float64.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import grad_cosine_regret
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(4)]
        >>> r = grad_cosine_regret(model, batches)
        >>> -1 <= r.cosine <= 1 and r.regret >= 0
        True
    """
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        grads = objective.batch_gradients()
    if len(grads) < 2:
        raise ValueError(f"batches must hold at least 2 mini-batches for the regret, got {len(grads)}.")
    g = torch.stack(grads).to(torch.float64)
    gram = g @ g.T
    sq_norms = gram.diagonal()
    if (sq_norms == 0).any():
        zero = (sq_norms == 0).nonzero().flatten().tolist()
        raise ValueError(f"mini-batch gradients {zero} are exactly zero; their cosine is undefined.")
    norms = sq_norms.sqrt()
    cos = gram / (norms[:, None] * norms[None, :])  # cos[i, j]
    off = ~torch.eye(len(grads), dtype=torch.bool, device=g.device)
    regret = norms[None, :] * (1 - cos)  # [i, j] -> ||g_j|| (1 - cos(g_i, g_j))
    regret_sgd = sq_norms[None, :] - gram
    return RegretResult(
        regret=regret[off].mean().item(),
        regret_sgd=regret_sgd[off].mean().item(),
        cosine=cos[off].mean().item(),
        n_grad=1,
    )
