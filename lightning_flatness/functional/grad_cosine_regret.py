"""Mini-batch gradient cosine and regret: how much mini-batch gradients disagree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ._losses import LossArg
from ._restore import measurement_mode
from ._stats import MeanAccumulator
from .objective import Objective


@dataclass(frozen=True)
class RegretResult:
    """Means over ordered pairs of distinct mini-batches; see :func:`grad_cosine_regret`.

    ``*_se``: standard errors over the draw of the mini-batches (NaN with ``stderr=False``).
    """

    regret: float
    regret_sgd: float
    cosine: float
    n_grad: int
    regret_se: float = math.nan
    regret_sgd_se: float = math.nan
    cosine_se: float = math.nan
    gradient: Tensor | None = field(default=None, repr=False)  # ∇L over all of ``batches`` (flat), from the same pass
    # ḡ_b·∇L for each mini-batch of this process, from the standard errors' pass (for grad_noise_scale)
    batch_gradient_dots: tuple[float, ...] | None = field(default=None, repr=False, compare=False)


def grad_cosine_regret(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    stderr: bool = True,
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

    Cost: one gradient pass over ``batches``, two with ``stderr`` (``n_grad``). Memory: three
    flat vectors, whatever ``M``: every pair mean follows from running sums, e.g.
    :math:`\sum_{i\ne j}\cos(g_i,g_j) = \|\sum_j \hat g_j\|^2 - M` with
    :math:`\hat g_j = g_j/\|g_j\|` (accumulated in float64).

    ``stderr`` (default): the standard errors over the draw of the mini-batches. Each pair mean is
    a U-statistic, with variance ``4 Var(h₁)/M`` to first order, ``h₁(j)`` the mean pair term of
    the pairs that contain batch ``j`` (Hoeffding 1948); a second gradient pass projects each
    ``g_j`` on the final sums, which is all ``h₁(j)`` needs. On the test models it matched the
    spread over redrawn subsamples within 10% (``tests/functional/test_standard_errors.py``).

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
        stats, count, gradient = _pair_sums(objective)
        p = objective.num_params
        sum_g, sum_unit = stats[:p], stats[p : 2 * p]
        sum_norm, sum_sq_norm, zeros = stats[2 * p :].tolist()
        if count < 2:
            raise ValueError(f"batches must hold at least 2 mini-batches for the regret, got {count}.")
        if zeros:
            raise ValueError(f"{int(zeros)} mini-batch gradient(s) are exactly zero; their cosine is undefined.")
        dots = ((sum_unit @ sum_unit).item(), (sum_unit @ sum_g).item(), (sum_g @ sum_g).item())
        values = _pair_means(count, sum_norm, sum_sq_norm, *dots)
        se, projections = (math.nan,) * 3, None
        if stderr:
            se, projections = _hoeffding_se(objective, sum_unit, sum_g, count, sum_norm, sum_sq_norm, gradient)
    return RegretResult(
        *values, n_grad=2 if stderr else 1, regret_se=se[0], regret_sgd_se=se[1], cosine_se=se[2], gradient=gradient,
        batch_gradient_dots=projections,
    )  # fmt: skip


def _pair_means(
    count: float, sum_norm: float, sum_sq_norm: float, uu: float, ug: float, gg: float
) -> tuple[float, float, float]:
    """``(regret, regret_sgd, cosine)`` from the sums over mini-batches and the dot products of the vector sums.

    ``Σ_{i≠j} a_i·b_j = (Σ a)·(Σ b) − Σ a_j·b_j``, so only running sums are needed (memory O(P)).
    """
    pairs = count * (count - 1)
    cross_unit = uu - count  # Σ_{i≠j} cos(g_i, g_j)
    cross_unit_g = ug - sum_norm  # Σ_{i≠j} ĝ_i·g_j
    cross_g = gg - sum_sq_norm  # Σ_{i≠j} g_i·g_j
    return ((count - 1) * sum_norm - cross_unit_g) / pairs, ((count - 1) * sum_sq_norm - cross_g) / pairs, cross_unit / pairs


def _hoeffding_se(
    objective: Objective, sum_unit: Tensor, sum_g: Tensor, count: int, sum_norm: float, sum_sq_norm: float,
    gradient: Tensor,
) -> tuple[tuple[float, float, float], tuple[float, ...]]:  # fmt: skip
    """Standard errors of ``(regret, regret_sgd, cosine)`` over the draw of the mini-batches, and
    each mini-batch gradient's projection ``ḡ_b·∇L`` (this process's; the noise scale's error bar).

    Each is a U-statistic over pairs of mini-batches, whose variance is, to first order,
    ``4 Var_j(h₁(j)) / M`` with ``h₁(j)`` the mean of the symmetrized pair term over the pairs
    that contain batch ``j`` (Hoeffding 1948; the delta method for U-statistics). ``h₁(j)``
    needs ``g_j``'s projections on the final sums: a second gradient pass.
    """
    m = count
    acc = MeanAccumulator(3)
    mean, dots = gradient.to(torch.float64), []
    for summed, size in objective.batch_gradient_sums():
        g = summed.to(torch.float64) / size
        dots.append((g @ mean).item())
        n = g.norm()
        u = g / n
        gu, ug, gg = (g @ sum_unit).item(), (u @ sum_g).item(), (g @ sum_g).item()
        n = n.item()
        h1 = (
            (m * n - gu - ug + sum_norm) / 2,  # regret: ‖g_j‖ − ĝ_i·g_j, both ways round
            (m * n * n - 2 * gg + sum_sq_norm) / 2,  # regret_sgd: ‖g_j‖² − g_i·g_j, both ways round
            gu / n - 1,  # cosine: ĝ_i·ĝ_j
        )
        acc.add(torch.tensor([h1], dtype=torch.float64) / (m - 1))
    se = acc.result(lambda sums: objective.reduce_sum(sums.to(objective.device)).cpu())[1]  # s(h₁) / √M
    return tuple((2 * se).tolist()), tuple(dots)


def _pair_sums(objective: Objective) -> tuple[Tensor, int, Tensor]:
    """``[Σ g_j, Σ g_j/‖g_j‖, Σ‖g_j‖, Σ‖g_j‖², #zero g_j]`` (float64) and ``M``, over processes; and
    ``∇L`` from the same pass, bit for bit what :meth:`Objective.gradient` computes."""
    p = objective.num_params
    stats = torch.zeros(2 * p + 3, dtype=torch.float64, device=objective.device)
    count, samples, total = 0, 0, None
    for summed, size in objective.batch_gradient_sums():
        g = summed.to(torch.float64) / size
        norm = g.norm()
        stats[:p] += g
        if norm > 0:
            stats[p : 2 * p] += g / norm
        stats[2 * p :] += torch.stack([norm, norm**2, (norm == 0).to(torch.float64)])
        count += 1
        total = summed if total is None else total.add_(summed)  # as Objective.gradient: the first chunk's buffer
        samples += size
    stats, count = objective.reduce(stats, count)
    assert total is not None  # iter_batches raises on no batches
    if not torch.isfinite(stats).all():
        raise ValueError("loss_fn produced a non-finite mini-batch gradient (NaN or inf).")
    return stats, count, objective.average(total, samples, "gradient")
