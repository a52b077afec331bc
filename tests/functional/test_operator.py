"""The curvature-operator contract, and each matrix-free algorithm once against a dense matrix."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_flatness.functional import (
    CurvatureOperator,
    DenseOperator,
    Objective,
    hutchinson_diagonal,
    hutchinson_trace,
    lanczos,
    measurement_mode,
)
from tests.helpers.models import cnn_batches, random_symmetric, tiny_cnn
from tests.helpers.oracles import dense_hessian


def test_hessian_operator_is_the_dense_hessian_with_counted_products():
    model, batches = tiny_cnn(), cnn_batches()
    with measurement_mode(model):
        for cache_chunks in (0, 2):  # plain products, and kept gradient graphs
            operator = Objective(model, batches).hessian_operator(cache_chunks)
            assert operator.shape == (123, 123) and operator.is_symmetric and operator.dtype == torch.float64
            assert torch.allclose(operator.to_dense(), dense_hessian(model, batches), rtol=1e-10, atol=1e-12)
            assert operator.n_products == 123
            v = torch.randn(123, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            block = torch.stack([v, 2 * v], dim=1)  # columns
            assert torch.allclose((operator @ block)[:, 1], 2 * operator.matvec(v), rtol=1e-12)
            assert operator.n_products == 123 + 3


def test_operator_rejects_wrong_shapes_and_asymmetric_matrices():
    operator = DenseOperator(random_symmetric(4))
    for bad in (torch.ones(3, dtype=torch.float64), torch.ones(4, 2, 2, dtype=torch.float64), [1.0] * 4):
        with pytest.raises(ValueError, match=r"\(4,\) or \(4, K\)"):
            operator @ bad
    with pytest.raises(ValueError, match="symmetric"):
        DenseOperator(torch.arange(4.0).reshape(2, 2))
    with pytest.raises(NotImplementedError):
        CurvatureOperator(2, torch.float64, "cpu") @ torch.ones(2, dtype=torch.float64)


@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_top_eigenpairs_of_a_dense_operator(k):
    a = random_symmetric(30, seed=7)
    exact, vectors = torch.linalg.eigh(a)
    operator = DenseOperator(a)
    out = lanczos(operator, torch.ones(30, dtype=torch.float64), k=k, tol=1e-12, max_iter=30)
    # max_iter caps each run: the first, and the check in the complement of its vectors
    assert out.converged and out.n_products == operator.n_products <= 2 * 30
    assert torch.allclose(out.values, exact.flip(0)[:k], rtol=1e-9)
    for value, vector in zip(out.values, out.vectors):
        assert torch.allclose(a @ vector, value * vector, atol=1e-6)


def test_lanczos_exhausts_the_krylov_space_exactly():
    a = torch.diag(torch.tensor([5.0, -1.0, 2.0], dtype=torch.float64))
    out = lanczos(DenseOperator(a), torch.ones(3, dtype=torch.float64), k=3, tol=1e-3)
    assert out.n_products == 3 and out.converged
    assert torch.allclose(out.values, torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64), rtol=1e-12)


def test_hutchinson_trace_and_diagonal_are_unbiased_with_the_stated_error():
    a = random_symmetric(12, seed=3, shift=2.0)
    operator = DenseOperator(a)
    off = a - torch.diag(torch.diagonal(a))
    sd_trace = math.sqrt(2 * off.pow(2).sum().item())  # one probe's standard deviation
    gen = torch.Generator().manual_seed(0)
    traces = [hutchinson_trace(operator, num_probes=4, generator=gen) for _ in range(400)]
    values = torch.tensor([t.value for t in traces], dtype=torch.float64)
    assert abs(values.mean().item() - torch.trace(a).item()) < 3 * sd_trace / math.sqrt(4 * 400)
    assert values.std().item() == pytest.approx(sd_trace / 2, rel=0.2)  # S = 4 probes
    assert torch.tensor([t.se for t in traces]).mean().item() == pytest.approx(sd_trace / 2, rel=0.2)
    diag = torch.stack([hutchinson_diagonal(operator, num_probes=4, generator=gen) for _ in range(400)])
    sd_diag = off.pow(2).sum(1).sqrt() / 2  # per entry, S = 4
    assert ((diag.mean(0) - torch.diagonal(a)).abs() < 3.5 * sd_diag / math.sqrt(400)).all()
    assert torch.allclose(diag.std(0), sd_diag, rtol=0.2)
    assert operator.n_products == 400 * 4 * 2
