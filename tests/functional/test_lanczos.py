"""Lanczos with partial reorthogonalization, against dense matrices with known spectra.

Long runs (``tol`` tiny, 100+ iterations) are where a Lanczos basis loses orthogonality and
spurious copies ("ghosts") of converged Ritz values appear; these tests hold the eigenpairs to
``eigvalsh``, the basis to semi-orthogonality, and count the full reorthogonalizations.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from lightning_flatness.functional import DenseOperator, lanczos
from lightning_flatness.functional._rows import Rows
from lightning_flatness.functional.hessian_eigenvalues import ChunkRayleighQuotients
from lightning_flatness.functional.lanczos import _Krylov, _lanczos_run

DIM = 300


def _spectrum(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    bulk = torch.rand(DIM, generator=g, dtype=torch.float64)
    if kind == "separated":  # a few outliers over a bulk, like a network's Hessian
        return torch.cat([torch.tensor([100.0, 60.0, 40.0, 30.0], dtype=torch.float64), 10 * bulk[4:] - 2])
    if kind == "clustered":  # the top five within 1e-4 relative of each other
        return torch.cat([10 + 1e-3 * torch.arange(5, dtype=torch.float64), 5 * bulk[5:]])
    return torch.linspace(-1.0, 1.0, DIM, dtype=torch.float64)  # "uniform": benign, nothing converges early


def _operator(kind: str, dtype: torch.dtype) -> tuple[DenseOperator, torch.Tensor]:
    """A dense operator with the spectrum ``kind`` in a random eigenbasis, and a start vector."""
    g = torch.Generator().manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    a = (basis * _spectrum(kind)) @ basis.T
    return DenseOperator(((a + a.T) / 2).to(dtype)), torch.randn(DIM, generator=g, dtype=torch.float64).to(dtype)


def _loss_of_orthogonality(run: _Krylov) -> float:
    q = run.basis.view().double()
    return (q @ q.T - torch.eye(len(q), dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("kind", ["separated", "clustered"])
def test_top_eigenpairs_one_to_one_over_long_runs(kind):
    operator, start = _operator(kind, torch.float64)
    out, run = _lanczos_run(operator, start, k=6, tol=1e-300, max_iter=150, generator=0)
    assert out.n_products >= 100
    exact, vectors = torch.linalg.eigh(operator.matrix)
    exact, vectors = exact.flip(0)[:6], vectors.flip(1)[:, :6].T
    # One to one: a ghost would repeat a top value and push the others down a place.
    assert torch.allclose(out.values, exact, rtol=1e-12, atol=0)
    assert ((out.vectors * vectors).sum(1).abs() > 1 - 1e-10).all()
    residual = (out.vectors @ operator.matrix - out.values[:, None] * out.vectors).norm(dim=1)
    assert residual.max() < 1e-8 * exact[0]
    # The coefficients give the returned (unit) vectors exactly, orthogonal basis or not.
    assert torch.allclose(out.coefficients.T @ run.basis.view(), out.vectors, atol=1e-14)


def test_without_reorthogonalization_ghosts_appear(monkeypatch):
    """The control for the test above: plain Lanczos on the same matrix repeats its top value."""
    init = _Krylov.__init__

    def never(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.threshold = math.inf

    monkeypatch.setattr(_Krylov, "__init__", never)
    operator, start = _operator("separated", torch.float64)
    out, run = _lanczos_run(operator, start, k=2, tol=1e-300, max_iter=150, generator=0)
    assert run.n_reorth == 0 and _loss_of_orthogonality(run) > 0.1
    assert out.values[1].item() == pytest.approx(100.0, rel=1e-8)  # a ghost of the top value


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["separated", "clustered", "uniform"])
def test_basis_stays_semi_orthogonal(kind, dtype):
    operator, start = _operator(kind, dtype)
    out, run = _lanczos_run(operator, start, k=6, tol=1e-300, max_iter=150, generator=0)
    assert out.n_products >= 100
    assert _loss_of_orthogonality(run) <= math.sqrt(torch.finfo(dtype).eps)
    exact = torch.linalg.eigvalsh(operator.matrix.double()).flip(0)[:6]
    assert torch.allclose(out.values.double(), exact, rtol=0, atol=50 * torch.finfo(dtype).eps * exact.abs().max())


@pytest.mark.parametrize("dtype, share", [(torch.float64, 0.05), (torch.float32, 0.15)])
def test_few_full_reorthogonalizations_on_a_benign_spectrum(dtype, share):
    """The cost claim as a count: most iterations are the three-term recurrence alone."""
    operator, start = _operator("uniform", dtype)
    out, run = _lanczos_run(operator, start, k=6, tol=1e-300, max_iter=150, generator=0)
    assert out.n_products == 150
    assert 0 < run.n_reorth <= share * out.n_products, run.n_reorth


def test_restart_on_breakdown_keeps_the_basis_orthogonal():
    """A start in a 3-dimensional invariant subspace breaks down at step 3; every eigenvalue is still found."""
    a = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    start = torch.zeros(40, dtype=torch.float64)
    start[:3] = 1.0
    out, run = _lanczos_run(DenseOperator(a), start, k=40, tol=1e-300, max_iter=40, generator=0)
    assert run.betas[2] == 0.0 and run.dropped < 1e-12  # restarted after the invariant subspace
    assert torch.allclose(out.values, torch.arange(40.0, 0.0, -1.0, dtype=torch.float64), rtol=1e-12)
    assert _loss_of_orthogonality(run) <= math.sqrt(torch.finfo(torch.float64).eps)


def test_rows_grow_by_doubling_up_to_the_limit():
    like = torch.zeros(4)
    rows = Rows(like, limit=5, capacity=2)
    for i in range(5):
        row = rows.append(torch.full((4,), float(i)))
        assert row.data_ptr() == rows.view()[i].data_ptr()
    assert rows._data.shape == (5, 4) and rows.view().is_contiguous()
    assert torch.equal(rows.view(3)[:, 0], torch.tensor([0.0, 1.0, 2.0])) and rows[-1][0] == 4.0
    with pytest.raises(RuntimeError, match="limit=5"):
        rows.append(like)
    with pytest.raises(IndexError):
        rows[5]


def test_rayleigh_observer_copies_each_vector_once_and_holds_no_reference():
    observer = ChunkRayleighQuotients()
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    for i in range(3):
        v = torch.eye(3, dtype=torch.float64)[i].clone()
        for _ in range(2):  # two chunks of one product, the same tensor object
            observer(v, matrix @ v, 1)
        ref = weakref.ref(v)
        del v  # the next vector may take this one's id
        assert ref() is None
    assert len(observer.basis) == 3 and observer.sizes == [1, 1]
    expected = torch.tensor([[3.0, 2.0, 1.0]] * 2, dtype=torch.float64)  # per chunk: the diagonal
    assert torch.equal(observer.quotients(torch.eye(3, dtype=torch.float64)), expected)


# ------------------------------------------------------------------------------------------------
# What one Krylov space cannot see: repeated eigenvalues, a start deficient in the top eigenvector.
# ------------------------------------------------------------------------------------------------
def _dense(values: torch.Tensor, seed: int) -> tuple[DenseOperator, torch.Tensor]:
    """``values`` in a random orthonormal eigenbasis (its columns returned, in the order of ``values``)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return DenseOperator((basis * values) @ basis.T), basis


