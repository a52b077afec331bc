"""Per-block curvature against the dense Hessian's diagonal blocks ``H[idx][:, idx]``, and the block patterns."""

import math

import pytest
import torch
from torch import nn

from lightning_flatness.functional import (
    Objective,
    block_curvature,
    hessian_eigenvalues,
    hutchinson_trace,
    measurement_mode,
    resolve_blocks,
)
from lightning_flatness.functional.block_curvature import BlockCurvatureResult
from lightning_flatness.functional._stats import mean_and_se
from tests.helpers.lightning_models import Classifier
from tests.helpers.models import mlp_batches, tiny_mlp
from tests.helpers.oracles import dense_hessian

RUNS = 200
PROBES = 4


def dense_index(model: nn.Module, params) -> list[int]:
    """The positions of the named parameters in the flat vector of all trainable ones (the oracle's layout)."""
    where, offset = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            where[name] = range(offset, offset + p.numel())
            offset += p.numel()
    return [i for name in params for i in where[name]]


def block_operator(model, batches, params, cache_chunks=0):
    """``H_BB`` as a curvature operator: the objective of the block's parameters, the others held fixed."""
    return Objective(model, batches, params=params).hessian_operator(cache_chunks)


def dense_blocks(model, batches, blocks="by_module") -> dict[str, torch.Tensor]:
    h = dense_hessian(model, batches)
    out = {}
    for name, params in resolve_blocks(model, blocks).items():
        idx = dense_index(model, params)
        out[name] = h[idx][:, idx]
    return out


def test_block_operator_is_the_dense_sub_block(model_and_batches):
    model, batches = model_and_batches
    named = dict(model.named_parameters())
    exact = dense_blocks(model, batches)
    for name, params in resolve_blocks(model).items():
        for cache in (0, 1, 2):  # products recomputed per chunk, or from kept gradient graphs
            with measurement_mode(model):
                operator = block_operator(model, batches, [named[p] for p in params], cache)
                assert operator.shape == exact[name].shape
                assert torch.allclose(operator.to_dense(), exact[name], rtol=0, atol=1e-10), name


@pytest.mark.parametrize("blocks", ["by_module", {"weights": ["0.weight", "*.weight"], "biases": "*.bias"}])
def test_top_eigenvalue_matches_the_dense_block(model_and_batches, blocks):
    model, batches = model_and_batches
    if isinstance(blocks, dict) and len(list(model.parameters())) != 4:
        blocks = {"weights": "*.weight", "biases": ["0.bias", "[14].bias"]}  # the CNN: 0 conv, 1 bn, 4 linear
    exact = dense_blocks(model, batches, blocks)
    results = block_curvature(model, batches, blocks=blocks, tol=1e-10, max_iter=200, trace_probes=PROBES)
    assert list(results) == list(exact)
    for name, r in results.items():
        top = torch.linalg.eigvalsh(exact[name])[-1].item()
        assert r.converged and abs(r.top_eig - top) <= 1e-8 * abs(top), (name, r.top_eig, top)
        assert r.num_params == exact[name].shape[0] and r.vector.shape == (r.num_params,)
        assert (exact[name] @ r.vector - r.top_eig * r.vector).norm() < 1e-4 * abs(top)
        assert math.isfinite(r.top_eig_se) and r.top_eig_se > 0  # several mini-batches: a batch-means error
        exact_trace = r.num_params <= PROBES  # the BatchNorm block: P_B unit vectors instead of probes
        assert r.n_grad == 1 and r.n_hvp > (r.num_params if exact_trace else PROBES)
        if exact_trace:
            assert r.trace == pytest.approx(exact[name].trace().item(), abs=1e-12)
            shares = torch.tensor([dense_blocks(model, [b], blocks)[name].trace().item() for b in batches], dtype=torch.float64)
            sizes = torch.tensor([float(len(b[1])) for b in batches], dtype=torch.float64)
            assert r.trace_se == pytest.approx(mean_and_se(shares, sizes)[1].item(), rel=1e-8)  # batch means


def test_blocks_interlace_with_the_whole_hessian():
    """Cauchy interlacing: a diagonal block's top eigenvalue is at most the Hessian's."""
    model, batches = tiny_mlp(), mlp_batches()
    whole = hessian_eigenvalues(model, batches, tol=1e-10).values[0].item()
    for r in block_curvature(model, batches, tol=1e-10).values():
        assert r.top_eig <= whole * (1 + 1e-9)


