"""Trace of the Fisher information from per-sample gradients (empirical or Monte Carlo)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..validation import check_choice, check_generator, check_int
from ._losses import LossArg, resolve_loss_fn
from ._per_sample import check_per_sample, per_sample_path, per_sample_sq_norms
from ._restore import measurement_mode
from ._stats import MeanAccumulator
from .objective import Objective

KINDS = ("empirical", "mc")
# The losses whose predictive distribution kind="mc" samples labels from.
MC_LOSSES = ("cross_entropy", "bce_with_logits", "mse")
# SplitMix64's increment: consecutive mini-batch indices get well-separated generator seeds.
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class FisherResult:
    """``value`` = the trace estimate, ``se`` = its standard error over the draw of the samples
    (and, with ``kind="mc"``, of the labels): per-sample values, ``s / √N``."""

    value: float
    n_grad: int
    se: float = float("nan")
    # kind="empirical": ‖∇ℓ_i‖² of every sample, one tensor per batch of this process (for grad_noise_scale)
    sample_sq_norms: tuple[Tensor, ...] | None = field(default=None, repr=False, compare=False)
    # how the per-sample norms were computed: "ghost", "ghost+vmap", "ghost+loop", "vmap" or "loop"
    per_sample_path: str = ""


def fisher_trace(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    kind: str = "empirical",
    num_samples: int = 1,
    generator: torch.Generator | int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    batch_indices: Sequence[int] | None = None,
    per_sample: str = "auto",
) -> FisherResult:
    r"""Trace of the (empirical or true) Fisher information of the per-sample loss.

    * ``kind="empirical"``: :math:`\frac1N\sum_n\|\nabla\ell_n(w)\|^2` with the data's labels.
    * ``kind="mc"``: :math:`\frac1N\sum_n E_{\tilde y\sim p_w(\cdot|x_n)}\|\nabla\ell(x_n,\tilde y)\|^2`,
      the true Fisher's trace, estimated with ``num_samples`` labels per input drawn from the
      model's predictive distribution: categorical ``softmax(model(x))`` for
      ``"cross_entropy"``; Bernoulli ``sigmoid(model(x))`` for ``"bce_with_logits"``;
      ``model(x) + N(0, I)`` for ``"mse"`` (with this package's ``mse``,
      the mean over ``D`` output dims, this equals :math:`\frac{4}{D^2}\operatorname{tr}J^\top J`).
      Unbiased; other losses raise ``ValueError``. The labels of each mini-batch come from
      a generator of its own, seeded from one number drawn from ``generator`` and the
      mini-batch's index in ``batch_indices`` (default ``0, 1, 2, ...``): a mini-batch's draws
      depend only on the seed and its position in the whole data set, so they are independent
      across mini-batches and the same however the mini-batches are split between processes.
      Under DDP pass each process's positions (the callback's shard ``batches[rank::world]``
      has ``batch_indices = range(rank, N, world)``): the result then equals the
      single-process one.

    Per-sample squared gradient norms come without a Python loop over samples: ghost norms for
    the parameters of linear, 2-D convolution, normalization, embedding and plain self-attention
    layers (no per-sample gradient formed), ``torch.func.vmap`` over ``torch.func.grad`` for the
    rest, in sub-chunks of at most ``2**25`` numbers, or, where ``vmap`` fails (recurrent layers,
    ``nn.Embedding(max_norm=...)``, reentrant checkpointing, ...), one backward pass per sample
    (``_per_sample.py``, ``_ghost.py``). ``per_sample="auto"`` tries these on two samples of the
    first batch once per model and keeps the path (``per_sample_path`` says which);
    ``"vmap"`` or ``"loop"`` force the fallback. Cost: ``n_grad = 1`` (empirical) or
    ``num_samples`` (mc) per-sample-gradient passes over ``batches``.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import fisher_trace
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> fisher_trace(model, batches).value > 0
        True
    """
    kind = check_choice("kind", kind, KINDS)
    per_sample = check_per_sample(per_sample)
    num_samples = check_int("num_samples", num_samples)
    gen = check_generator(generator)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        if kind == "mc":
            check_mc_loss(loss_fn)
        draws = _batch_generators(gen, batch_indices) if kind == "mc" else None
        total, count, spread, norms, path = _sq_norm_sums(objective, kind, num_samples, draws, per_sample)
        se = spread.result(objective.reduce_sum)[1].item()
    if count == 0:
        raise ValueError("batches is empty: pass at least one sample.")
    n_grad = 1 if kind == "empirical" else num_samples
    value = total.item() / (count * (1 if kind == "empirical" else num_samples))
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("loss_fn produced non-finite per-sample gradients (NaN or inf).")
    return FisherResult(value, n_grad, se, tuple(norms) if kind == "empirical" else None, path)


def check_mc_loss(loss_fn: LossArg) -> None:
    """``kind="mc"`` draws labels from the model's outputs, which only the built-in losses define."""
    if resolve_loss_fn(loss_fn)[1] not in MC_LOSSES:
        raise ValueError(
            f'kind="mc" samples labels from the model\'s outputs, which needs loss_fn= one of {list(MC_LOSSES)} '
            '(and, in FlatnessCallback, sample_dims=0); use kind="empirical" with a custom loss_fn.'
        )


