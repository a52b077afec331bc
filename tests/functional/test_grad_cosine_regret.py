import itertools

import pytest
import torch
import torch.nn.functional as F

from lightning_flatness.functional import grad_cosine_regret
from tests.helpers.models import mlp_batches, tiny_mlp
from tests.helpers.oracles import trainable


def batch_gradients_loop(model, batches):
    params = [p for _, p in trainable(model)]
    model.eval()
    grads = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)  # mean over the mini-batch
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return grads


def test_matches_direct_loop_over_pairs(model_and_batches):
    model, batches = model_and_batches
    result = grad_cosine_regret(model, batches)
    grads = batch_gradients_loop(model, batches)
    cos, regret, regret_sgd = [], [], []
    for i, j in itertools.permutations(range(len(grads)), 2):
        gi, gj = grads[i], grads[j]
        c = (gi @ gj / (gi.norm() * gj.norm())).item()
        cos.append(c)
        regret.append(gj.norm().item() * (1 - c))
        regret_sgd.append((gj @ gj - gi @ gj).item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert result.cosine == pytest.approx(mean(cos), abs=1e-10)
    assert result.regret == pytest.approx(mean(regret), abs=1e-10)
    assert result.regret_sgd == pytest.approx(mean(regret_sgd), abs=1e-10)
    assert result.n_grad == 2  # the second pass: the standard errors
    assert grad_cosine_regret(model, batches, stderr=False).n_grad == 1


def test_identical_minibatches_have_zero_regret():
    model = tiny_mlp()
    batch = mlp_batches((6,))[0]
    result = grad_cosine_regret(model, [batch, batch, batch])
    assert result.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.regret == pytest.approx(0.0, abs=1e-12)
    assert result.regret_sgd == pytest.approx(0.0, abs=1e-12)


def test_regret_needs_two_minibatches():
    with pytest.raises(ValueError, match="at least 2 mini-batches"):
        grad_cosine_regret(tiny_mlp(), mlp_batches((8,)))
