"""The fixed measurement subsample: drawn once by index, without side effects on training.

The indices come from a private, seeded ``torch.Generator``; the samples are read from the
loader's *dataset* (not by iterating the loader, which would advance its sampler and its
workers) and collated with the loader's own ``collate_fn``. Reading samples may run random
data augmentation, so every global RNG (torch CPU/CUDA, ``random``, NumPy) is saved and
restored around it. For iterable-style datasets, which cannot be indexed, the callback
instead copies the first batches the training loop yields (:class:`BatchRecorder`).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from .functional._per_sample import batch_size

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
    if loaders is None:
        return None
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for item in loaders:
            found = first_loader(item)
            if found is not None:
                return found
        return None
    iterables = getattr(loaders, "iterables", None)  # a CombinedLoader
    return first_loader(iterables) if iterables is not None else None


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
    """Copies the first training batches (detached, cloned) until ``num`` samples are held."""

    def __init__(self, num: int) -> None:
        self.num = num
        self.batches: list[Any] = []
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.num

    def add(self, batch: Any) -> None:
        if self.full:
            return
        self.batches.append(tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, batch))
        self.count += batch_size_of(batch)


def shard(batches: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of whole mini-batches: ``batches[rank::world_size]``."""
    return list(batches[rank::world_size])


def dataset_size(loader: DataLoader | None) -> int | None:
    """The number of samples of a loader's dataset, or ``None`` when it has no length."""
    try:
        return len(loader.dataset) if loader is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


def first_batches(loader: DataLoader, num: int) -> list[Any]:
    """The loader's first batches holding at least ``num`` samples, read without touching any RNG."""
    with preserved_rng():
        taken, count = [], 0
        for batch in loader:
            taken.append(batch)
            count += batch_size_of(batch)
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