def _batch_generators(gen: torch.Generator, batch_indices: Sequence[int] | None) -> Iterator[torch.Generator]:
    """One generator per mini-batch, seeded by ``(one draw from gen, the mini-batch's index)``.

    A single stream shared by the mini-batches would give each process the same labels for
    different samples under DDP (every process seeds ``gen`` alike), correlating draws the
    standard error assumes independent.
    """
    base = int(torch.randint(0, 2**62, (), generator=gen))
    indices = itertools.count() if batch_indices is None else iter(batch_indices)
    for index in indices:
        yield torch.Generator().manual_seed((base + (int(index) + 1) * _GOLDEN) % 2**63)


def _sq_norm_sums(
    objective: Objective, kind: str, num_samples: int, draws: Iterator[torch.Generator] | None, per_sample: str
) -> tuple[Tensor, int, MeanAccumulator, list[Tensor], str]:
    """``Σ ‖∇ℓ‖²`` over every sample (and label draw), in float64, and the number of inputs, over
    processes; the per-input values' sums for the standard error (not yet reduced); each
    batch's per-sample values (this process's); and the per-sample path of the first batch."""
    total = torch.zeros((), dtype=torch.float64, device=objective.device)
    spread = MeanAccumulator(device=objective.device)
    count, norms, path = 0, [], ""
    for batch in objective.iter_batches():
        path = path or per_sample_path(objective, batch, per_sample).name
        if kind == "empirical":
            sq = per_sample_sq_norms(objective, batch, per_sample=per_sample)
            count += sq.numel()
            spread.add(sq)
        else:
            assert draws is not None  # kind="mc"
            gen = next(draws, None)
            if gen is None:
                raise ValueError("batch_indices has fewer entries than batches: give one index per mini-batch.")
            sq = _mc_sq_norms(objective, batch, num_samples, gen, per_sample)
            count += sq.numel() // num_samples
            spread.add(sq.reshape(num_samples, -1).mean(0))  # per input: the mean over its label draws
        total += sq.sum(dtype=torch.float64)
        norms.append(sq)
    total, count = objective.reduce(total, count)
    return total, count, spread, norms, path


def _mc_sq_norms(objective: Objective, batch: Any, num_samples: int, gen: torch.Generator, per_sample: str) -> Tensor:
    if not isinstance(batch, (tuple, list)):  # the drawn labels replace the targets of a pair (x, y)
        raise ValueError(
            f'kind="mc" needs batches that are pairs (inputs, targets); got {type(batch).__name__}. Use '
            'kind="empirical" for dict batches.'
        )
    x = batch[0]
    out = objective.outputs(x)
    norms = []
    if objective.loss_name == "cross_entropy":
        probs = torch.softmax(out.detach().to(torch.float64).cpu().reshape(out.shape[0], -1), dim=-1)
        if out.dim() != 2:
            raise ValueError('kind="mc" with "cross_entropy" needs logits of shape (B, C).')
        labels = torch.multinomial(probs, num_samples, replacement=True, generator=gen).to(out.device)
        for s in range(num_samples):
            norms.append(per_sample_sq_norms(objective, (x, labels[:, s]), per_sample=per_sample))
    elif objective.loss_name == "bce_with_logits":
        probs = torch.sigmoid(out.detach().to(torch.float64).cpu())
        for _ in range(num_samples):
            labels = torch.bernoulli(probs, generator=gen).to(out.device, out.dtype)
            norms.append(per_sample_sq_norms(objective, (x, labels), per_sample=per_sample))
    else:
        for _ in range(num_samples):
            noise = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
            norms.append(per_sample_sq_norms(objective, (x, out + noise), per_sample=per_sample))
    return torch.cat(norms)


def choose_per_sample_path(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    per_sample: str = "auto",
    dtype: torch.dtype | None = None,
) -> str:
    """The per-sample path :func:`fisher_trace` and ``grad_noise_scale`` take on ``model``: ``"ghost"``,
    ``"ghost+vmap"``, ``"ghost+loop"``, ``"vmap"`` or ``"loop"``.

    Decided here, on two samples of the first of ``batches``, and kept for the model (its loss,
    dtype, device, parameters and batch structure), so the estimators that follow reuse it
    without trying again: the callback calls this once when training starts and logs the answer
    with the hyperparameters. ``per_sample`` as in :func:`fisher_trace`.
    """
    per_sample = check_per_sample(per_sample)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, dtype=dtype)
        return per_sample_path(objective, next(objective.iter_batches()), per_sample).name

