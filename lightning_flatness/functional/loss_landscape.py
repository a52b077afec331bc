"""Loss-landscape slices: filter-normalized random directions (Li et al. 2018) and the top eigenvector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ._losses import LossArg
from .hessian_eigenvalues import solver_options
from .hessian_min_eigenvalue import extreme_ratio
from .objective import Objective
from ._restore import measurement_mode
from ..validation import check_bool, check_float, check_generator, check_int

NORMALIZATIONS = ("filter", "layer", "none")


@dataclass(frozen=True)
class ConvexityMap:
    """``|λ_min/λ_max|`` of the Hessian at every grid point of a landscape (Li et al. 2018, Fig. 7).

    ``ratio``: ``max(−λ_min, 0)/λ_max`` (0 where the Hessian is positive semi-definite, NaN where
    ``λ_max ≤ 0``); ``smallest``, ``largest``: ``λ_min``, ``λ_max``; ``converged``: whether both
    Lanczos runs at that point converged; all shaped like the losses. ``n_hvp``: every product.
    """

    ratio: Tensor
    smallest: Tensor
    largest: Tensor
    converged: Tensor
    n_hvp: int


@dataclass(frozen=True)
class LandscapeResult:
    """Loss (and accuracy) on a 1-D or 2-D grid ``w + a·d₁ (+ b·d₂)``.

    ``coordinates``: one ``(steps,)`` tensor per direction; ``losses``/``accuracy``: shape
    ``(steps,)`` or ``(steps, steps)`` indexed ``[a, b]``; ``accuracy`` is ``None`` unless the
    loss gives it (``"cross_entropy"`` with integer labels, ``"bce_with_logits"``, or a callable
    returning ``(losses, correct)``); ``directions``: ``(d, P)``, after normalization;
    ``n_forward``: forward passes over all of ``batches`` (= grid points); ``convexity``: the
    :class:`ConvexityMap` with ``convexity=True``, else ``None``.
    """

    coordinates: tuple[Tensor, ...]
    losses: Tensor
    accuracy: Tensor | None
    directions: Tensor
    n_forward: int
    convexity: ConvexityMap | None = None


def normalize_direction(direction: Tensor, weights: Tensor, shapes: Sequence[torch.Size], normalization: str) -> Tensor:
    """Rescale a flat direction like Li et al. (2018) so slices are comparable across networks.

    ``"filter"``: each filter of a parameter with ``dim >= 2`` (a slice along its first axis: one
    output neuron of a linear layer, one output channel of a convolution) is rescaled to the norm
    of the same filter of the weights. ``"layer"``: each such parameter tensor as a whole.
    In both, directions of parameters with ``dim <= 1`` (biases, BatchNorm scales and shifts) are
    set to zero, as in Li et al.'s reference code. ``"none"``: the direction as given.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
    if normalization == "none":
        return direction.clone()
    out, start = [], 0
    for shape in shapes:
        n = shape.numel()
        d, w = direction[start : start + n].view(shape), weights[start : start + n].view(shape)
        start += n
        if len(shape) <= 1:
            out.append(torch.zeros_like(d).reshape(-1))
            continue
        if normalization == "filter":
            d_rows, w_rows = d.reshape(shape[0], -1), w.reshape(shape[0], -1)
        else:
            d_rows, w_rows = d.reshape(1, -1), w.reshape(1, -1)
        scale = w_rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out.append((d_rows * scale).reshape(-1))
    return torch.cat(out)


def _loss_and_accuracy(objective: Objective, at: Tensor) -> tuple[float, float | None]:
    """Mean loss and, where the loss knows it (:meth:`Objective.losses_and_correct`), accuracy."""
    total = torch.zeros(2, dtype=torch.float64, device=objective.device)
    count, classify = 0, True
    for batch in objective.iter_batches():
        losses, correct = objective.losses_and_correct(batch, at)
        classify = classify and correct is not None
        if classify:
            total[1] += correct.sum()
        total[0] += losses.sum(dtype=torch.float64)
        count += losses.numel()
    total, count = objective.reduce(total, count)
    mean = (total / count).tolist()
    return mean[0], (mean[1] if classify else None)


