"""Average-case adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023), by Monte Carlo."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..validation import check_bool, check_float, check_generator, check_int
from ._losses import LossArg
from ._restore import measurement_mode
from ._stats import Reduce
from .objective import Objective

# Normalization layers (their scales and shifts are left unperturbed with ``without_normalization``).
NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass(frozen=True)
class AdaptiveSharpnessResult:
    """``value``: the estimate of ``S``; ``se``: its standard error, ``√(se_draws² + se_samples²)``.

    ``se_draws``: the Monte-Carlo part (the subsample held fixed, the perturbations redrawn);
    ``se_samples``: the part from the draw of the subsample. ``loss``: ``L(w)``. ``num_draws``:
    perturbed loss passes over ``batches`` (``num_draws // 2`` antithetic pairs with
    ``antithetic=True``); ``n_forward = num_draws + 1`` forward passes in all, no backward pass.
    """

    value: float
    se: float
    num_draws: int
    se_draws: float
    se_samples: float
    loss: float
    rho: float
    eta: float
    antithetic: bool

    @property
    def n_forward(self) -> int:
        return self.num_draws + 1


def without_normalization(model: nn.Module) -> list[Tensor]:
    """The trainable parameters of ``model`` that do not belong to a normalization layer.

    Pass as ``params=`` to perturb only the weights (and biases) of the other layers, as in
    some variants of Andriushchenko et al. (2023): a normalization layer's scale acts on
    activations that are already normalized, so its "relative" size is of another kind.
    """
    skipped = {id(p) for m in model.modules() if isinstance(m, NORMALIZATION_LAYERS) for p in m.parameters()}
    kept = [p for p in model.parameters() if p.requires_grad and id(p) not in skipped]
    if not kept:
        raise ValueError("model has no trainable parameter outside its normalization layers to perturb.")
    return kept


def adaptive_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    rho: float = 0.1,
    num_draws: int = 16,
    antithetic: bool = True,
    eta: float = 0.0,
    generator: torch.Generator | int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> AdaptiveSharpnessResult:
    r"""Average-case adaptive sharpness :math:`S = E_\delta[L(w + (|w|+\eta)\odot\delta)] - L(w)`,
    :math:`\delta\sim N(0,\rho^2 I)`.

    The perturbation of each weight is proportional to its magnitude, so ``S`` does not change
    under a rescaling that leaves the function unchanged (a ReLU layer's weights and biases
    times ``α``, the next layer's weights times ``1/α``): with ``η = 0``,
    :math:`w' + |w'|\odot\delta = T(w + |w|\odot\delta)` for the positive diagonal ``T``, so
    every perturbed loss is the same. To second order
    :math:`S \approx \frac{\rho^2}{2}\sum_i (|w_i|+\eta)^2 H_{ii}` (exact for a quadratic loss).

    Estimator: with ``antithetic=True`` the draws come in pairs :math:`(\delta_k, -\delta_k)`,
    ``K = num_draws / 2`` of them, and each pair contributes, per sample ``i``,
    :math:`d_{ik} = \tfrac12[\ell_i(w+s\odot\delta_k) + \ell_i(w-s\odot\delta_k)] - \ell_i(w)`
    (``s = |w| + η``); otherwise ``K = num_draws`` draws with
    :math:`d_{ik} = \ell_i(w+s\odot\delta_k) - \ell_i(w)`. ``value`` is the mean of the
    ``N × K`` table: unbiased for ``S`` either way (each perturbed point has the law of
    :math:`w + s\odot\delta`); the pairs cancel every odd-order term of the Taylor expansion
    (the gradient's, which dominates the noise of a single draw) exactly, draw by draw.

    Standard error: the table is a crossed design (samples × draws), analysed by the two-way
    random-effects ANOVA with mean squares ``MS_A`` (samples), ``MS_B`` (draws) and ``MS_E``
    (interaction): :math:`Var = \sigma_A^2/N + \sigma_B^2/K + \sigma_E^2/(NK)` is estimated
    without bias by ``(MS_A + MS_B - MS_E)/(NK)``, split into ``se_draws² = MS_B/(NK)`` (the
    spread over redrawn perturbations for this subsample: ``s²/K`` of the ``K`` draw means) and
    ``se_samples² = max(MS_A - MS_E, 0)/(NK)`` (from redrawing the subsample). Pairs are the
    units of the draw axis, so the pairing's correlation is accounted for. Every sum adds over
    processes, so under DDP it equals the single-process error.

    Cost: ``num_draws + 1`` forward passes over ``batches`` (each about 0.46 of a gradient on
    the sweep's MLP: 8.5 gradients at ``num_draws=16``), no backward pass; memory: one flat
    parameter vector at a time and ``N × K`` numbers.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import adaptive_sharpness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> batches = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
        >>> result = adaptive_sharpness(model, batches, rho=0.1, num_draws=8, generator=0)
        >>> result.num_draws, result.n_forward
        (8, 9)
    """
    opts = checked_options(rho, num_draws, antithetic, eta)
    gen = check_generator(generator)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        table, loss = _difference_table(objective, gen, **opts)
        value, se_draws, se_samples = crossed_mean_and_se(table, objective.reduce_sum)
    if not math.isfinite(value):
        raise ValueError(
            f"loss_fn produced a non-finite loss at w or at a perturbed point (NaN or inf); rho={rho} may be too large."
        )
    se = math.sqrt(se_draws**2 + se_samples**2)
    return AdaptiveSharpnessResult(
        value, se, num_draws, se_draws, se_samples, loss, opts["rho"], opts["eta"], antithetic
    )


def checked_options(rho: object, num_draws: object, antithetic: object, eta: object) -> dict[str, Any]:
    """The options of :func:`adaptive_sharpness`, validated (also by the metric, at construction)."""
    antithetic = check_bool("antithetic", antithetic)
    num_draws = check_int("num_draws", num_draws, 2 if antithetic else 1)
    if antithetic and num_draws % 2:
        raise ValueError(f"num_draws must be even with antithetic=True (pairs of draws), got {num_draws}.")
    return {
        "rho": check_float("rho", rho, inclusive=False), "num_draws": num_draws, "antithetic": antithetic,
        "eta": check_float("eta", eta),
    }  # fmt: skip


@torch.no_grad()
def sample_losses(objective: Objective, at: Tensor | None = None) -> Tensor:
    """Every per-sample loss of this process's batches at ``at`` (default ``w0``), float64, ``(N,)``."""
    w = objective.w0 if at is None else at
    parts = [objective.losses(w, batch).to(torch.float64) for batch in objective.iter_batches()]
    return torch.cat(parts)


def _difference_table(
    objective: Objective, gen: torch.Generator, rho: float, num_draws: int, antithetic: bool, eta: float
) -> tuple[Tensor, float]:
    """The ``(N, K)`` table ``d_ik`` (float64, this process's samples) and ``L(w)`` over all processes."""
    w0 = objective.w0
    scale = w0.abs() + eta
    base = sample_losses(objective)
    columns = []
    for _ in range(num_draws // 2 if antithetic else num_draws):
        # Drawn in float64 on the CPU: the same numbers on every device, process and dtype.
        step = scale * torch.randn(w0.numel(), generator=gen, dtype=torch.float64).mul_(rho).to(w0)
        moved = sample_losses(objective, w0 + step)
        if antithetic:
            moved = (moved + sample_losses(objective, w0 - step)) / 2
        columns.append(moved - base)
    total, count = objective.reduce(base.sum().reshape(1), base.numel())
    if count == 0:
        raise ValueError("batches is empty: the loss function returned no samples.")
    return torch.stack(columns, dim=1), total.item() / count


def crossed_mean_and_se(table: Tensor, reduce: Reduce | None = None) -> tuple[float, float, float]:
    """``(mean, se_draws, se_samples)`` of an ``(N, K)`` samples-by-draws table (see :func:`adaptive_sharpness`).

    Rows may be split over processes: ``reduce`` sums a tensor over them (``None``: one process).
    Two reductions: the column sums and ``N`` first, then the two sums of squares about the
    means they give. ``se_draws`` is NaN for ``K = 1``, ``se_samples`` for ``N = 1``.
    """
    reduce = reduce or (lambda t: t)
    k = table.shape[1]
    first = reduce(
        torch.cat([table.sum(0), torch.tensor([float(table.shape[0])], dtype=table.dtype, device=table.device)])
    )
    n = int(first[-1].item())
    cols = first[:k] / n
    mean = cols.mean()
    rows = table.mean(1)
    resid = table - rows[:, None] - cols[None, :] + mean
    rows_ss, resid_ss = reduce(torch.stack([(rows - mean).pow(2).sum(), resid.pow(2).sum()])).tolist()
    cols_ss = (cols - mean).pow(2).sum().item()
    nan = math.nan
    se_draws = math.sqrt(cols_ss / (k * (k - 1))) if k > 1 else nan  # MS_B / (NK) = s²(col means) / K
    if n < 2:
        return mean.item(), se_draws, nan
    ms_a = k * rows_ss / (n - 1)
    ms_e = resid_ss / ((n - 1) * (k - 1)) if k > 1 else 0.0  # K = 1: the interaction is inside MS_A
    return mean.item(), se_draws, math.sqrt(max(ms_a - ms_e, 0.0) / (n * k))
