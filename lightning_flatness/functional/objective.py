"""The objective ``L(w) = (1/N) Σ_b Σ_i ℓ_i(w)`` evaluated functionally, chunk by chunk.

Every estimator goes through :class:`Objective`: it owns the data pass (batches moved to the
model's device and compute dtype, one batch held at a time, so peak memory depends on the
chunk and not on ``N``), Hessian-vector products (double backward, one forward and two
backward passes per chunk), gradients, mini-batch gradients and per-sample gradients
(``torch.func.vmap`` over ``torch.func.grad``). Parameters are never written to the model:
they are substituted with :func:`torch.func.functional_call`, which also lets a model stored
in half precision be measured in float32 or float64.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from ..validation import check_cache_chunks
from ._affine_batch_norm import affine_batch_norm
from ._graph_cache import CacheChunks, SavedBytes, cache_limits
from ._losses import LossArg, LossFn, losses_and_correct, resolve_loss_fn, split_output
from ._params import flatten, resolve_params, unflatten
from .operator import CurvatureOperator

@dataclass(frozen=True)
class CrossProcess:
    """Combines the data passes of processes that each hold a shard of ``batches``.

    ``sum(t)``: elementwise sum of ``t`` over processes. Used by :meth:`Objective.reduce` on
    every total and sample count, so ``L``, gradients, Hessian-vector products and the regret's
    sums are those of the union of the shards.
    """

    sum: Callable[[Tensor], Tensor]


ChunkObserver = Callable[[Tensor, Tensor, int], None]
"""``observer(v, chunk_product, chunk_size)``: one chunk's summed Hessian-vector product."""

_CROSS_PROCESS: contextvars.ContextVar[CrossProcess | None] = contextvars.ContextVar(
    "lightning_flatness_cross_process", default=None
)


@contextlib.contextmanager
def cross_process_reduction(hook: CrossProcess) -> Iterator[None]:
    """Objectives created inside reduce their data passes over processes with ``hook``."""
    token = _CROSS_PROCESS.set(hook)
    try:
        yield
    finally:
        _CROSS_PROCESS.reset(token)


def process_sum() -> Callable[[Tensor], Tensor] | None:
    """The sum over processes of :func:`cross_process_reduction`'s hook in force, ``None`` outside one."""
    hook = _CROSS_PROCESS.get()
    return None if hook is None else hook.sum


class _LossModule(nn.Module):
    """Wraps ``(model, loss_fn)`` so ``functional_call`` can substitute the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, with_correct: bool = False, backward: bool = False) -> Any:
        if with_correct:  # a built-in loss knows its accuracy from the same outputs
            return losses_and_correct(self.loss_fn, self.model, batch)
        out = self.loss_fn(self.model, batch)
        if not backward:
            return out
        # Back-propagated here, while functional_call's tensors are still in place: code that runs
        # the forward pass again during backward (checkpoint(use_reentrant=True)) must see them.
        losses = split_output(out)[0]
        if losses.requires_grad:
            losses.sum().backward()
        return losses.detach()


def compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` if given, else the parameters' floating dtype, but never below float32."""
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}.")
        return dtype
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    widest = max(floats, key=lambda d: torch.finfo(d).bits, default=torch.float32)
    return widest if torch.finfo(widest).bits >= 32 else torch.float32


def _check_reiterable(batches: Iterable[Any]) -> None:
    if iter(batches) is batches:
        raise TypeError(
            "batches must be re-iterable (a list, tuple or DataLoader); a one-shot iterator or "
            "generator would be exhausted after the first pass."
        )