def test_trace_is_unbiased_with_honest_stderr():
    model, batches = tiny_mlp(), mlp_batches()
    h = dense_blocks(model, batches)["0"]  # 30 parameters: Hutchinson with 4 probes
    off = h - torch.diag(h.diagonal())
    exact_se = math.sqrt(2 * (off**2).sum().item() / PROBES)  # Var(zᵀHz) = 2 Σ_{i≠j} H_ij² per probe
    one = block_curvature(model, batches, blocks={"a": "0.*"}, trace_probes=PROBES, max_iter=1)["a"]
    assert one.n_hvp == 1 + PROBES and one.n_grad == 1  # max_iter=1: one Lanczos product, then the probes
    with measurement_mode(model):  # the same estimator on the block operator, graphs kept: fast repeats
        operator = block_operator(model, batches, list(model[0].parameters()), cache_chunks=3)
        runs = [hutchinson_trace(operator, PROBES, generator=s) for s in range(RUNS)]
    values = torch.tensor([r.value for r in runs])
    assert abs(values.mean().item() - h.trace().item()) <= 3 * values.std().item() / math.sqrt(RUNS)
    assert values.std().item() == pytest.approx(exact_se, rel=0.25)
    reported = torch.tensor([r.probe_se for r in runs]).pow(2).mean().sqrt().item()
    assert reported == pytest.approx(values.std().item(), rel=0.25)


def test_warm_start_and_a_given_gradient_save_the_start_pass():
    model, batches = tiny_mlp(), mlp_batches()
    cold = block_curvature(model, batches, tol=1e-8)
    full_grad = Objective(model, batches).gradient()
    given = block_curvature(model, batches, tol=1e-8, gradient=full_grad)
    warm = block_curvature(model, batches, tol=1e-8, init={name: r.vector for name, r in cold.items()})
    for name, r in cold.items():
        assert given[name].n_grad == 0 and warm[name].n_grad == 0
        assert given[name].top_eig == pytest.approx(r.top_eig, rel=1e-6)  # the block's slice of ∇L: the same start
        assert warm[name].n_hvp < r.n_hvp and warm[name].top_eig == pytest.approx(r.top_eig, rel=1e-6)


def test_each_block_has_its_own_random_stream():
    model, batches = tiny_mlp(), mlp_batches()
    both = block_curvature(model, batches, blocks={"a": "0.*", "b": "2.*"}, trace_probes=PROBES, generator=3)
    alone = block_curvature(model, batches, blocks={"b": "2.*"}, trace_probes=PROBES, generator=3)
    assert (both["b"].trace, both["b"].top_eig) == (alone["b"].trace, alone["b"].top_eig)


class WithScale(nn.Module):
    """A parameter on the root, a module with a frozen and a tied parameter, and a parameter-free child."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.encoder = nn.Linear(3, 3)
        self.decoder = nn.Linear(3, 3)
        self.decoder.weight = self.encoder.weight  # tied: belongs to the first module that names it
        self.act = nn.Tanh()
        self.frozen = nn.Linear(3, 3).requires_grad_(False)


def test_by_module_looks_through_wrappers_and_names_root_parameters():
    assert resolve_blocks(Classifier()) == {
        "0": ["net.0.weight", "net.0.bias"], "1": ["net.1.weight", "net.1.bias"], "4": ["net.4.weight", "net.4.bias"],
    }  # fmt: skip
    assert resolve_blocks(WithScale()) == {
        "scale": ["scale"], "encoder": ["encoder.weight", "encoder.bias"], "decoder": ["decoder.bias"],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("blocks", "error", "match"),
    [
        ({"head": "classifier.*"}, ValueError, r"blocks\['head'\].*'classifier\.\*' matches no.*'0\.weight', '0\.bias'"),
        ({"a": "0.*", "b": "*.weight"}, ValueError, r"blocks: parameter '0\.weight' is in two blocks, 'a' and 'b'"),
        ("by_layer", ValueError, r"blocks='by_layer' is not accepted.*by_module"),
        ({"a/b": "0.*"}, ValueError, r"blocks: block name 'a/b'"),
        ({"a.b": "0.*"}, ValueError, r"blocks: block name 'a\.b'"),
        ({}, TypeError, "blocks must be"),
        (3, TypeError, "blocks must be"),
        ({"a": []}, TypeError, r"blocks\['a'\] must be a glob pattern"),
    ],
)
def test_bad_blocks_are_refused_naming_the_argument(blocks, error, match):
    with pytest.raises(error, match=match):
        block_curvature(tiny_mlp(), mlp_batches(), blocks=blocks)


def test_a_gradient_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r"gradient must be the flat ∇L over the 51 trainable parameters"):
        block_curvature(tiny_mlp(), mlp_batches(), gradient=torch.zeros(21, dtype=torch.float64))


def test_the_result_is_a_plain_record():
    r = block_curvature(tiny_mlp(), mlp_batches(), blocks={"head": "2.*"}, trace_probes=PROBES)["head"]
    assert isinstance(r, BlockCurvatureResult) and r.params == ("2.weight", "2.bias") and r.num_params == 21
