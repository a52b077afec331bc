"""The fixed measurement subsample: drawn once by index, without side effects on training.

The indices come from a private, seeded ``torch.Generator``; the samples are read from the
loader's *dataset* (not by iterating the loader, which would advance its sampler and its
workers) and collated with the loader's own ``collate_fn``. Reading samples may run random
data augmentation, so every global RNG (torch CPU/CUDA, ``random``, NumPy) is saved and
restored around it. For iterable-style datasets, which cannot be indexed, the callback
instead copies the first batches the training loop yields (:class:`BatchRecorder`).

Samples are counted, sliced and concatenated along dim 0 of every tensor of a batch (0-d
tensors and other objects are shared by the samples). Batches that hold their samples
elsewhere (sequence-first ``(T, B)`` inputs) are kept with their sample axes moved to dim 0,
and the loss gets them back as they came (:class:`SampleLayout`).
"""

from __future__ import annotations

import contextlib
import numbers
import random
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from ._failures import ConfigurationError
from .functional._losses import BuiltinLoss, LossArg, resolve_loss_fn
from .functional._per_sample import batch_size, leading_sizes
from .validation import SAMPLE_DIMS

try:  # NumPy is a dependency, but keep the module importable without it.
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Save and restore torch (CPU and initialized CUDA), ``random`` and NumPy RNG states."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    npy = np.random.get_state() if np is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if npy is not None:
            np.random.set_state(npy)


def first_loader(loaders: Any) -> DataLoader | None:
    """The first ``DataLoader`` in what ``trainer.train_dataloader``/``val_dataloaders`` returns."""
    return first_loader_path(loaders)[0]


def first_loader_path(loaders: Any) -> tuple[DataLoader | None, tuple]:
    """The first ``DataLoader`` and the keys that lead to it: where its share sits in a combined batch."""
    if isinstance(loaders, DataLoader):
        return loaders, ()
    items: list[tuple[Any, Any]] = []
    if isinstance(loaders, dict):
        items = list(loaders.items())
    elif isinstance(loaders, (list, tuple)):
        items = list(enumerate(loaders))
    elif getattr(loaders, "iterables", None) is not None:  # a CombinedLoader
        return first_loader_path(loaders.iterables)
    for key, item in items:
        found, path = first_loader_path(item)
        if found is not None:
            return found, (key, *path)
    return None, ()


def part(batch: Any, path: tuple) -> Any:
    """The share of a combined batch (several training loaders) that comes from the loader at ``path``."""
    for key in path:
        if batch is None:
            return None  # this loader is exhausted in this step (CombinedLoader mode "max_size")
        batch = batch[key]
    return batch


def is_indexable(loader: DataLoader) -> bool:
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return False
    try:
        return len(dataset) > 0 and hasattr(dataset, "__getitem__")  # type: ignore[arg-type]
    except TypeError:
        return False


def draw_indices(size: int, num: int, seed: int) -> Tensor:
    """``min(num, size)`` distinct indices of ``range(size)``, a seeded random permutation prefix."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[: min(num, size)]


def collate_indices(dataset: Dataset, indices: Sequence[int], collate_fn: Any, batch_size: int) -> list[Any]:
    """Read ``dataset[i]`` for each index and collate them into mini-batches of ``batch_size``."""
    collate = collate_fn if collate_fn is not None else default_collate
    idx = [int(i) for i in indices]
    with preserved_rng():
        return [collate([dataset[i] for i in idx[s : s + batch_size]]) for s in range(0, len(idx), batch_size)]


def batch_size_of(batch: Any) -> int:
    return batch_size(batch, "the measurement subsample")


def rebatch(batches: Sequence[Any], batch_size: int, num: int) -> list[Any]:
    """Concatenate batches along dim 0, keep the first ``num`` samples, split into ``batch_size``."""
    flat = [tree_flatten(b) for b in batches]
    spec = flat[0][1]
    leaves = []
    for j, leaf in enumerate(flat[0][0]):
        if isinstance(leaf, Tensor) and leaf.dim() > 0:
            leaves.append(torch.cat([f[0][j] for f in flat])[:num])
        else:
            leaves.append(leaf)
    total = min(num, sum(batch_size_of(b) for b in batches))
    out = []
    for s in range(0, total, batch_size):
        part = [t[s : s + batch_size] if isinstance(t, Tensor) and t.dim() > 0 else t for t in leaves]
        out.append(tree_unflatten(part, spec))
    return out


def move(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.detach().to(device) if isinstance(t, Tensor) else t, batch)


class BatchRecorder:
    """Copies the first training batches (detached, cloned, samples along dim 0) until ``num`` samples are held."""

    def __init__(self, num: int, layout: SampleLayout) -> None:
        self.num, self.layout = num, layout
        self.batches: list[Any] = []
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.num

    def add(self, batch: Any) -> None:
        if self.full:
            return
        batch = self.layout.first(tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, batch))
        self.count += self.layout.count(batch)
        self.batches.append(batch)


def shard(batches: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of whole mini-batches: ``batches[rank::world_size]``."""
    return list(batches[rank::world_size])


def dataset_size(loader: DataLoader | None) -> int | None:
    """The number of samples of a loader's dataset, or ``None`` when it has no length."""
    try:
        return len(loader.dataset) if loader is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


