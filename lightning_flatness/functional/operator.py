"""One curvature-operator contract that every matrix-free algorithm takes (after curvlinops).

A :class:`CurvatureOperator` is a symmetric ``P x P`` matrix known only through its products:
``shape``, ``dtype``, ``device``, ``is_symmetric``, ``A @ v`` for a flat vector ``(P,)`` and
``A @ V`` for a block of columns ``(P, K)``, and ``n_products``, the number of matrix-vector
products made so far (a block of ``K`` columns counts ``K``). Lanczos
(:func:`~lightning_flatness.functional.lanczos`), Hutchinson's trace and diagonal
(:func:`~lightning_flatness.functional.hutchinson_trace`,
:func:`~lightning_flatness.functional.hutchinson_diagonal`), PACGen's exact diagonal entries and
the benchmarks use nothing else, so each algorithm is tested once against a
:class:`DenseOperator` and works unchanged on the Hessian
(:meth:`Objective.hessian_operator <lightning_flatness.functional.Objective.hessian_operator>`)
or on any operator a user writes: subclass and implement :meth:`CurvatureOperator._matmat`.

Example:
    >>> import torch
    >>> from lightning_flatness.functional import DenseOperator, lanczos
    >>> a = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
    >>> a @ torch.ones(3, dtype=torch.float64)
    tensor([ 3.,  1., -2.], dtype=torch.float64)
    >>> round(lanczos(a, torch.ones(3, dtype=torch.float64), k=1).values.item(), 6), a.n_products
    (3.0, 4)
"""

from __future__ import annotations

import torch
from torch import Tensor


class CurvatureOperator:
    """A symmetric linear operator on flat parameter vectors; subclasses implement :meth:`_matmat`."""

    is_symmetric: bool = True

    def __init__(self, num_params: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_params = int(num_params)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_products = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def _matmat(self, rows: Tensor) -> Tensor:
        """``A v`` for every row ``v`` of ``rows`` ``(K, P)``, as rows ``(K, P)`` (rows: one flat vector each)."""
        raise NotImplementedError

    def __matmul__(self, x: Tensor) -> Tensor:
        """``A @ v`` for ``v`` of shape ``(P,)``, or ``A @ V`` for ``V`` of shape ``(P, K)``."""
        if not isinstance(x, Tensor) or x.dim() not in (1, 2) or x.shape[0] != self.num_params:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected a tensor of shape ({self.num_params},) or ({self.num_params}, K), got {got}.")
        rows = x.unsqueeze(0) if x.dim() == 1 else x.T.contiguous()
        out = self._matmat(rows)
        self.n_products += rows.shape[0]
        return out[0] if x.dim() == 1 else out.T

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for one flat vector."""
        return self @ v

    def to_dense(self) -> Tensor:
        """The whole ``P x P`` matrix, by ``P`` products with the unit vectors (small operators only)."""
        return self @ torch.eye(self.num_params, dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, n_products={self.n_products})"


class DenseOperator(CurvatureOperator):
    """A dense symmetric matrix behind the operator contract (tests, small problems)."""

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be a square 2-D tensor, got {getattr(matrix, 'shape', type(matrix))}.")
        if not torch.allclose(matrix, matrix.T):
            raise ValueError("matrix must be symmetric: every algorithm here assumes a self-adjoint operator.")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, rows: Tensor) -> Tensor:
        return rows @ self.matrix  # = (A rows^T)^T, A symmetric


class NegatedOperator(CurvatureOperator):
    """``−A`` for an operator ``A``: the algebraically largest eigenpairs of ``−A`` are ``A``'s smallest,
    negated, so :func:`~lightning_flatness.functional.lanczos` finds either end of a spectrum
    with one convergence rule. Each product is one of ``A`` (counted in both ``n_products``).

    Example:
        >>> import torch
        >>> a = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> NegatedOperator(a) @ torch.ones(3, dtype=torch.float64)
        tensor([-3., -1.,  2.], dtype=torch.float64)
    """

    def __init__(self, operator: CurvatureOperator) -> None:
        if not isinstance(operator, CurvatureOperator):
            raise TypeError(f"operator must be a CurvatureOperator, got {type(operator).__name__}.")
        super().__init__(operator.num_params, operator.dtype, operator.device)
        self.operator = operator

    def _matmat(self, rows: Tensor) -> Tensor:
        return (self.operator @ rows.T).T.neg()