def _directions(
    directions: int | Tensor | Sequence[Tensor], objective: Objective, normalization: str, seed: int | None
) -> Tensor:
    dim = objective.num_params
    if isinstance(directions, int) and not isinstance(directions, bool):
        if directions not in (1, 2):
            raise ValueError(f"directions must be 1, 2, or explicit flat vectors; got {directions}.")
        gen = check_generator(seed)
        raw = torch.randn(directions, dim, generator=gen, dtype=torch.float64)
    else:
        raw = torch.stack(list(directions)) if not isinstance(directions, Tensor) else directions
        raw = raw.detach().reshape(-1, raw.shape[-1]).to(torch.float64).cpu()
        if raw.shape[1] != dim or raw.shape[0] not in (1, 2):
            raise ValueError(f"explicit directions must have shape ({dim},) or (1 or 2, {dim}); got {tuple(raw.shape)}.")
    weights = objective.w0.detach().to(torch.float64).cpu()
    normalized = torch.stack([normalize_direction(d, weights, objective.shapes, normalization) for d in raw])
    return normalized.to(device=objective.device, dtype=objective.dtype)


def loss_landscape(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    directions: int | Tensor | Sequence[Tensor] = 1,
    normalization: str = "filter",
    span: float = 1.0,
    steps: int = 21,
    seed: int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    convexity: bool = False,
    convexity_tol: float = 1e-2,
    convexity_max_iter: int = 20,
    convexity_verify: bool = False,
) -> LandscapeResult:
    r"""Loss along a line or plane through the current weights (Li et al., NeurIPS 2018).

    Evaluates :math:`L(w + a\,d_1)` (``directions=1``) or :math:`L(w + a\,d_1 + b\,d_2)`
    (``directions=2``) for ``a, b`` on ``torch.linspace(-span, span, steps)``. Random directions
    are Gaussian (from ``seed``; a fixed default when ``None``) and, like explicit ones, are
    rescaled by ``normalization`` (see :func:`normalize_direction`): with ``"filter"``, a step of
    1 moves every filter by its own norm, which makes slices comparable across networks, batch
    sizes and ReLU rescalings. Accuracy is reported where the loss gives it (see :class:`LandscapeResult`).

    ``convexity=True`` also maps ``|λ_min/λ_max|`` of the Hessian at every grid point, as Li et
    al. do beside their surfaces (small: locally convex): :class:`ConvexityMap`, from
    :func:`~lightning_flatness.functional.hessian_eigenvalue_ratio` at each point, both Lanczos
    runs warm-started from the neighbouring point's eigenvectors (cold, from a Gaussian vector,
    at the first). It is a picture, not a measurement, and it costs two Lanczos runs per point,
    so its solves are loose by default: ``convexity_tol=1e-2`` (``λ_max`` to about 1 %, ``λ_min``
    to ``1e-2·λ_max``: each ratio to about 0.01), at most ``convexity_max_iter=20`` products per
    run, and no check in the complement (``convexity_verify=False``: a warm start that lacks an
    eigenvector the neighbour's did not have goes unnoticed). Points that did not converge are
    flagged in ``converged``.

    Cost: loss only, no gradients: ``steps`` (1-D) or ``steps²`` (2-D) forward passes over
    ``batches``, one batch in memory at a time; with ``convexity``, at most
    ``2·convexity_max_iter`` Hessian-vector products per point more (``ConvexityMap.n_hvp``;
    doubled with ``convexity_verify``), e.g. up to 1960 on a 7×7 grid, fewer warm. The model is
    left exactly as it was.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import loss_landscape
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> result = loss_landscape(model, batches, directions=2, steps=5)
        >>> result.losses.shape, result.n_forward
        (torch.Size([5, 5]), 25)
    """
    span = check_float("span", span, inclusive=False)
    steps = check_int("steps", steps)
    solver = None
    if check_bool("convexity", convexity):
        solver = solver_options(convexity_tol, convexity_max_iter, convexity_verify, None, seed)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        dirs = _directions(directions, objective, normalization, seed)
        grid = torch.linspace(-span, span, steps, dtype=torch.float64)
        shape = (steps,) * len(dirs)
        losses = torch.empty(shape, dtype=torch.float64)
        accuracy = torch.empty(shape, dtype=torch.float64)
        classify = True
        mapper = None if solver is None else _ConvexityMapper(objective, shape, solver)
        for index in torch.cartesian_prod(*[torch.arange(steps)] * len(dirs)).reshape(-1, len(dirs)):
            coords = grid[index].to(device=dirs.device, dtype=dirs.dtype)
            point = objective.w0 + coords @ dirs
            loss, acc = _loss_and_accuracy(objective, point)
            losses[tuple(index)] = loss
            classify = acc is not None
            if classify:
                accuracy[tuple(index)] = acc
            if mapper is not None:
                mapper.measure(tuple(index.tolist()), point)
    return LandscapeResult(
        coordinates=tuple(grid.clone() for _ in dirs),
        losses=losses,
        accuracy=accuracy if classify else None,
        directions=dirs,
        n_forward=losses.numel(),
        convexity=None if mapper is None else mapper.result(),
    )


