"""The Fisher-Rao norm: per-sample directional derivatives against a per-sample-gradient loop, the
bias-free homogeneity identity, invariance to layer rescaling, the double-backward fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional import fisher_rao_norm
from tests.functional.test_standard_errors import pool
from tests.helpers.models import cnn_batches, mlp_batches, relu_mlp, rescaled_twin, tiny_cnn, tiny_mlp
from tests.helpers.oracles import per_sample_grads_loop


def loop_values(model, batches) -> torch.Tensor:
    """⟨w, ∇ℓ_i⟩² for every sample, from per-sample gradients by a Python loop."""
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.cat([(per_sample_grads_loop(model, x, y) @ w) ** 2 for x, y in batches])


@pytest.mark.parametrize("build", [(tiny_mlp, mlp_batches), (tiny_cnn, cnn_batches)], ids=["mlp", "cnn"])
def test_equals_the_per_sample_gradient_loop(build):
    model, batches = build[0](), build[1]()
    expected = loop_values(model, batches)
    result = fisher_rao_norm(model, batches)
    assert result.forward_mode and result.num_samples == expected.numel()
    assert result.value == pytest.approx(expected.mean().item(), rel=1e-10)
    assert result.se == pytest.approx(expected.std().item() / expected.numel() ** 0.5, rel=1e-10)


def deep_relu(bias: bool) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(4, 6, bias=bias), nn.ReLU(), nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, 3, bias=bias)
    ).double()


def function_space_values(model, batches, depth: int) -> torch.Tensor:
    """(L+1)² ⟨∂ℓ_i/∂f, f(x_i)⟩² per sample (Liang et al. 2019, Lemma 2.1)."""
    out = []
    for x, y in batches:
        f = model(x).detach().requires_grad_()
        (df,) = torch.autograd.grad(F.cross_entropy(f, y, reduction="sum"), f)
        out.append((depth * (df * f).sum(1)) ** 2)
    return torch.cat(out)


def test_bias_free_relu_network_equals_the_function_space_form():
    batches = mlp_batches()
    model = deep_relu(bias=False)
    identity = function_space_values(model, batches, depth=3).mean().item()
    assert fisher_rao_norm(model, batches).value == pytest.approx(identity, rel=1e-10)
    # with biases the identity fails: the biases are not part of the homogeneity
    biased = deep_relu(bias=True)
    assert fisher_rao_norm(biased, batches).value != pytest.approx(
        function_space_values(biased, batches, depth=3).mean().item(), rel=1e-2
    )


def test_layer_rescaling_leaves_it_unchanged_with_biases_too():
    # ⟨w, ∇ℓ⟩ = d/dt ℓ((1+t)w): unchanged by any linear reparametrization that keeps the function.
    batches = mlp_batches()
    model = relu_mlp()
    for alpha in (0.1, 10.0):
        twin = rescaled_twin(model, alpha)
        assert fisher_rao_norm(twin, batches).value == pytest.approx(fisher_rao_norm(model, batches).value, rel=1e-10)


class NoForwardModeReLU(torch.autograd.Function):
    """A ReLU with only a backward rule: functorch's jvp cannot go through it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class CustomReLU(nn.Module):
    def forward(self, x):
        return NoForwardModeReLU.apply(x)


def test_a_layer_without_forward_mode_falls_back_to_double_backward():
    model, batches = relu_mlp(), mlp_batches()
    model[1] = CustomReLU()
    result = fisher_rao_norm(model, batches)
    assert not result.forward_mode
    assert result.value == pytest.approx(loop_values(model, batches).mean().item(), rel=1e-10)


def test_error_matches_the_spread_over_redrawn_subsamples():
    model, (x, y) = tiny_mlp(), pool(1024)
    g = torch.Generator().manual_seed(1)
    subsamples = (torch.randperm(1024, generator=g)[:128] for _ in range(100))
    results = [fisher_rao_norm(model, [(x[i], y[i])]) for i in subsamples]
    spread = torch.tensor([r.value for r in results]).std().item()
    assert torch.tensor([r.se for r in results]).mean().item() == pytest.approx(spread, rel=0.25)


def test_bad_input():
    with pytest.raises(ValueError, match="batches is empty"):
        fisher_rao_norm(tiny_mlp(), [])
    x, y = mlp_batches()[0]
    with pytest.raises(ValueError, match="non-finite"):
        fisher_rao_norm(tiny_mlp(), [(torch.full_like(x, float("nan")), y)])
    with pytest.raises(ValueError, match="loss_fn='hinge'"):
        fisher_rao_norm(tiny_mlp(), mlp_batches(), "hinge")
