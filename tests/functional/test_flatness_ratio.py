"""The ratio of flatnesses Σ_b w_b λ_max(H_b) / λ_max(H) (Huszár): against dense per-mini-batch Hessians, at least
1, exactly 1 for identical mini-batches, its error rule and standard errors against the spread over redrawn
subsamples, two processes equal to one, and its behaviour under the layer rescaling of Dinh et al. (2017)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_flatness.functional import (
    flatness_ratio,
    hessian_eigenvalues,
)
from tests.functional.test_standard_errors import draws
from tests.helpers.distributed import in_two_processes
from tests.helpers.models import mlp_batches, relu_mlp, rescaled_twin, tiny_mlp
from tests.helpers.oracles import dense_hessian

TIGHT = dict(error_ratio=None, tol=1e-12)


def dense_parts(model, batches):
    """``(w_b, λ_max(H_b), λ_max(H), v, H_b)`` from dense Hessians (``H = Σ w_b H_b``)."""
    hessians = [dense_hessian(model, [b]) for b in batches]
    sizes = torch.tensor([float(len(b[1])) for b in batches], dtype=torch.float64)
    w = sizes / sizes.sum()
    evals, evecs = torch.linalg.eigh(sum(wb * h for wb, h in zip(w, hessians)))
    tops = torch.stack([torch.linalg.eigvalsh(h)[-1] for h in hessians])
    return w, tops, evals[-1], evecs[:, -1], hessians


def weighted_se(values, w):
    """The weighted batch-means standard error of ``Σ w_b x_b`` (``Σ w_b = 1``)."""
    m = len(values)
    return (m / (m - 1) * (w**2 * (values - (w * values).sum()) ** 2).sum()).sqrt().item()


def test_matches_dense_per_batch_hessians(model_and_batches):
    model, batches = model_and_batches  # unequal mini-batches: 5, 7, 8 (MLP) and 4, 6 samples (CNN with BatchNorm)
    w, tops, top, v, hessians = dense_parts(model, batches)
    r = flatness_ratio(model, batches, **TIGHT)
    exact = ((w * tops).sum() / top).item()
    assert r.value == pytest.approx(exact, rel=1e-6) and r.value > 1  # measured: 5e-12 (MLP)
    assert r.top_eig == pytest.approx(top.item(), rel=1e-6)
    assert r.batch_top_eig_mean == pytest.approx((w * tops).sum().item(), rel=1e-6)
    assert torch.allclose(r.batch_top_eigs, tops, rtol=1e-6, atol=0)
    quotients = torch.stack([v @ h @ v for h in hessians])  # vᵀ H_b v: the denominator's per-batch parts
    assert torch.allclose(r.batch_quotients, quotients, rtol=1e-6, atol=1e-12)
    assert r.batch_top_eig_mean_se == pytest.approx(weighted_se(tops, w), rel=1e-6)
    assert r.top_eig_se == pytest.approx(weighted_se(quotients, w), rel=1e-6)
    assert r.se == pytest.approx(weighted_se((tops - exact * quotients) / top, w), rel=1e-6)  # delta method
    assert r.num_batches == len(batches) and r.batch_sizes.tolist() == [len(b[1]) for b in batches]
    assert r.converged and r.n_grad == 1 and r.n_hvp > 0 and r.n_batch_hvp > 0
    assert r.n_hvp < r.hvp_equivalent < r.n_hvp + r.n_batch_hvp


@pytest.mark.parametrize("seed", range(4))
def test_ratio_is_at_least_one_even_at_a_loose_tolerance(seed):
    # Each mini-batch's Krylov space holds v: its Ritz value is >= vᵀ H_b v, whose weighted mean is vᵀ H v.
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    batches = mlp_batches((6, 9, 4, 11), seed=seed)
    w, tops, top, _, _ = dense_parts(model, batches)
    assert ((w * tops).sum() / top).item() >= 1  # convexity of λ_max
    for options in ({}, dict(error_ratio=None, tol=0.1, verify=False), dict(error_ratio=1.0, max_iter=2)):
        assert flatness_ratio(model, batches, **options).value >= 1 - 1e-12


def test_identical_mini_batches_give_exactly_one():
    model, (batch,) = tiny_mlp(), mlp_batches((8,))
    r = flatness_ratio(model, [batch] * 4, **TIGHT)
    assert r.value == pytest.approx(1.0, abs=1e-9) and r.se == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(r.batch_top_eigs, torch.full((4,), r.top_eig, dtype=torch.float64), rtol=1e-9)
    assert flatness_ratio(model, [batch] * 4).value == pytest.approx(1.0, abs=1e-6)  # the default rule


def test_default_rule_keeps_the_error_within_a_tenth_of_the_standard_error(model_and_batches):
    model, batches = model_and_batches
    tight, loose = flatness_ratio(model, batches, **TIGHT), flatness_ratio(model, batches)
    assert abs(loose.value - tight.value) <= 0.1 * tight.se
    assert abs(loose.batch_top_eig_mean - tight.batch_top_eig_mean) <= 0.1 * tight.batch_top_eig_mean_se
    assert loose.n_batch_hvp < tight.n_batch_hvp


def test_a_given_pair_is_used_without_products():
    model, batches = tiny_mlp(), mlp_batches()
    pair = hessian_eigenvalues(model, batches, tol=1e-10)
    given = flatness_ratio(model, batches, eigenvalue=pair.values[0].item(), eigenvector=-3 * pair.vectors[0], **TIGHT)
    own = flatness_ratio(model, batches, **TIGHT)
    assert given.n_hvp == 0 and given.n_grad == 0 and given.top_eig == pair.values[0].item()
    assert given.value == pytest.approx(own.value, rel=1e-9) and given.se == pytest.approx(own.se, rel=1e-6)


def test_standard_errors_match_the_spread_over_redrawn_subsamples():
    # 100 subsamples of 128 (8 mini-batches of 16) from a pool of 1024, tiny MLP. Measured: ratio spread 0.0469,
    # mean se 0.0407 (0.87); numerator 0.0315 vs 0.0283 (0.90); denominator 0.0195 vs 0.0228 (1.17).
    model, numerators = tiny_mlp(), []

    def estimate(batches):
        r = flatness_ratio(model, batches, generator=len(numerators))
        numerators.append((r.batch_top_eig_mean, r.batch_top_eig_mean_se))
        return r.value, r.se

    spread, se = draws(128, estimate)
    assert se == pytest.approx(spread, rel=0.25)
    values = torch.tensor(numerators)
    assert values[:, 1].mean().item() == pytest.approx(values[:, 0].std().item(), rel=0.25)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(eigenvalue=1.0), ValueError, "eigenvalue and eigenvector go together"),
        (dict(eigenvector=torch.ones(51, dtype=torch.float64)), ValueError, "eigenvalue and eigenvector"),
        (dict(eigenvalue=1.0, eigenvector=torch.ones(5)), ValueError, r"shape \(51,\)"),
        (dict(eigenvalue=1.0, eigenvector=torch.zeros(51)), ValueError, "nonzero"),
        (dict(error_ratio=0.0), ValueError, "error_ratio"),
        (dict(error_ratio=2.0), ValueError, "error_ratio"),
        (dict(tol=0.0), ValueError, "tol"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(verify="yes"), TypeError, "verify"),
        (dict(batch_indices=[0]), ValueError, "batch_indices must give one index per mini-batch: 1 for 3"),
    ],
)
def test_bad_arguments_are_refused_naming_them(options, error, match):
    with pytest.raises(error, match=match):
        flatness_ratio(tiny_mlp(), mlp_batches(), **options)


def rescaling_numbers(alphas=(0.1, 1.0, 10.0)) -> dict[float, tuple[float, float, float]]:
    """``{α: (ratio, λ_max(H), Σ w_b λ_max(H_b))}`` of the ReLU MLP's rescaled twins: docs/metrics.md's numbers."""
    model, batches = relu_mlp(), mlp_batches()
    out = {}
    for alpha in alphas:
        r = flatness_ratio(rescaled_twin(model, alpha), batches, **TIGHT)
        out[alpha] = (r.value, r.top_eig, r.batch_top_eig_mean)
    return out


def test_layer_rescaling_moves_the_ratio_far_less_than_the_eigenvalues_but_it_is_not_invariant():
    # Dinh et al. (2017): the same function, H_b -> D H_b D for every mini-batch alike. Measured:
    # ratio 1.3125 / 1.2003 / 1.0392 and λ_max(H) 23.39 / 0.6922 / 20.69 at α = 0.1 / 1 / 10.
    numbers = rescaling_numbers()
    (low, low_top, _), (one, one_top, _), (high, high_top, _) = numbers[0.1], numbers[1.0], numbers[10.0]
    assert low_top / one_top > 10 and high_top / one_top > 10  # the top eigenvalue is not invariant ...
    assert all(value >= 1 for value in (low, one, high))
    assert 0.8 < low / one < 1.2 and 0.8 < high / one < 1.2  # ... the ratio moves within 15% here ...
    assert high < one - 0.1 and low > one + 0.1  # ... but it moves: the same data, so every difference is real


def _shard(rank: int) -> tuple:
    """One process's ratio on its shard (uneven: one mini-batch against three), reduced across both."""
    model, batches = tiny_mlp(), mlp_batches((5, 7, 8, 6))
    indices = [0] if rank == 0 else [1, 2, 3]
    r = flatness_ratio(model, [batches[i] for i in indices], generator=3, batch_indices=indices)
    return (r.value, r.se, r.batch_top_eig_mean, r.batch_top_eig_mean_se, r.top_eig, r.top_eig_se, r.n_batch_hvp,
            r.num_batches, r.hvp_equivalent)  # fmt: skip


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one():
    results = in_two_processes(_shard)
    r = flatness_ratio(tiny_mlp(), mlp_batches((5, 7, 8, 6)), generator=3)
    want = (r.value, r.se, r.batch_top_eig_mean, r.batch_top_eig_mean_se, r.top_eig, r.top_eig_se, r.n_batch_hvp,
            r.num_batches, r.hvp_equivalent)  # fmt: skip
    for result in results:
        assert result == pytest.approx(want, rel=1e-8)