class Objective:
    """``L(w) = (1/N) Σ ℓ_i(w)`` of ``model`` over ``batches``, at flat parameters ``w``.

    Use inside :func:`measurement_mode` (eval mode, autocast off). ``w0`` is the current
    parameter vector in the compute dtype; methods take an optional ``at`` to evaluate
    elsewhere without touching the model.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: LossArg = "cross_entropy",
        params: Iterable[Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_reiterable(batches)
        self.loss_fn, self.loss_name = resolve_loss_fn(loss_fn)
        self.model = model
        self.batches = batches
        self.dtype = compute_dtype(model, dtype)
        named = resolve_params(model, params)
        self.names = ["model." + n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.device = named[0][1].device
        measured = {id(p) for _, p in named}
        self._module = _LossModule(model, self.loss_fn)
        # Every other tensor (frozen parameters, buffers) in the compute dtype, fixed.
        self._fixed = {
            "model." + n: self._cast(t.detach())
            for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if id(t) not in measured
        }
        self.w0 = flatten([self._cast(p.detach()) for _, p in named])
        self.num_params = self.w0.numel()
        self._num_samples: int | None = None
        self._cross = _CROSS_PROCESS.get()
        self._affine_norm = affine_batch_norm(model)
        self.ghost_axes: dict = {}  # sample axes of the ghost-norm calls, shared by this data's chunks

    # ----------------------------------------------------------------- data pass
    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def _prepare(self, batch: Any) -> Any:
        def move(t: Any) -> Any:
            if isinstance(t, Tensor):
                return self._cast(t.to(self.device, non_blocking=True))
            return t

        return tree_map(move, batch)

    def iter_batches(self, skip: int = 0) -> Iterator[Any]:
        """The batches on the model's device, floating tensors in the compute dtype (after the first ``skip``)."""
        empty = skip == 0  # with skip > 0 the skipped batches were there
        for batch in itertools.islice(self.batches, skip, None):
            empty = False
            yield self._prepare(batch)
        if empty:
            raise ValueError("batches is empty: pass at least one batch.")

    def losses(self, w: Tensor | Sequence[Tensor], batch: Any) -> Tensor:
        """Per-sample losses ``(B,)`` at parameters ``w`` (flat vector or tensor list)."""
        return self._evaluate(w, batch, with_correct=False)[0]

    def backward_losses(self, tensors: Sequence[Tensor], batch: Any) -> Tensor:
        """Per-sample losses ``(B,)`` at the parameters ``tensors``, their sum back-propagated into the
        ``.grad`` of those that require it.

        For the per-sample loop: unlike ``torch.autograd.grad`` on :meth:`losses`, this works under
        ``torch.utils.checkpoint(..., use_reentrant=True)``, which supports only ``.backward()`` and
        recomputes its block during it, with the parameters substituted at that time.
        """
        state = dict(self._fixed)
        state.update(zip(self.names, tensors))
        return functional_call(self._module, state, (batch,), {"backward": True})

    def _evaluate(self, w: Tensor | Sequence[Tensor], batch: Any, with_correct: bool) -> tuple[Tensor, Tensor | None]:
        tensors = unflatten(w, self.shapes) if isinstance(w, Tensor) else w
        state = dict(self._fixed)
        state.update(zip(self.names, tensors))
        return split_output(functional_call(self._module, state, (batch,), {"with_correct": with_correct}))

    def outputs(self, inputs: Any, at: Tensor | None = None) -> Tensor:
        """``model(inputs)`` at parameters ``at`` (default ``w0``), without gradients."""
        w = self.w0 if at is None else at
        state = {name[len("model.") :]: t for name, t in self._fixed.items()}
        state.update((name[len("model.") :], t) for name, t in zip(self.names, unflatten(w, self.shapes)))
        with torch.no_grad():
            return functional_call(self.model, state, (inputs,))

    def losses_and_correct(self, batch: Any, at: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Per-sample losses and whether each sample is classified correctly (bool ``(B,)``), without gradients.

        ``correct`` comes from the same evaluation as the losses, never from a second guess: for
        a built-in loss, from its own outputs (``"cross_entropy"`` with integer labels: the
        arg-max class; ``"bce_with_logits"``: the logit's sign; ``"mse"``: none); for a callable,
        from the pair ``(losses, correct)`` it returns. ``None`` when unknown.
        """
        with torch.no_grad():
            return self._evaluate(self.w0 if at is None else at, batch, with_correct=True)

    def leaves(self, at: Tensor | None = None) -> list[Tensor]:
        """The parameters at ``at`` (default ``w0``) as fresh leaf tensors that require gradients."""
        w = self.w0 if at is None else at
        return [t.detach().requires_grad_() for t in unflatten(w, self.shapes)]

    @property
    def cross_process(self) -> bool:
        """Whether the data passes are summed over processes (inside :func:`cross_process_reduction`)."""
        return self._cross is not None

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over processes (itself outside :func:`cross_process_reduction`)."""
        return tensor if self._cross is None else self._cross.sum(tensor)

    def reduce(self, total: Tensor, count: int) -> tuple[Tensor, int]:
        """Sum ``total`` and ``count`` over processes (identity outside :func:`cross_process_reduction`)."""
        if self._cross is not None:
            total = self._cross.sum(total)
            count = int(self._cross.sum(torch.tensor([float(count)], dtype=torch.float64, device=total.device)).item())
        return total, count

    def average(self, total: Tensor, count: int, what: str) -> Tensor:
        """``total / count`` after summing both over processes; raises if anything is not finite.

        ``what`` names the quantity in the error (``"loss"``, ``"gradient"``, ...). ``total`` is
        divided in place.
        """
        total, count = self.reduce(total, count)
        self._num_samples = count
        if count == 0:
            raise ValueError("batches is empty: the loss function returned no samples.")
        # One plain reduction (float64 accumulation costs 10x more on CPU): a NaN or inf anywhere
        # makes the sum non-finite. So can an overflow of finite values: that case is checked
        # elementwise before raising.
        if not torch.isfinite(total.sum()) and not torch.isfinite(total).all():
            raise ValueError(f"loss_fn produced a non-finite {what} on these batches (NaN or inf).")
        return total.div_(count)

    @property
    def num_samples(self) -> int:
        """``N``, the number of samples in ``batches`` (counted on the first pass)."""
        if self._num_samples is None:
            self.loss()
        assert self._num_samples is not None
        return self._num_samples

    # -------------------------------------------------------------- quantities
    @torch.no_grad()
    def loss(self, at: Tensor | None = None) -> Tensor:
        """``L(w)`` (a 0-d tensor)."""
        total, count = torch.zeros((), dtype=self.dtype, device=self.device), 0
        w = self.w0 if at is None else at
        for batch in self.iter_batches():
            losses = self.losses(w, batch)
            total += losses.sum()
            count += losses.numel()
        return self.average(total, count, "loss")

    def gradient(self, at: Tensor | None = None) -> Tensor:
        """``∇L(w)`` as a flat vector: one forward and one backward pass per chunk."""
        total: Tensor | None = None
        count = 0
        for summed, size in self.batch_gradient_sums(at):
            total = summed if total is None else total.add_(summed)  # the first chunk's own buffer
            count += size
        assert total is not None  # iter_batches raises on no batches
        return self.average(total, count, "gradient")

    def batch_gradient_sums(self, at: Tensor | None = None) -> Iterator[tuple[Tensor, int]]:
        """For every batch, ``(Σ_i ∇ℓ_i(w), B)``: one forward and one backward pass each.

        Not reduced over processes: callers combine and :meth:`reduce` what they accumulate.
        """
        leaves = self.leaves(at)
        for batch in self.iter_batches():
            losses = self.losses(leaves, batch)
            g = torch.autograd.grad(losses.sum(), leaves, allow_unused=True, materialize_grads=True)
            yield flatten(g), losses.numel()

    def hvps(self, vectors: Tensor, at: Tensor | None = None, observer: ChunkObserver | None = None) -> Tensor:
        """``∇²L(w) v`` for each row ``v`` of ``vectors`` (shape ``(K, P)``).

        Per chunk: one forward, one backward building the gradient graph, then one backward
        of ``g·v`` per vector, so ``K`` products share the first two passes.
        """
        leaves = self.leaves(at)
        return self._hvps_on(self._gradient_graphs(leaves), leaves, vectors, observer=observer)

    def hvp(self, vector: Tensor, at: Tensor | None = None) -> Tensor:
        """``∇²L(w) v`` for one flat vector."""
        return self.hvps(vector.unsqueeze(0), at)[0]

    def hessian_operator(
        self, cache_chunks: CacheChunks = 0, at: Tensor | None = None, cache_bytes: int | None = None
    ) -> HessianOperator:
        """``∇²L(w)`` at ``at`` (default ``w0``) as a :class:`HessianOperator` (see there for ``cache_chunks``)."""
        return HessianOperator(self, cache_chunks, at, cache_bytes)

    def _gradient_graph(self, leaves: list[Tensor], batch: Any) -> tuple[Sequence[Tensor], int]:
        """``(Σ_i ∇ℓ_i, B)`` of one prepared chunk, with the graph that differentiates it again."""
        with self._affine_norm:  # its double backward is cheaper than batch norm's own
            losses = self.losses(leaves, batch)
            g = torch.autograd.grad(losses.sum(), leaves, create_graph=True, allow_unused=True, materialize_grads=True)
        return g, losses.numel()

    def _gradient_graphs(self, leaves: list[Tensor], skip: int = 0) -> Iterator[tuple[Sequence[Tensor], int, bool]]:
        """Per chunk after the first ``skip``, ``(Σ_i ∇ℓ_i, B, False)``: a graph used once (not kept)."""
        for batch in self.iter_batches(skip):
            yield (*self._gradient_graph(leaves, batch), False)

    def _kept_graphs(self, leaves: list[Tensor], max_chunks: float, max_bytes: float) -> tuple[list, int, bool]:
        """The leading chunks' graphs ``(g, B, True)`` while at most ``max_chunks`` of them fit in ``max_bytes``
        (measured by :class:`SavedBytes`): the graphs, their bytes, and whether every chunk is among them.
        Unless ``batches`` is a list or tuple, all chunks or none."""
        kept: list = []
        used = 0
        parameters = {t.untyped_storage().data_ptr() for t in [*leaves, *self._fixed.values()]}
        # Only a sequence is sure to yield the same chunks in the same order again (a shuffling loader is not):
        # from anything else a part is never kept beside rebuilt chunks, all or none.
        partial = isinstance(self.batches, (list, tuple))
        for batch in self.iter_batches():
            if len(kept) >= max_chunks:
                break
            with SavedBytes(parameters) as saved:
                g, size = self._gradient_graph(leaves, batch)
            saved.add(*g)
            if used + saved.nbytes > max_bytes:  # this graph is dropped: it and the rest are rebuilt per product
                break
            kept.append((g, size, True))
            used += saved.nbytes
        else:
            return kept, used, True
        return (kept, used, False) if partial else ([], 0, False)

    def _hvps_on(
        self, graphs: Iterable[tuple[Sequence[Tensor], int, bool]], leaves: list[Tensor], vectors: Tensor,
        observer: ChunkObserver | None = None,
    ) -> Tensor:  # fmt: skip
        if vectors.dim() != 2 or vectors.shape[1] != self.num_params:
            raise ValueError(f"expected vectors of shape (K, {self.num_params}), got {tuple(vectors.shape)}.")
        columns = list(vectors)  # one tensor object per vector, the same for every chunk (observers key on it)
        vs = [unflatten(v, self.shapes) for v in columns]
        total = torch.empty_like(vectors)
        # Accumulate straight into views of ``total``: no flattened copy per chunk and product.
        views = [unflatten(row, self.shapes) for row in total]
        count = 0
        for g, size, kept in graphs:
            for k, v in enumerate(vs):
                hv = torch.autograd.grad(
                    g, leaves, grad_outputs=v, retain_graph=kept or k + 1 < len(vs), allow_unused=True,
                    materialize_grads=True,
                )  # fmt: skip
                if observer is not None:
                    observer(columns[k], flatten(hv), size)
                if count == 0:
                    torch._foreach_copy_(views[k], hv)  # the first chunk: no zero fill, no add
                else:
                    torch._foreach_add_(views[k], hv)
            count += size
        if count == 0:
            total.zero_()  # no samples here (an empty shard): contribute zeros to the reduction
        return self.average(total, count, "Hessian-vector product")


class HessianOperator(CurvatureOperator):
    """``v ↦ ∇²L(w) v`` of an :class:`Objective`, the curvature operator of every estimator here.

    Each product is a double-backward Hessian-vector product over every chunk of the data (one
    forward and two backward passes; a block of ``K`` columns shares the first two). The
    forward pass and gradient graph of the leading chunks can be built once, here, and kept: a
    product is then one second backward pass on those chunks (PyHessian's single-batch trick),
    about 1.5–2× a gradient instead of 2.5–3× (``benchmarks/``), for their graphs held in memory
    until the operator is freed. ``cache_chunks``: ``"auto"`` keeps the leading chunks while the
    graphs' measured size (the tensors autograd saves, and the gradients) stays within
    ``cache_bytes`` (default :func:`graph_budget`: a quarter of the free CUDA memory, 1 GiB on
    CPU), so small models get the cheap products and large ones a peak memory that stops
    growing with the subsample at the budget; an integer keeps at most that many chunks'
    graphs (``0``: none). Only from a list or tuple of batches are some chunks kept and the rest
    rebuilt; any other iterable (e.g. a ``DataLoader``, which may shuffle) keeps all its chunks'
    graphs or none, so a product never mixes two passes' chunks. ``kept_chunks`` and
    ``kept_bytes`` say what was kept.
    ``chunk_observer``, when set, is called for every chunk of every product, in the data's
    order, as ``chunk_observer(v, Σ_{i∈chunk} ∇²ℓ_i v, chunk size)`` (flat tensors; the chunk's
    own, not reduced over processes): per-mini-batch parts of a product, e.g. for the sampling
    error of a Rayleigh quotient. Build it inside
    :func:`~lightning_flatness.functional.measurement_mode` (eval mode, autocast off) and use it
    there, with the model's buffers and mode unchanged: the kept chunks' products no longer see
    them, while rebuilt chunks would.
    """

    def __init__(
        self, objective: Objective, cache_chunks: CacheChunks = 0, at: Tensor | None = None,
        cache_bytes: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(objective.num_params, objective.dtype, objective.device)
        self.objective, self.at = objective, at
        self.chunk_observer: ChunkObserver | None = None
        self._leaves = objective.leaves(at)
        max_chunks, max_bytes = cache_limits(check_cache_chunks(cache_chunks), cache_bytes, objective.device)
        self._kept, self.kept_bytes, self._all_kept = [], 0, False
        if max_chunks > 0:
            self._kept, self.kept_bytes, self._all_kept = objective._kept_graphs(self._leaves, max_chunks, max_bytes)

    @property
    def kept_chunks(self) -> int:
        """How many leading chunks' graphs are kept (each product rebuilds the rest)."""
        return len(self._kept)

    @property
    def keeps_graphs(self) -> bool:
        """Whether every chunk's graph is kept (a product is then one second backward pass throughout)."""
        return self._all_kept

    def _matmat(self, rows: Tensor) -> Tensor:
        graphs = self._kept if self._all_kept else itertools.chain(
            self._kept, self.objective._gradient_graphs(self._leaves, skip=len(self._kept))
        )  # fmt: skip
        return self.objective._hvps_on(graphs, self._leaves, rows, observer=self.chunk_observer)
