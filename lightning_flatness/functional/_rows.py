"""Flat vectors kept as the rows of one preallocated, growable matrix (the Lanczos basis)."""

from __future__ import annotations

import torch
from torch import Tensor


class Rows:
    """Vectors of length ``P`` stored as the rows of one ``(capacity, P)`` tensor.

    :meth:`append` copies a vector in once; :meth:`view` is then a contiguous ``(n, P)`` matrix
    for ``Q @ w`` and ``Q.T @ c`` at no further copy (a ``torch.stack`` of ``n`` vectors per use
    costs more than the product itself). The capacity starts at ``capacity`` rows and doubles
    when full, up to ``limit`` rows when one is given, so memory stays within twice the rows
    held (and at ``limit`` rows at most).
    """

    def __init__(self, like: Tensor, limit: int | None = None, capacity: int = 8) -> None:
        self.limit = limit
        self.count = 0
        self._data = torch.empty(self._capped(capacity), like.numel(), dtype=like.dtype, device=like.device)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Tensor:
        """Row ``i`` (a view; negative ``i`` counts from the last row held)."""
        if not -self.count <= i < self.count:
            raise IndexError(f"row {i} of {self.count}")
        return self._data[i % self.count]

    def view(self, stop: int | None = None) -> Tensor:
        """The first ``stop`` rows (default: all held) as one ``(stop, P)`` view."""
        return self._data[: self.count if stop is None else stop]

    def append(self, vector: Tensor, divisor: float | Tensor | None = None) -> Tensor:
        """Copy ``vector`` (divided by ``divisor``, in the same pass) into the next row; return that row."""
        if self.count == self._data.shape[0]:
            self._grow()
        row = self._data[self.count]
        if divisor is None:
            row.copy_(vector.reshape(-1))
        else:
            torch.div(vector.reshape(-1), divisor, out=row)
        self.count += 1
        return row

    def _capped(self, rows: int) -> int:
        return max(1, rows if self.limit is None else min(rows, self.limit))

    def _grow(self) -> None:
        size = self._capped(2 * self._data.shape[0])
        if size == self._data.shape[0]:
            raise RuntimeError(f"Rows is full: limit={self.limit} rows.")
        data = self._data.new_empty(size, self._data.shape[1])
        data[: self.count].copy_(self._data[: self.count])
        self._data = data