@pytest.mark.parametrize("copies", [2, 3])
def test_a_repeated_top_eigenvalue_is_found_as_often_as_it_repeats(copies):
    """One Krylov space holds a single vector of a repeated eigenvalue: before the check, k=2 gave [5, 3.98]."""
    values = torch.cat([torch.full((copies,), 5.0), torch.linspace(0, 4, 200 - copies)]).double()
    operator, _ = _dense(values, seed=0)
    start = torch.randn(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = lanczos(operator, start, k=copies + 1, tol=1e-3)
    assert out.converged and out.n_checks >= copies - 1
    assert torch.allclose(out.values[:copies], torch.full((copies,), 5.0, dtype=torch.float64), rtol=1e-3)
    assert abs(out.values[copies].item() - 4.0) <= out.residuals[copies].item()  # the bulk's edge, within its residual
    residual = (out.vectors @ operator.matrix - out.values[:, None] * out.vectors).norm(dim=1)
    assert (residual <= 1e-3**0.5 * out.values).all()  # criterion (b): each pair an eigenpair of A itself
    assert (residual <= out.residuals * (1 + 1e-6) + 1e-12).all()  # as reported (a bound for the checks' pairs)
    assert (out.vectors @ out.vectors.T - torch.eye(copies + 1, dtype=torch.float64)).abs().max() < 1e-6
    # The control: the single run alone misses the second copy (the check finds it). At tol=1e-4 it runs
    # long enough on this spectrum for rounding to bring the copy in: a matter of luck, not of design.
    single = lanczos(operator, start, k=2, tol=1e-3, verify=False)
    assert single.converged and single.values[1].item() < 4.5


@pytest.mark.parametrize("seed", range(12))
def test_a_start_near_the_second_eigenvector_still_finds_the_top(seed):
    """Last epoch's eigenvector after the top two traded places: the run converges to λ₂; the check finds λ₁."""
    g = torch.Generator().manual_seed(100 + seed)
    dim = (60, 300, 1000)[seed % 3]
    values = torch.cat([torch.tensor([1.0, 0.8, 0.75]), 0.5 * torch.rand(dim - 3, generator=g) - 0.2]).double()
    operator, basis = _dense(values, seed)
    start = basis[:, 1] + 1e-3 * torch.randn(dim, generator=g, dtype=torch.float64)
    single = lanczos(operator, start, verify=False)
    assert single.converged and single.values[0].item() == pytest.approx(0.8, rel=1e-3)  # the defect it guards
    out = lanczos(operator, start)
    assert out.converged and out.n_checks == 1
    assert out.values[0].item() == pytest.approx(1.0, rel=1e-4)
    assert abs(out.vectors[0] @ basis[:, 0]) > 1 - 1e-3


def test_the_check_stops_early_below_a_well_separated_top():
    """Nothing above: the check stops once its top Ritz value has settled below (long before it converges
    to the bulk's edge, which a uniform bulk makes slow), and the values are unchanged."""
    values = torch.cat([torch.tensor([10.0]), torch.linspace(-1, 1, 299)]).double()
    operator, _ = _dense(values, seed=3)
    start = torch.randn(300, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    single, out = lanczos(operator, start, verify=False), lanczos(operator, start)
    assert out.n_checks == 1 and torch.equal(out.values, single.values) and torch.equal(out.vectors, single.vectors)
    assert out.n_products - single.n_products < 25
    tight = lanczos(operator, start, tol=1e-10, verify=False)
    assert tight.values[0].item() == pytest.approx(10.0, rel=1e-12)
    assert lanczos(DenseOperator(-operator.matrix), start, verify=False).n_products > 25  # the bulk's edge, converged


@pytest.mark.parametrize("seed", range(4))
def test_stopping_rule_scaled_by_the_top_value_on_a_strongly_negative_spectrum(seed):
    """Top 20 eigenvalues in [0.9, 1], the bulk down to −500: the residual test once scaled with
    max|θ| = 500 and passed with a top-value error of 1.4e-2 to 5.6e-2 (bound 1e-4·θ₁²/gap ≈ 0.019).
    Now ``converged`` keeps the stated bound, and the residuals are the pairs' true residuals."""
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.linspace(1.0, 0.9, 20), torch.linspace(0.5, -500, 280)]).double()
    operator, _ = _dense(values, seed + 10)
    out = lanczos(operator, torch.randn(300, generator=g, dtype=torch.float64), k=1, tol=1e-4)
    bound = 1e-4 * 1.0**2 / (values[0] - values[1]).item()
    assert not out.converged or 1.0 - out.values[0].item() <= bound
    true_residual = (operator.matrix @ out.vectors[0] - out.values[0] * out.vectors[0]).norm()
    assert out.residuals[0].item() == pytest.approx(true_residual.item(), rel=1e-6, abs=1e-10)


