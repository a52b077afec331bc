"""Kept gradient graphs: the leading chunks within a measured memory budget (``cache_chunks="auto"``)."""

import ctypes
import gc

import pytest
import torch
from torch import nn

from lightning_flatness.functional import Objective, hessian_eigenvalues, measurement_mode
from lightning_flatness.metrics import HessianEigenvalues
from tests.helpers.models import cnn_batches, mlp_batches, tiny_cnn, tiny_mlp


def _products(operator, vectors):
    seen = []
    operator.chunk_observer = lambda v, hv, size: seen.append((hv.clone(), size))
    return torch.stack([operator @ v for v in vectors]), seen


@pytest.mark.parametrize("make", [lambda: (tiny_mlp(), mlp_batches((5, 7, 8, 6))), lambda: (tiny_cnn(), cnn_batches((4, 6, 3)))])
def test_auto_keeps_the_leading_chunks_within_the_budget(make):
    model, batches = make()
    vectors = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with measurement_mode(model):
        objective = Objective(model, batches)
        plain, plain_chunks = _products(objective.hessian_operator(0), vectors)
        one = objective.hessian_operator(1).kept_bytes  # the first chunk's graph, measured
        assert one > 0
        for budget, kept in [(0, 0), (int(1.5 * one), 1), (10**12, len(batches))]:
            operator = objective.hessian_operator("auto", cache_bytes=budget)
            assert operator.kept_chunks == kept and operator.keeps_graphs == (kept == len(batches))
            assert (operator.kept_bytes <= budget) and (kept == 0 or operator.kept_bytes >= one)
            products, chunks = _products(operator, vectors)
            # Kept or rebuilt, each chunk's product is the same computation, in the same order.
            assert torch.equal(products, plain)
            assert [s for _, s in chunks] == [s for _, s in plain_chunks]
            assert all(torch.equal(a, b) for (a, _), (b, _) in zip(chunks, plain_chunks))
        assert objective.hessian_operator("auto").keeps_graphs  # a tiny model's graphs fit 1 GiB


def test_hessian_eigenvalues_are_the_same_whatever_is_kept():
    model, batches = tiny_mlp(), mlp_batches((5, 7, 8, 6))
    runs = [hessian_eigenvalues(model, batches, k=2, tol=1e-8, cache_chunks=c, cache_bytes=b)
            for c, b in [(0, None), (2, None), ("auto", None), ("auto", 1)]]  # fmt: skip
    for run in runs[1:]:
        assert torch.equal(run.values, runs[0].values) and torch.equal(run.se, runs[0].se)
        assert run.n_hvp == runs[0].n_hvp


def _mallinfo():
    try:
        libc = ctypes.CDLL("libc.so.6")
        info = libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("glibc's mallinfo2 is not available to count the allocator's bytes")

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    info.restype = Info
    return lambda: info().uordblks + info().hblkhd


@pytest.mark.parametrize("kind", ["mlp", "cnn_bn"])
def test_kept_bytes_match_what_the_allocator_holds(kind):
    """The measured size of the kept graphs is the memory they hold (CPU, glibc's own count)."""
    used = _mallinfo()
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        batches = [(torch.randn(256, 256), torch.randint(0, 10, (256,))) for _ in range(3)]
    else:
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                              nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))  # fmt: skip
        batches = [(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))) for _ in range(3)]
    with measurement_mode(model):
        objective = Objective(model, batches)
        objective.hessian_operator(0)  # the leaves, once, outside the count
        gc.collect()
        before = used()
        operator = objective.hessian_operator("auto")
        gc.collect()
        held = used() - before
        assert operator.kept_chunks == 3
        assert 0.85 * held <= operator.kept_bytes <= 1.15 * held, (operator.kept_bytes, held)


def test_cache_chunks_is_validated():
    model, batches = tiny_mlp(), mlp_batches()
    with pytest.raises(ValueError, match="cache_chunks must be 'auto'"):
        hessian_eigenvalues(model, batches, cache_chunks="all")
    with pytest.raises(ValueError, match="cache_chunks"):
        hessian_eigenvalues(model, batches, cache_chunks=-1)
    with pytest.raises(TypeError, match="cache_chunks"):
        HessianEigenvalues(cache_chunks=1.5)
    with pytest.raises(ValueError, match="cache_bytes"):
        hessian_eigenvalues(model, batches, cache_bytes=-1)
    assert HessianEigenvalues().cache_chunks == "auto"


def test_a_shuffling_loader_is_kept_whole_or_not_at_all():
    """A loader may yield other chunks on its next pass: a product never mixes kept chunks with rebuilt ones."""
    from torch.utils.data import DataLoader, TensorDataset

    model = tiny_mlp()
    x, y = torch.cat([b[0] for b in mlp_batches((8, 8, 8, 8))]), torch.cat([b[1] for b in mlp_batches((8, 8, 8, 8))])
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with measurement_mode(model):
        exact = Objective(model, [(x, y)]).hvp(v)
        objective = Objective(model, loader)
        for cache, kept in [(2, 0), ("auto", 4)]:
            operator = objective.hessian_operator(cache)
            assert operator.kept_chunks == kept
            assert torch.allclose(operator @ v, exact, rtol=1e-12, atol=1e-14)
        assert objective.hessian_operator("auto", cache_bytes=1).kept_chunks == 0
