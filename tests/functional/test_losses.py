"""The built-in losses: exact per-sample values, the outputs each one accepts, and what each says it measures.

``"bce_with_logits"`` (one logit per sample) is checked against PyTorch's own function and, through
the estimators, against the dense Hessian and per-sample loops of a tiny model; a model with one
output unit is refused by ``"cross_entropy"``, whose value there is 0 for every sample.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_flatness.functional import (
    BUILTIN_LOSSES,
    Objective,
    bce_with_logits_loss,
    fisher_trace,
    hessian_eigenvalues,
    measurement_mode,
)
from lightning_flatness.functional._losses import BuiltinLossError
from tests.helpers.oracles import dense_hessian, per_sample_grads_loop, trainable


def binary_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def binary_batches(shape=(-1, 1), dtype=torch.float64, sizes=(5, 7)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    out = []
    for n in sizes:
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 2, (n,), generator=g)
        out.append((x, y.reshape(shape).to(dtype)))
    return out


def bce_sum(outputs, targets, reduction="sum"):
    """The oracles' loss signature: ``loss(model(x), y, reduction=...)``."""
    return F.binary_cross_entropy_with_logits(outputs.reshape(-1), targets.reshape(-1).to(outputs.dtype), reduction=reduction)


@pytest.mark.parametrize(
    "out_shape, y_shape, y_dtype",
    [((-1, 1), (-1, 1), torch.float64), ((-1,), (-1,), torch.float64), ((-1, 1), (-1,), torch.int64),
     ((-1,), (-1, 1), torch.bool)],
    ids=["column-float", "flat-float", "column-logit-int-labels", "flat-logit-bool-labels"],
)  # fmt: skip
def test_bce_with_logits_is_pytorchs_per_sample_loss(out_shape, y_shape, y_dtype):
    model = binary_model()
    head = nn.Sequential(model, nn.Flatten(0)) if out_shape == (-1,) else model
    x, y = binary_batches(y_shape, y_dtype)[1]
    expected = F.binary_cross_entropy_with_logits(model(x).reshape(-1), y.reshape(-1).double(), reduction="none")
    losses = bce_with_logits_loss(head, (x, y))
    assert losses.shape == (7,)
    assert torch.equal(losses, expected)
    assert BUILTIN_LOSSES["bce_with_logits"] is bce_with_logits_loss
    with measurement_mode(head):
        losses, correct = Objective(head, [(x, y)], "bce_with_logits").losses_and_correct((x, y))
    assert torch.equal(losses, expected)
    assert torch.equal(correct, (model(x).reshape(-1) > 0) == (y.reshape(-1) > 0.5))  # the logit's sign


@pytest.mark.parametrize("y", [torch.zeros(7, 1), torch.zeros(7, 1, dtype=torch.long), torch.zeros(7)],
                         ids=["float-column", "int-column", "int-flat"])  # fmt: skip
def test_cross_entropy_refuses_one_output_unit_and_names_the_losses_that_fit(y):
    model = binary_model().float()
    x = torch.randn(7, 4)
    with pytest.raises(BuiltinLossError) as info:
        BUILTIN_LOSSES["cross_entropy"](model, (x, y))
    message = str(info.value)
    assert "shape (7, 1)" in message and '"bce_with_logits"' in message and '"mse"' in message
    assert isinstance(info.value, ValueError)


def test_bce_with_logits_refuses_several_outputs_and_mismatched_targets():
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(BuiltinLossError, match=r'one logit per sample.*shape \(6, 3\).*"cross_entropy"'):
        bce_with_logits_loss(nn.Linear(4, 3).double(), (x, torch.zeros(6, dtype=torch.float64)))
    with pytest.raises(BuiltinLossError, match=r"one target per sample.*targets of shape \(6, 2\)"):
        bce_with_logits_loss(nn.Linear(4, 1).double(), (x, torch.zeros(6, 2, dtype=torch.float64)))


def test_bce_top_eigenvalue_equals_the_dense_hessian():
    model, batches = binary_model(), binary_batches()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches, reduction_loss=bce_sum))[-1]
    result = hessian_eigenvalues(model, batches, "bce_with_logits", tol=1e-8)
    assert exact > 1e-3  # a real curvature, not the 0 of cross-entropy over one logit
    assert result.values[0].item() == pytest.approx(exact.item(), rel=1e-6)


def test_bce_empirical_fisher_equals_the_per_sample_loop():
    model, batches = binary_model(), binary_batches()
    sq = torch.cat([per_sample_grads_loop(model, x, y, loss=bce_sum).pow(2).sum(1) for x, y in batches])
    assert fisher_trace(model, batches, "bce_with_logits").value == pytest.approx(sq.mean().item(), rel=1e-10)


def test_bce_monte_carlo_fisher_draws_bernoulli_labels():
    """ℓ = softplus(z) − ỹz, so ∇ℓ = (σ(z) − ỹ)∇z; with ỹ ~ Bernoulli(σ(z)): E‖∇ℓ‖² = σ(1−σ)‖∇z‖² exactly."""
    model, batches = binary_model(), binary_batches()
    params = [p for _, p in trainable(model)]
    means, variances = [], []
    for x, _ in batches:
        for i in range(len(x)):
            z = model(x[i : i + 1]).reshape(())
            grad_sq = sum(g.pow(2).sum() for g in torch.autograd.grad(z, params)).item()
            p = torch.sigmoid(z).item()
            means.append(p * (1 - p) * grad_sq)
            fourth = p * (1 - p) ** 4 + (1 - p) * p**4
            variances.append((fourth - (p * (1 - p)) ** 2) * grad_sq**2)
    exact = sum(means) / len(means)
    samples = 400
    stderr = math.sqrt(sum(variances) / (len(means) ** 2 * samples))
    result = fisher_trace(model, batches, "bce_with_logits", kind="mc", num_samples=samples, generator=0)
    assert abs(result.value - exact) <= 3 * stderr, (result.value, exact, stderr)
    # the data's labels give another value (the empirical Fisher): the test tells them apart
    assert abs(fisher_trace(model, batches, "bce_with_logits").value - exact) > 3 * stderr


def test_mse_pairs_each_output_with_its_own_target():
    """Found by review: outputs ``(B, 1)`` against targets ``(B,)`` broadcast to ``(B, B)`` and every sample's loss
    averaged over all targets, silently; now the targets are read per sample, and shapes that do not match are
    refused."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    want = (model(x).squeeze(1) - y) ** 2
    assert torch.allclose(BUILTIN_LOSSES["mse"](model, (x, y)), want)
    with pytest.raises(BuiltinLossError, match="shape"):
        BUILTIN_LOSSES["mse"](nn.Linear(3, 2).double(), (x, y))
