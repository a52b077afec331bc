import math

import pytest
import torch

from lightning_flatness.functional import (
    DenseOperator,
    hessian_eigenvalues,
    hessian_top_eigenvalue,
    lanczos,
)
from tests.helpers.models import (
    Quadratic,
    mlp_batches,
    model_output_loss,
    quadratic_batches,
    random_symmetric,
    tiny_mlp,
)
from tests.helpers.oracles import dense_hessian


def test_top3_match_dense_eigvalsh_at_tight_tol(model_and_batches):
    model, batches = model_and_batches
    h = dense_hessian(model, batches)
    exact, exact_vecs = torch.linalg.eigh(h)
    exact, exact_vecs = exact.flip(0)[:3], exact_vecs.flip(1)[:, :3].T
    result = hessian_eigenvalues(model, batches, k=3, tol=1e-8)
    assert result.converged
    rel = ((result.values - exact).abs() / exact.abs()).max().item()
    assert rel <= 1e-6, rel
    # Eigenvectors: unit norm, aligned with the exact ones, and H v = λ v.
    assert torch.allclose(result.vectors.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert (result.vectors[0] @ exact_vecs[0]).abs() > 1 - 1e-6
    residual = (result.vectors @ h - result.values[:, None] * result.vectors).norm(dim=1)
    assert residual.max() < 1e-3 * exact[0]


def test_default_tol_is_within_1e3(model_and_batches):
    model, batches = model_and_batches
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches))[-1]
    result = hessian_eigenvalues(model, batches)
    assert result.converged
    assert abs(result.values[0] - exact) / abs(exact) <= 1e-3
    assert result.n_hvp < 60
    assert hessian_top_eigenvalue(model, batches) == pytest.approx(result.values[0].item(), rel=0, abs=0)


def test_warm_start_needs_a_quarter_of_the_hvps(model_and_batches):
    """The warm run itself; with the check in the complement (the default), still cheaper than a checked cold start."""
    model, batches = model_and_batches
    cold = hessian_eigenvalues(model, batches, start="random", verify=False)
    warm = hessian_eigenvalues(model, batches, init=cold.vectors[0], verify=False)
    assert warm.converged
    assert warm.n_hvp * 4 <= cold.n_hvp, (warm.n_hvp, cold.n_hvp)
    assert warm.values[0].item() == pytest.approx(cold.values[0].item(), rel=1e-4)
    checked_cold = hessian_eigenvalues(model, batches, start="random")
    checked_warm = hessian_eigenvalues(model, batches, init=cold.vectors[0])
    assert checked_warm.converged and checked_warm.n_hvp < checked_cold.n_hvp, (checked_warm.n_hvp, checked_cold.n_hvp)
    assert checked_warm.values[0].item() == warm.values[0].item()


def test_warm_start_from_a_block_needs_k_plus_two_hvps(model_and_batches):
    model, batches = model_and_batches
    cold = hessian_eigenvalues(model, batches, k=3, tol=1e-8)
    warm = hessian_eigenvalues(model, batches, k=3, tol=1e-8, init=cold.vectors, verify=False)
    assert warm.converged
    assert warm.n_hvp <= 3 + 2 < cold.n_hvp, (warm.n_hvp, cold.n_hvp)
    assert torch.allclose(warm.values, cold.values, rtol=1e-8)
    checked = hessian_eigenvalues(model, batches, k=3, tol=1e-8, init=cold.vectors)
    assert checked.converged and checked.n_hvp < cold.n_hvp
    assert torch.allclose(checked.values, cold.values, rtol=1e-8)


def test_algebraically_largest_not_largest_magnitude():
    a = torch.diag(torch.tensor([-50.0, -3.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64))
    model = Quadratic(a)
    result = hessian_eigenvalues(model, quadratic_batches(6), model_output_loss, k=2, tol=1e-10)
    assert torch.allclose(result.values, torch.tensor([4.0, 2.0], dtype=torch.float64), atol=1e-8)


def test_quadratic_hessian_is_a_exactly():
    a = random_symmetric(12, shift=1.0)
    model = Quadratic(a)
    exact = torch.linalg.eigvalsh(a).flip(0)[:4]
    result = hessian_eigenvalues(model, quadratic_batches(12), model_output_loss, k=4, tol=1e-10)
    assert torch.allclose(result.values, exact, rtol=1e-8)


def test_not_converged_when_max_iter_is_too_small():
    model, batches = tiny_mlp(), mlp_batches()
    result = hessian_eigenvalues(model, batches, tol=1e-12, max_iter=3)
    assert not result.converged
    assert result.n_hvp == 3


def test_lanczos_on_dense_matrix_with_degenerate_start():
    """A start vector inside an invariant subspace breaks down; the restart still finds the top."""
    a = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    start = torch.zeros(8, dtype=torch.float64)
    start[0] = 1.0  # eigenvector of the *smallest* eigenvalue
    out = lanczos(DenseOperator(a), start, k=1, tol=1e-10, max_iter=50, generator=0)
    assert out.values[0].item() == pytest.approx(8.0, rel=1e-10)


def test_init_block_and_vector_shapes_are_checked():
    model, batches = tiny_mlp(), mlp_batches()
    with pytest.raises(ValueError, match="init"):
        hessian_eigenvalues(model, batches, init=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="init"):
        hessian_eigenvalues(model, batches, init=torch.zeros(51, dtype=torch.float64))
    with pytest.raises(TypeError, match="init"):
        hessian_eigenvalues(model, batches, init=[1.0] * 51)


def test_attention_models_get_hessian_vector_products():
    """Fused attention kernels have no double backward; measurements use the math kernel."""
    from torch import nn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))

    torch.manual_seed(0)
    model = Encoder()
    batches = [(torch.randn(6, 5, 8), torch.randint(0, 3, (6,)))]
    with sdpa_kernel([SDPBackend.MATH]):
        exact = torch.linalg.eigvalsh(dense_hessian(model, batches).double())[-1].item()
    assert hessian_eigenvalues(model, batches).values[0].item() == pytest.approx(exact, rel=1e-3)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("sizes, cache_chunks", [((20,), 1), ((5, 7, 8), 3)])