def first_batches(loader: DataLoader, num: int, layout: SampleLayout) -> list[Any]:
    """The loader's first batches, as they come, holding at least ``num`` samples, read without touching any RNG."""
    with preserved_rng():
        taken, count = [], 0
        for batch in loader:
            taken.append(batch)
            count += layout.count(layout.first(batch))
            if count >= num:
                break
    return taken


def to_device(module: Any, batch: Any) -> Any:
    """``batch`` on the module's device through its own transfer hooks (a LightningModule's), RNG untouched."""
    handler = getattr(module, "_apply_batch_transfer_handler", None)
    with preserved_rng():
        if handler is not None:
            return handler(batch, module.device)
        return move(batch, module.device)


class BatchLayoutError(ConfigurationError):
    """The batches do not hold their samples where ``sample_dims`` says (or, by default, along dim 0)."""


class SampleLayout:
    """Where each tensor of a batch holds its samples: the callback's ``sample_dims``.

    ``sample_dims`` is an integer (the same axis for every tensor) or a tuple, list or dict that
    matches the batch's structure, as ``torch.func.vmap``'s ``in_dims`` (a tuple and a list
    match either). :meth:`first` moves every sample axis to dim 0, where the whole pipeline
    (drawing, slicing, counting, re-batching, per-sample gradients) works; :meth:`loss` hands the
    loss each batch back in its own layout. With ``sample_dims=0`` nothing is moved.
    """

    def __init__(self, sample_dims: Any = 0) -> None:
        self.sample_dims = sample_dims

    @property
    def moves(self) -> bool:
        return self.sample_dims != 0

    def first(self, batch: Any) -> Any:
        """``batch`` with the samples along dim 0 of every tensor."""
        if not self.moves:
            return batch
        return _map_dims(batch, self.sample_dims, lambda t, d: t.movedim(d, 0).contiguous(), self.sample_dims)

    def native(self, batch: Any) -> Any:
        """A batch of :meth:`first` back in the layout the loss expects (views, no copies)."""
        if not self.moves:
            return batch
        return _map_dims(batch, self.sample_dims, lambda t, d: t.movedim(0, d), self.sample_dims)

    def count(self, batch: Any) -> int:
        """The number of samples of a batch of :meth:`first`; a clear error when its tensors disagree."""
        sizes = leading_sizes(batch)
        if len(sizes) == 1:
            return sizes[0]
        where = "dim 0 of every tensor" if not self.moves else f"the axes of sample_dims={self.sample_dims!r}"
        raise BatchLayoutError(
            f"FlatnessCallback cannot count the samples of a batch: its tensors hold {sizes} entries along {where}. "
            f"Say where each tensor holds its samples with sample_dims: {SAMPLE_DIMS} (docs/faq.md, \"How does the "
            f'callback count the samples of a batch?").'
        )

    def loss(self, loss_fn: LossArg) -> LossArg:
        """The loss on batches of :meth:`first`: ``loss_fn`` itself when nothing moves."""
        return loss_fn if not self.moves else NativeLoss(loss_fn, self)


class NativeLoss:
    """``loss_fn`` called on each batch in its own layout; a built-in loss still gives its accuracy.

    A class, not a closure, so that the callback stays picklable (``ddp_spawn``).
    """

    def __init__(self, loss_fn: LossArg, layout: SampleLayout) -> None:
        self.fn, self.builtin = resolve_loss_fn(loss_fn)
        self.layout = layout

    def __call__(self, model: Any, batch: Any) -> Any:
        native = self.layout.native(batch)
        if isinstance(self.fn, BuiltinLoss):
            return self.fn.losses_and_correct(model, native)
        return self.fn(model, native)


def _map_dims(batch: Any, dims: Any, move: Any, spec: Any) -> Any:
    """``move(t, d)`` on every tensor ``t`` (at least 1-D) of ``batch``, ``d`` its entry of ``dims``."""
    if isinstance(dims, numbers.Integral):

        def one(t: Any) -> Any:
            if not isinstance(t, Tensor) or t.dim() == 0:
                return t
            if dims >= t.dim():
                raise BatchLayoutError(
                    f"FlatnessCallback(sample_dims={spec!r}): a tensor of shape {tuple(t.shape)} has no dim {dims}."
                )
            return move(t, dims)

        return tree_map(one, batch)
    if isinstance(dims, (tuple, list)) and isinstance(batch, (tuple, list)) and len(dims) == len(batch):
        out = [_map_dims(b, d, move, spec) for b, d in zip(batch, dims)]
        return type(batch)(*out) if hasattr(batch, "_fields") else type(batch)(out)  # namedtuples too
    if isinstance(dims, dict) and isinstance(batch, dict) and set(dims) == set(batch):
        return {key: _map_dims(value, dims[key], move, spec) for key, value in batch.items()}
    raise BatchLayoutError(
        f"FlatnessCallback(sample_dims={spec!r}) does not match the batches' structure: got "
        f"{type(batch).__name__}{f' of {len(batch)} elements' if isinstance(batch, (tuple, list, dict)) else ''} "
        f"where sample_dims has {dims!r}. Give one entry per element of the batch, or one integer for all."
    )
