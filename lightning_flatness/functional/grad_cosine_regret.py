"""Mini-batch gradient cosine and regret: how much mini-batch gradients disagree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ._losses import LossArg
from .objective import Objective
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

    Cost: one gradient pass over ``batches`` (``n_grad = 1``). Memory: three flat vectors,
    whatever ``M``: every pair mean follows from running sums, e.g.
    :math:`\sum_{i\ne j}\cos(g_i,g_j) = \|\sum_j \hat g_j\|^2 - M` with
    :math:`\hat g_j = g_j/\|g_j\|` (accumulated in float64).

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
        stats, count = _pair_sums(objective)
    p = objective.num_params
    sum_g, sum_unit = stats[:p], stats[p : 2 * p]
    sum_norm, sum_sq_norm, zeros = stats[2 * p :].tolist()
    if count < 2:
        raise ValueError(f"batches must hold at least 2 mini-batches for the regret, got {count}.")
    if not torch.isfinite(stats).all():
        raise ValueError("loss_fn produced a non-finite mini-batch gradient (NaN or inf).")
    if zeros:
        raise ValueError(f"{int(zeros)} mini-batch gradient(s) are exactly zero; their cosine is undefined.")
    pairs = count * (count - 1)
    # Σ_{i≠j} a_i·b_j = (Σ a)·(Σ b) − Σ a_j·b_j, so only running sums are needed (memory O(P)).
    cross_unit = (sum_unit @ sum_unit).item() - count  # Σ_{i≠j} cos(g_i, g_j)
    cross_unit_g = (sum_unit @ sum_g).item() - sum_norm  # Σ_{i≠j} ĝ_i·g_j
    cross_g = (sum_g @ sum_g).item() - sum_sq_norm  # Σ_{i≠j} g_i·g_j
    return RegretResult(
        regret=((count - 1) * sum_norm - cross_unit_g) / pairs,
        regret_sgd=((count - 1) * sum_sq_norm - cross_g) / pairs,
        cosine=cross_unit / pairs,
        n_grad=1,
    )


def _pair_sums(objective: Objective) -> tuple[Tensor, int]:
    """``[Σ g_j, Σ g_j/‖g_j‖, Σ‖g_j‖, Σ‖g_j‖², #zero g_j]`` (float64) and ``M``, over processes."""
    p = objective.num_params
    stats = torch.zeros(2 * p + 3, dtype=torch.float64, device=objective.device)
    count = 0
    for summed, size in objective.batch_gradient_sums():
        g = summed.to(torch.float64) / size
        norm = g.norm()
        stats[:p] += g
        if norm > 0:
            stats[p : 2 * p] += g / norm
        stats[2 * p :] += torch.stack([norm, norm**2, (norm == 0).to(torch.float64)])
        count += 1
    return objective.reduce(stats, count)