def test_kept_graphs_give_the_same_products_with_one_forward_per_chunk(sizes, cache_chunks):
    from lightning_flatness.functional import measurement_mode
    from lightning_flatness.functional.objective import Objective

    model, batches = tiny_mlp(), mlp_batches(sizes)
    h = dense_hessian(model, batches)
    with measurement_mode(model):
        objective = Objective(model, batches)
        calls, handle = _count_forwards(model)
        operator = objective.hessian_operator(cache_chunks)
        vectors = torch.randn(4, objective.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        products = [operator @ v for v in vectors]  # the kept graphs serve every product
        assert len(calls) == len(sizes)
        handle.remove()
        for v, hv in zip(vectors, products):
            assert torch.equal(hv, objective.hvp(v))
            assert torch.allclose(hv, h @ v, rtol=1e-10, atol=1e-12)
        # More chunks than cache_chunks: the leading ones kept, a forward of the rest per product.
        calls, handle = _count_forwards(model)
        operator = objective.hessian_operator(len(sizes) - 1)
        assert operator.kept_chunks == len(sizes) - 1 and not operator.keeps_graphs
        assert torch.equal(operator @ vectors[0], products[0]) and len(calls) == len(sizes)
        assert torch.equal(operator @ vectors[1], products[1]) and len(calls) == len(sizes) + 1
        handle.remove()


def test_lanczos_with_kept_graphs_equals_without():
    model, batches = tiny_mlp(), mlp_batches((20,))
    calls, handle = _count_forwards(model)
    cached = hessian_eigenvalues(model, batches, k=2, tol=1e-8, start="random")  # no gradient pass to count
    forwards_cached = len(calls)
    calls.clear()
    plain = hessian_eigenvalues(model, batches, k=2, tol=1e-8, cache_chunks=0, start="random")
    handle.remove()
    assert torch.equal(cached.values, plain.values) and cached.n_hvp == plain.n_hvp
    assert forwards_cached == 1 and len(calls) == plain.n_hvp
    with pytest.raises(ValueError, match="cache_chunks"):
        hessian_eigenvalues(model, batches, cache_chunks=-1)


def test_batches_without_a_length_keep_their_graphs_too():
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            x, y = mlp_batches((20,))[0]
            return iter(zip(x, y))

    model = tiny_mlp()
    loader = DataLoader(Stream(), batch_size=20)
    calls, handle = _count_forwards(model)
    plain = hessian_eigenvalues(model, loader, tol=1e-8, cache_chunks=0)
    assert len(calls) == plain.n_hvp + plain.n_grad  # a forward per product: nothing kept
    calls.clear()
    result = hessian_eigenvalues(model, loader, tol=1e-8)  # "auto": a stream's graphs are kept as it goes
    handle.remove()
    assert len(calls) == 1 + result.n_grad and result.n_hvp == plain.n_hvp
    assert torch.allclose(result.values, hessian_eigenvalues(model, mlp_batches((20,)), tol=1e-8).values, rtol=1e-10)


def test_cold_start_from_the_gradient(monkeypatch):
    import importlib

    from lightning_flatness.functional.objective import Objective

    module = importlib.import_module("lightning_flatness.functional.hessian_eigenvalues")

    seen = []
    original = module.lanczos

    def spy(operator, start, **kwargs):
        seen.append(start.clone())
        return original(operator, start, **kwargs)

    monkeypatch.setattr(module, "lanczos", spy)
    model, batches = tiny_mlp(), mlp_batches()
    h = dense_hessian(model, batches)
    default = hessian_eigenvalues(model, batches, generator=3)
    random = hessian_eigenvalues(model, batches, generator=3, start="random")
    assert (default.n_grad, random.n_grad) == (1, 0)
    g = Objective(model, batches).gradient()
    u = torch.randn(g.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(seen[0], g / g.norm() + u / u.norm(), rtol=1e-12)
    assert torch.allclose(seen[1], u / u.norm(), rtol=1e-12)
    exact = torch.linalg.eigvalsh(h)[-1]
    assert default.values[0].item() == pytest.approx(exact.item(), rel=1e-4)
    assert hessian_eigenvalues(model, batches, init=default.vectors).n_grad == 0
    with pytest.raises(ValueError, match="start"):
        hessian_eigenvalues(model, batches, start="gaussian")


def test_gradient_start_at_a_critical_point_falls_back_to_the_gaussian_half():
    model = Quadratic(random_symmetric(6, shift=4.0))
    with torch.no_grad():
        model.w.zero_()
    batches = [torch.zeros(3, 6, dtype=torch.float64)]  # every x_i = w: gradient exactly 0
    result = hessian_eigenvalues(model, batches, model_output_loss, tol=1e-10)
    assert result.n_grad == 1
    assert result.values[0].item() == pytest.approx(torch.linalg.eigvalsh(model.a)[-1].item(), rel=1e-8)


# ------------------------------------------------------------------------------------------------
# Models whose spectra one Krylov space cannot read: a repeated top eigenvalue, a deficient start.
# ------------------------------------------------------------------------------------------------
def _mse(out, y, reduction="sum"):
    return ((out - y) ** 2).mean(1).sum() if reduction == "sum" else ((out - y) ** 2).mean(1)


@pytest.mark.parametrize("k", [2, 3])
def test_every_eigenvalue_of_a_linear_mse_model_is_threefold(k):
    """``nn.Linear(10, 3)`` with ``loss_fn="mse"``: the Hessian is ``(2/3) I₃ ⊗ E[x̃x̃ᵀ]``, so each eigenvalue
    has multiplicity 3. Before the check, k=2 gave [4.1801, 2.5014] against the dense [4.1801, 4.1801]."""
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 3).double()
    x = torch.randn(96, 10, dtype=torch.float64) * torch.linspace(0.5, 3.0, 10, dtype=torch.float64)
    y = torch.randn(96, 3, dtype=torch.float64)
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches, _mse)).flip(0)
    assert exact[0] == pytest.approx(exact[2].item(), rel=1e-12)  # the oracle: threefold
    out = hessian_eigenvalues(model, batches, "mse", k=k)
    assert out.converged
    assert torch.allclose(out.values, exact[:k], rtol=1e-4)
    assert torch.isfinite(out.se).all() and (out.se > 0).all()
    # The warm start from those vectors (the callback's next epoch) keeps them.
    warm = hessian_eigenvalues(model, batches, "mse", k=k, init=out.vectors)
    assert torch.allclose(warm.values, exact[:k], rtol=1e-4)


