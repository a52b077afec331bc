import math

import pytest
import torch
import torch.nn.functional as F

from lightning_flatness.functional import fisher_trace
from tests.helpers.models import mlp_batches, tiny_mlp
from tests.helpers.oracles import per_sample_grads_loop, trainable


def test_empirical_equals_per_sample_loop(model_and_batches):
    model, batches = model_and_batches
    sq = torch.cat([per_sample_grads_loop(model, x, y).pow(2).sum(1) for x, y in batches])
    result = fisher_trace(model, batches)
    assert result.value == pytest.approx(sq.mean().item(), rel=1e-10)
    assert result.n_grad == 1


def _exact_mc_moments(model, batches):
    """Per input n: E_c‖∇ℓ(x_n, c)‖² and Var_c under c ~ softmax(model(x_n))."""
    model.eval()
    means, variances = [], []
    for x, _ in batches:
        probs = torch.softmax(model(x), dim=1).detach()
        classes = probs.shape[1]
        for i in range(len(x)):
            norms = torch.stack(
                [per_sample_grads_loop(model, x[i : i + 1], torch.tensor([c])).pow(2).sum() for c in range(classes)]
            )
            m = (probs[i] * norms).sum()
            means.append(m)
            variances.append((probs[i] * (norms - m) ** 2).sum())
    return torch.stack(means), torch.stack(variances)


def test_mc_matches_exact_expectation_within_its_standard_error(model_and_batches):
    model, batches = model_and_batches
    means, variances = _exact_mc_moments(model, batches)
    exact = means.mean().item()
    samples = 400
    result = fisher_trace(model, batches, kind="mc", num_samples=samples, generator=0)
    stderr = math.sqrt(variances.sum().item() / (len(means) ** 2 * samples))
    assert abs(result.value - exact) <= 3 * stderr, (result.value, exact, stderr)
    assert result.n_grad == samples
    # The true and empirical Fisher differ here: the test can tell them apart.
    assert abs(fisher_trace(model, batches).value - exact) > 3 * stderr


def test_mc_for_mse_matches_jacobian_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    batches = [(x, torch.zeros(6, 2, dtype=torch.float64))]
    params = [p for _, p in trainable(model)]
    d = 2
    # ∇ℓ = −(2/D) Jᵀ ε, ε ~ N(0, I): E‖∇ℓ‖² = tr M and Var = 2 tr M², M = (4/D²) J Jᵀ.
    means, variances = [], []
    for i in range(6):
        out = model(x[i])
        jac = torch.stack([torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(out[o], params, retain_graph=True)]) for o in range(d)])
        m = 4 / d**2 * jac @ jac.T
        means.append(m.trace())
        variances.append(2 * (m @ m).trace())
    exact = torch.stack(means).mean().item()
    samples = 500
    stderr = math.sqrt(torch.stack(variances).sum().item() / (36 * samples))
    result = fisher_trace(model, batches, "mse", kind="mc", num_samples=samples, generator=2)
    assert abs(result.value - exact) <= 3 * stderr, (result.value, exact, stderr)


def test_mc_rejects_custom_losses_and_unknown_kinds():
    model, batches = tiny_mlp(), mlp_batches()

    def custom(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    with pytest.raises(ValueError, match="mc"):
        fisher_trace(model, batches, custom, kind="mc")
    with pytest.raises(ValueError, match="kind"):
        fisher_trace(model, batches, kind="true")
    # A custom callable is fine for the empirical Fisher.
    assert fisher_trace(model, batches, custom).value == pytest.approx(fisher_trace(model, batches).value, rel=1e-12)


def test_mc_labels_depend_only_on_the_mini_batch_position():
    """Issue 23, item 5: shards of the mini-batches with their positions (``batch_indices``) draw the
    labels the whole set draws, so the shards' means combine to the whole set's value."""
    model = tiny_mlp()
    batches = [(x, y) for x, y in mlp_batches()] * 2  # 4+ mini-batches: two shards of several each
    whole = fisher_trace(model, batches, kind="mc", num_samples=3, generator=5)
    shards = [(batches[r::2], range(r, len(batches), 2)) for r in (0, 1)]
    parts = [fisher_trace(model, part, kind="mc", num_samples=3, generator=5, batch_indices=idx) for part, idx in shards]
    sizes = [sum(len(b[1]) for b in part) for part, _ in shards]
    combined = sum(p.value * n for p, n in zip(parts, sizes)) / sum(sizes)
    assert combined == pytest.approx(whole.value, rel=1e-12)
    # the same stream for every shard (the old rule) would not combine to it
    old = [fisher_trace(model, part, kind="mc", num_samples=3, generator=5) for part, _ in shards]
    assert sum(p.value * n for p, n in zip(old, sizes)) / sum(sizes) != pytest.approx(whole.value, rel=1e-6)


def test_mc_batch_indices_must_cover_every_mini_batch():
    model, batches = tiny_mlp(), mlp_batches()
    with pytest.raises(ValueError, match="one index per mini-batch"):
        fisher_trace(model, batches, kind="mc", batch_indices=range(len(batches) - 1))