class _ConvexityMapper:
    """``|λ_min/λ_max|`` point by point (:func:`loss_landscape`'s ``convexity``), each point's Lanczos runs
    warm-started from the previous point along the last axis, or at a row's start from the previous row's
    start: two pairs of vectors held, whatever the grid."""

    def __init__(self, objective: Objective, shape: tuple[int, ...], solver: dict[str, Any]) -> None:
        self.objective, self.solver = objective, solver
        self.values = torch.full((3, *shape), float("nan"), dtype=torch.float64)  # ratio, λ_min, λ_max
        self.converged = torch.zeros(shape, dtype=torch.bool)
        self.previous: tuple[Tensor | None, Tensor | None] = (None, None)  # (bottom, top) eigenvectors
        self.row_start: tuple[Tensor | None, Tensor | None] = (None, None)
        self.n_hvp = 0

    def measure(self, index: tuple[int, ...], point: Tensor) -> None:
        init, top_init = self.previous if index[-1] > 0 else self.row_start
        operator = self.objective.hessian_operator("auto", at=point)
        # Away from w0 the objective's gradient is not the point's: a cold λ_max starts from a Gaussian.
        res = extreme_ratio(self.objective, operator, init=init, top_init=top_init, start="random", **self.solver)
        self.values[(slice(None), *index)] = torch.tensor(
            [res.ratio, res.smallest.values[0].item(), res.largest.values[0].item()], dtype=torch.float64
        )  # fmt: skip
        self.converged[index] = res.converged
        self.previous = (res.smallest.vectors, res.largest.vectors)
        if index[-1] == 0:
            self.row_start = self.previous
        self.n_hvp += res.n_hvp

    def result(self) -> ConvexityMap:
        ratio, smallest, largest = self.values
        return ConvexityMap(ratio, smallest, largest, self.converged, self.n_hvp)


@dataclass(frozen=True)
class EigenvectorSlice:
    """Loss along the top Hessian eigenvector, on the train and (optionally) validation batches."""

    coordinates: Tensor
    train_losses: Tensor
    val_losses: Tensor | None
    vector: Tensor
    eigenvalue: float | None
    n_hvp: int
    n_forward: int


def eigenvector_slice(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    val_batches: Iterable[Any] | None = None,
    vector: Tensor | None = None,
    span: float = 1.0,
    steps: int = 21,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
    **eigen_kwargs: Any,
) -> EigenvectorSlice:
    r"""Loss along the top Hessian eigenvector :math:`v` (unit norm): :math:`L(w + a v)`, ``|a| ≤ span``.

    As in Yao et al. (NeurIPS 2018), on the training and validation data: large-batch minima
    rise faster along :math:`v`. ``vector`` (e.g. the callback's warm-start eigenvector) skips
    the eigen solve; otherwise :func:`hessian_eigenvalues` runs on ``batches`` with
    ``eigen_kwargs``. The direction is not rescaled (``a`` is a distance in parameter space).
    Cost: the eigen solve's ``n_hvp`` plus ``steps`` forward passes per data set.
    """
    from .hessian_eigenvalues import hessian_eigenvalues

    eigenvalue, n_hvp = None, 0
    if vector is None:
        eig = hessian_eigenvalues(model, batches, loss_fn, k=1, params=params, dtype=dtype, **eigen_kwargs)
        vector, eigenvalue, n_hvp = eig.vectors[0], float(eig.values[0]), eig.n_hvp
    vector = vector.reshape(1, -1) / vector.norm()

    def slice_on(data: Iterable[Any]) -> LandscapeResult:
        return loss_landscape(
            model, data, loss_fn, directions=vector, normalization="none", span=span, steps=steps, params=params, dtype=dtype
        )

    train = slice_on(batches)
    val = slice_on(val_batches) if val_batches is not None else None
    return EigenvectorSlice(
        coordinates=train.coordinates[0],
        train_losses=train.losses,
        val_losses=None if val is None else val.losses,
        vector=vector[0],
        eigenvalue=eigenvalue,
        n_hvp=n_hvp,
        n_forward=train.n_forward + (0 if val is None else val.n_forward),
    )