def test_a_warm_start_near_the_second_eigenvector_finds_the_top():
    """The review's case: MLP 10-30-5 (Tanh, 485 parameters, 128 samples, float64) from ``v₂ + 1e-3·noise``
    returned λ₂ with ``converged=True`` after 2-3 products; the check in the complement finds λ₁."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5)).double()
    x, y = torch.randn(128, 10, dtype=torch.float64), torch.randint(0, 5, (128,))
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
    values, vectors = torch.linalg.eigh(dense_hessian(model, batches))
    init = vectors[:, -2] + 1e-3 * torch.randn(485, dtype=torch.float64)
    single = hessian_eigenvalues(model, batches, init=init, verify=False)
    assert single.converged and single.values[0].item() == pytest.approx(values[-2].item(), rel=1e-4)  # the defect
    out = hessian_eigenvalues(model, batches, init=init)
    assert out.converged and out.values[0].item() == pytest.approx(values[-1].item(), rel=1e-4)
    assert abs(out.vectors[0] @ vectors[:, -1]).item() > 1 - 1e-3
    assert math.isfinite(out.se[0].item())


@pytest.mark.parametrize("k", [2, 4, 5])
def test_least_squares_in_float32_repeated_eigenvalues(k):
    """Plain least squares, ``nn.Linear(50, 4)`` in float32 on Gaussian inputs (every eigenvalue fourfold): the
    check once drifted into the held span and returned values 200x the spectrum with ``converged=True``."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 50, generator=g), torch.randn(2000, 4, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(50, 4)
    xt = torch.cat([x, torch.ones(2000, 1)], 1).double()
    exact = torch.linalg.eigvalsh(torch.kron(torch.eye(4, dtype=torch.float64), xt.T @ xt / 2000 / 2)).flip(0)
    batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, 2000, 500)]
    for seed in range(6):
        out = hessian_eigenvalues(model, batches, "mse", k=k, generator=seed)
        assert out.converged and torch.allclose(out.values.double(), exact[:k], rtol=1e-3), (seed, out.values)
