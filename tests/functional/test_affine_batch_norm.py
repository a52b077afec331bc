import pytest
import torch
from torch import nn

from lightning_flatness.functional._affine_batch_norm import (
    AffineBatchNorm,
    affine_batch_norm,
)


@pytest.mark.parametrize("layer, shape", [(nn.BatchNorm1d(5), (7, 5)), (nn.BatchNorm1d(5), (7, 5, 3)), (nn.BatchNorm2d(5), (4, 5, 3, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_batch_norm_as_affine_map_has_the_same_value_and_derivatives(layer, shape, affine):
    torch.manual_seed(0)
    bn = type(layer)(5, affine=affine).double()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    if affine:
        with torch.no_grad():
            bn.weight.normal_(), bn.bias.normal_()
    bn.eval()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(shape, dtype=torch.float64)

    def derivatives():
        out = bn(x)
        loss = (out.tanh() ** 2).sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (hv,) = torch.autograd.grad(g, x, grad_outputs=v)
        return out.detach(), g.detach(), hv

    expected = derivatives()
    with AffineBatchNorm():
        got = derivatives()
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_training_mode_and_models_without_batch_norm_are_left_alone():
    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(6, 3)
    with AffineBatchNorm():
        out = bn(x)
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-6)  # batch statistics, not running ones
    assert isinstance(affine_batch_norm(nn.Linear(2, 2)), type(affine_batch_norm(nn.Identity())))
    assert isinstance(affine_batch_norm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))), AffineBatchNorm)
