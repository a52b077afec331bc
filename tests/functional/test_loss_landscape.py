import pytest
import torch
from torch import nn

from lightning_flatness.functional import (
    eigenvector_slice,
    loss_landscape,
    normalize_direction,
)
from tests.helpers.models import (
    Quadratic,
    mlp_batches,
    model_output_loss,
    quadratic_batches,
    random_symmetric,
    relu_mlp,
    rescaled_twin,
    tiny_cnn,
    tiny_mlp,
)
from tests.helpers.oracles import dense_hessian


def test_1d_slice_of_a_quadratic_is_the_analytic_parabola():
    a = random_symmetric(6, shift=2.0)
    model = Quadratic(a)
    batches = quadratic_batches(6)
    x = torch.cat(batches)
    d = torch.randn(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = loss_landscape(model, batches, model_output_loss, directions=d, normalization="none", span=2.0, steps=9)
    w = model.w.detach()
    diffs = w - x
    grad = (diffs @ a).mean(0)
    base = 0.5 * torch.einsum("bi,ij,bj->b", diffs, a, diffs).mean()
    t = result.coordinates[0]
    expected = base + t * (grad @ d) + 0.5 * t**2 * (d @ a @ d)
    assert torch.allclose(result.losses, expected, rtol=1e-12, atol=1e-12)
    assert result.accuracy is None and result.n_forward == 9


def test_filter_normalization_gives_each_filter_the_weight_norm():
    model = tiny_cnn()
    shapes = [p.shape for p in model.parameters()]
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    d = normalize_direction(torch.randn_like(weights), weights, shapes, "filter")
    start = 0
    for p in model.parameters():
        chunk = d[start : start + p.numel()].view(p.shape)
        start += p.numel()
        if p.dim() <= 1:
            assert torch.count_nonzero(chunk) == 0  # biases and BatchNorm parameters
        else:
            assert torch.allclose(chunk.reshape(p.shape[0], -1).norm(dim=1), p.detach().reshape(p.shape[0], -1).norm(dim=1))
    layer = normalize_direction(torch.randn_like(weights), weights, shapes, "layer")
    conv = model[0].weight
    assert torch.allclose(layer[: conv.numel()].norm(), conv.detach().norm())
    with pytest.raises(ValueError, match="normalization"):
        normalize_direction(d, weights, shapes, "batch")


def test_relu_rescaling_leaves_filter_normalized_slice_unchanged():
    batches = mlp_batches()
    model = relu_mlp()
    rescaled = rescaled_twin(model, 5.0)
    kwargs = dict(directions=1, seed=3, span=1.0, steps=7)
    same = loss_landscape(model, batches, **kwargs).losses
    assert torch.allclose(loss_landscape(rescaled, batches, **kwargs).losses, same, rtol=1e-10)
    raw = loss_landscape(model, batches, normalization="none", **kwargs).losses
    raw_rescaled = loss_landscape(rescaled, batches, normalization="none", **kwargs).losses
    assert (raw - raw_rescaled).abs().max() > 1e-2


def test_2d_grid_center_is_the_current_loss_and_accuracy():
    model, batches = tiny_mlp(), mlp_batches()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = loss_landscape(model, batches, directions=2, steps=5, seed=1)
    assert result.losses.shape == (5, 5) and result.n_forward == 25 and result.directions.shape == (2, 51)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        out = model.eval()(x)
    model.train()
    assert result.losses[2, 2].item() == pytest.approx(nn.functional.cross_entropy(out, y).item(), rel=1e-12)
    assert result.accuracy[2, 2].item() == pytest.approx((out.argmax(1) == y).double().mean().item(), rel=1e-12)
    assert model.training
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)


def test_eigenvector_slice_curvature_is_the_top_eigenvalue():
    model, batches = tiny_mlp(), mlp_batches()
    top = torch.linalg.eigvalsh(dense_hessian(model, batches))[-1].item()
    h = 1e-3
    result = eigenvector_slice(model, batches, val_batches=mlp_batches(seed=9), span=h, steps=3, tol=1e-10)
    second_difference = (result.train_losses[0] - 2 * result.train_losses[1] + result.train_losses[2]) / h**2
    assert second_difference.item() == pytest.approx(top, rel=1e-4)
    assert result.eigenvalue == pytest.approx(top, rel=1e-8)
    assert result.val_losses.shape == (3,) and result.n_forward == 6
    again = eigenvector_slice(model, batches, vector=result.vector, span=h, steps=3)
    assert again.n_hvp == 0 and torch.allclose(again.train_losses, result.train_losses)


def test_bad_landscape_arguments():
    model, batches = tiny_mlp(), mlp_batches()
    with pytest.raises(ValueError, match="directions"):
        loss_landscape(model, batches, directions=3)
    with pytest.raises(ValueError, match="directions"):
        loss_landscape(model, batches, directions=torch.ones(7))
    with pytest.raises(ValueError, match="steps"):
        loss_landscape(model, batches, steps=0)
    with pytest.raises(ValueError, match="span"):
        loss_landscape(model, batches, span=-1.0)
