"""The gradient noise scale ``B_simple = tr(Σ) / |G|²``, the critical batch size estimate of
McCandlish, Kaplan, Amodei et al. (2018), from per-sample squared gradient norms and the mean gradient."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ._losses import LossArg
from ._per_sample import check_per_sample, per_sample_sq_norms
from ._restore import measurement_mode
from ._stats import MeanAccumulator
from .objective import Objective


@dataclass(frozen=True)
class GradNoiseScaleResult:
    """See :func:`grad_noise_scale`. Standard errors are over the draw of the mini-batches.

    ``value`` is ``inf`` (and ``se`` NaN) when ``grad_sq_norm <= 0``: the mean gradient is not
    resolved above the sampling noise of ``num_samples`` samples (``resolved`` is ``False``).
    """

    value: float
    se: float
    trace_cov: float
    grad_sq_norm: float
    num_samples: int
    n_grad: int
    trace_cov_se: float = math.nan
    grad_sq_norm_se: float = math.nan

    @property
    def resolved(self) -> bool:
        """Whether ``|G|²`` was estimated above 0, so ``value`` is finite."""
        return self.grad_sq_norm > 0


def grad_noise_scale(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    gradient: Tensor | None = None,
    sample_sq_norms: Sequence[Tensor] | None = None,
    batch_gradient_dots: Sequence[float] | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    per_sample: str = "auto",
) -> GradNoiseScaleResult:
    r"""The simple gradient noise scale :math:`B_\text{simple} = \operatorname{tr}\Sigma / |G|^2`.

    :math:`G = \nabla L` is the gradient of the mean loss and :math:`\Sigma` the covariance of the
    per-sample gradients :math:`g_i`; :math:`B_\text{simple}` is the batch size at which the
    gradient's noise and signal are equal, the estimate of the critical batch size of McCandlish,
    Kaplan, Amodei et al., "An empirical model of large-batch training" (2018, arXiv:1812.06162).
    With :math:`S = \frac1n\sum_i|g_i|^2` and :math:`\bar G` the mean gradient over the
    :math:`n` samples, :math:`E|\bar G|^2 = |G|^2 + \operatorname{tr}\Sigma/n` and
    :math:`E S = |G|^2 + \operatorname{tr}\Sigma`, so the unbiased estimates (their Appendix A
    with :math:`B_\text{small} = 1`, :math:`B_\text{big} = n`) are

    .. math:: \widehat{\operatorname{tr}\Sigma} = \tfrac{n}{n-1}(S - |\bar G|^2), \qquad
              \widehat{|G|^2} = |\bar G|^2 - \widehat{\operatorname{tr}\Sigma}/n
              = \tfrac{1}{n(n-1)}\textstyle\sum_{i\ne j} g_i\cdot g_j .

    ``value`` is their ratio (consistent, not unbiased). When :math:`\widehat{|G|^2} \le 0` the
    signal is buried in the noise of ``n`` samples: ``value`` is ``inf`` (never a negative noise
    scale) and ``resolved`` is ``False``; more samples resolve it.

    Standard errors (``se``, ``trace_cov_se``, ``grad_sq_norm_se``): the delta method over the
    draw of the mini-batches (each element of ``batches`` one unit; NaN with fewer than 2), from
    each batch's mean :math:`|g_i|^2` and its mean gradient's projection :math:`\bar g_b\cdot\bar G`.

    Cost: one gradient pass for :math:`\bar G`, one per-sample-norm pass (ghost norms, about
    one gradient, as :func:`fisher_trace`) and one more gradient pass for the projections:
    ``n_grad = 3``. Each input already computed is skipped: ``gradient`` (:math:`\bar G` over
    ``batches``, e.g. :class:`RegretResult`'s), ``sample_sq_norms`` (one tensor of
    :math:`|g_i|^2` per batch, e.g. :class:`FisherResult`'s), ``batch_gradient_dots``
    (:math:`\bar g_b\cdot\bar G` per batch, e.g. :class:`RegretResult`'s); with all three it
    takes no pass over the data. ``per_sample``: how the per-sample norms are computed, as in
    :func:`fisher_trace` (``"auto"``, ``"vmap"`` or ``"loop"``). Under :func:`cross_process_reduction` each process passes its
    shard and the result is the whole subsample's.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import grad_noise_scale
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> batches = [(torch.randn(16, 3), torch.randint(0, 2, (16,))) for _ in range(4)]
        >>> r = grad_noise_scale(model, batches, dtype=torch.float64)
        >>> r.trace_cov > 0 and r.num_samples == 64
        True
    """
    per_sample = check_per_sample(per_sample)
    passes = int(gradient is None) + int(sample_sq_norms is None) + int(batch_gradient_dots is None)
    # With every input given nothing evaluates the model: skip the mode switch (most of the cost then).
    with measurement_mode(model) if passes else contextlib.nullcontext():
        objective = Objective(model, batches, loss_fn, params, dtype)
        mean = (objective.gradient() if gradient is None else _checked_gradient(gradient, objective)).to(torch.float64)
        counts, sq_means = _sq_norm_means(objective, sample_sq_norms, per_sample)
        dots = _projections(objective, mean, counts, batch_gradient_dots)
        return _estimate(objective, mean, counts, sq_means, dots, passes)


def _checked_gradient(gradient: Tensor, objective: Objective) -> Tensor:
    if not isinstance(gradient, Tensor) or gradient.shape != (objective.num_params,):
        raise ValueError(
            f"gradient must be the flat mean gradient over batches, shape ({objective.num_params},), "
            f"got {getattr(gradient, 'shape', type(gradient).__name__)}."
        )
    return gradient


def _sq_norm_means(objective: Objective, given: Sequence[Tensor] | None, per_sample: str) -> tuple[Tensor, Tensor]:
    """Per batch of this process: its sample count and mean ``|g_i|²`` (float64), computed unless given."""
    norms = given if given is not None else [
        per_sample_sq_norms(objective, b, per_sample=per_sample) for b in objective.iter_batches()
    ]
    if len(norms) == 0:
        raise ValueError("batches is empty: pass at least one batch.")
    counts = torch.tensor([float(t.numel()) for t in norms], dtype=torch.float64)
    sums = torch.stack([t.detach().sum(dtype=torch.float64) for t in norms]).cpu()
    return counts, sums / counts


def _projections(objective: Objective, mean: Tensor, counts: Tensor, given: Sequence[float] | None) -> Tensor:
    """``ḡ_b·Ḡ`` for every batch of this process (float64): one gradient pass unless given."""
    if given is None:
        given = [((summed.to(torch.float64) / size) @ mean).item() for summed, size in objective.batch_gradient_sums()]
    dots = torch.tensor([float(d) for d in given], dtype=torch.float64)
    if dots.shape != counts.shape:
        raise ValueError(
            f"batch_gradient_dots has {dots.numel()} entries and sample_sq_norms {counts.numel()}: "
            "both need one entry per batch of batches, in order."
        )
    return dots


def _estimate(
    objective: Objective, mean: Tensor, counts: Tensor, sq_means: Tensor, dots: Tensor, passes: int
) -> GradNoiseScaleResult:
    """The unbiased estimates, their ratio, and the delta-method standard errors over mini-batches."""
    total, n = objective.reduce((counts * sq_means).sum().reshape(1).to(objective.device), int(counts.sum()))
    if n < 2:
        raise ValueError(f"the gradient noise scale needs at least 2 samples, got {n}.")
    s, q, c = total.item() / n, (mean @ mean).item(), n / (n - 1)
    if not math.isfinite(s + q):
        raise ValueError("loss_fn produced non-finite per-sample gradients (NaN or inf).")
    trace = c * (s - q)
    sq_norm = q - trace / n
    value = trace / sq_norm if sq_norm > 0 else math.inf
    # First-order influence of each mini-batch: S moves with its mean |g_i|², |Ḡ|² with 2 ḡ_b·Ḡ.
    infl_trace = c * (sq_means - 2 * dots)
    infl_sq = (1 + c / n) * 2 * dots - (c / n) * sq_means
    infl_value = (infl_trace - value * infl_sq) / sq_norm if sq_norm > 0 else torch.full_like(dots, math.nan)
    acc = MeanAccumulator(3, device=objective.device)
    acc.add(torch.stack([infl_trace, infl_sq, infl_value], 1), counts)
    trace_se, sq_se, value_se = acc.result(objective.reduce_sum)[1].tolist()
    return GradNoiseScaleResult(
        value=value, se=value_se, trace_cov=trace, grad_sq_norm=sq_norm, num_samples=n, n_grad=passes,
        trace_cov_se=trace_se, grad_sq_norm_se=sq_se,
    )  # fmt: skip