def test_a_separated_top_over_a_strongly_negative_bulk_converges_within_the_bound():
    values = torch.cat([torch.tensor([1.0, 0.5]), torch.linspace(0.4, -500, 298)]).double()
    operator, _ = _dense(values, seed=5)
    out = lanczos(operator, torch.randn(300, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    assert out.converged
    assert 0 <= 1.0 - out.values[0].item() <= 1e-4 * 1.0**2 / 0.5


@pytest.mark.parametrize(
    "values, k, seed",
    [
        # Negative definite: 0, the deflated operator's eigenvalue on the held span, is above the whole
        # complement; its rounding-level components once grew through the recurrence to O(1) (20.22 returned).
        (torch.cat([torch.tensor([-1.0]), torch.linspace(-10, -11, 99)]), 1, 1),
        (torch.cat([torch.full((3,), -1.0), torch.linspace(-2, -50, 117)]), 5, 1),
        # A narrow positive bulk: the same growth returned a third copy of 12 (two parallel vectors).
        (torch.cat([torch.tensor([12.0, 12.0]), torch.linspace(10, 11, 98)]), 3, 2),
    ],
)
def test_the_check_stays_in_the_complement_when_zero_is_outside_its_spectrum(values, k, seed):
    operator, _ = _dense(values.double(), seed=seed)
    start = torch.randn(len(values), generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    out = lanczos(operator, start, k=k, generator=seed)
    exact = values.double().sort(descending=True).values[:k]
    assert out.converged and torch.allclose(out.values, exact, rtol=1e-3)
    assert (out.vectors @ out.vectors.T - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-6
    true_residual = (out.vectors @ operator.matrix - out.values[:, None] * out.vectors).norm(dim=1)
    assert (true_residual <= out.residuals * (1 + 1e-6) + 1e-10).all()


def test_a_check_in_a_complement_of_zeros_restarts_instead_of_following_rounding():
    """{2, 1, 0 × 8}, k=7: the check's own |θ| is ~1e-17, so its breakdown test took rounding for a step;
    it is now scaled by the first run's ‖A‖, and the vectors of 0 come out orthonormal."""
    operator, _ = _dense(torch.tensor([2.0, 1.0] + [0.0] * 8, dtype=torch.float64), seed=0)
    start = torch.randn(10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = lanczos(operator, start, k=7)
    assert torch.allclose(out.values, torch.tensor([2.0, 1.0] + [0.0] * 5, dtype=torch.float64), atol=1e-10)
    assert (out.vectors @ out.vectors.T - torch.eye(7, dtype=torch.float64)).abs().max() < 1e-8
