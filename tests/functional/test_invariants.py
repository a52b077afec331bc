"""Properties every estimator must have: split invariance, no side effects, dtype handling."""

import pytest
import torch
from torch import nn

from lightning_flatness.functional import fisher_trace, hessian_eigenvalues
from tests.helpers.estimators import ALL_ESTIMATORS, ESTIMATORS
from tests.helpers.models import cnn_batches, mlp_batches, rebatch, tiny_cnn, tiny_mlp


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_results_do_not_depend_on_batch_split(name, model_and_batches):
    model, batches = model_and_batches
    n = sum(len(b[1]) for b in batches)
    other = rebatch(batches, [n - 3, 3])
    assert torch.allclose(ESTIMATORS[name](model, batches), ESTIMATORS[name](model, other), rtol=1e-9, atol=1e-12)


def _snapshot(model):
    return {
        "modes": [m.training for m in model.modules()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }



@pytest.mark.parametrize("name", sorted(ALL_ESTIMATORS))
def test_model_and_rng_are_left_untouched(name):
    model, batches = tiny_cnn(), cnn_batches()
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    before = _snapshot(model)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    ALL_ESTIMATORS[name](model, batches)
    assert torch.equal(torch.get_rng_state(), rng)
    after = _snapshot(model)
    assert after["modes"] == before["modes"] and all(after["modes"])
    assert model[1].num_batches_tracked.item() == before["state"]["1.num_batches_tracked"].item()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert torch.equal(after["grads"][0], before["grads"][0])
    assert all(g is None for g in after["grads"][1:])


def test_restores_even_when_loss_fn_mutates_the_model():
    model = tiny_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def vandal(m, batch):
        with torch.no_grad():
            m[0].weight.add_(1.0)
        return nn.functional.cross_entropy(m(batch[0]), batch[1], reduction="none")

    fisher_trace(model, mlp_batches(), vandal)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)


def test_only_trainable_parameters_are_measured():
    model, batches = tiny_mlp(), mlp_batches()
    model[0].requires_grad_(False)
    result = hessian_eigenvalues(model, batches, k=2)
    assert result.vectors.shape == (2, 21)
    explicit = hessian_eigenvalues(model, batches, k=2, params=list(model[2].parameters()))
    assert torch.allclose(result.values, explicit.values)


def test_half_precision_model_is_measured_in_float32():
    model32 = tiny_mlp().float()
    batches32 = [(x.float(), y) for x, y in mlp_batches()]
    reference = hessian_eigenvalues(model32, batches32, tol=1e-6)
    model16 = tiny_mlp().bfloat16()
    with torch.no_grad():  # same (bf16-rounded) weights in both
        for p32, p16 in zip(model32.parameters(), model16.parameters()):
            p32.copy_(p16.float())
    reference = hessian_eigenvalues(model32, batches32, tol=1e-6)
    result = hessian_eigenvalues(model16, batches32, tol=1e-6)
    assert result.values.dtype == torch.float32 and result.vectors.dtype == torch.float32
    assert result.values[0].item() == pytest.approx(reference.values[0].item(), rel=1e-4)
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_dtype_float64_on_float32_model():
    model64, model32 = tiny_mlp(), tiny_mlp().float()
    batches32 = [(x.float(), y) for x, y in mlp_batches()]
    batches64 = [(x.double(), y) for x, y in batches32]
    with torch.no_grad():
        for p32, p64 in zip(model32.parameters(), model64.parameters()):
            p64.copy_(p32.double())
    exact = hessian_eigenvalues(model64, batches64, tol=1e-10).values[0].item()
    upcast = hessian_eigenvalues(model32, batches32, tol=1e-10, dtype=torch.float64)
    assert upcast.values.dtype == torch.float64
    assert upcast.values[0].item() == pytest.approx(exact, rel=1e-12)
    assert next(model32.parameters()).dtype == torch.float32


def test_autocast_is_disabled_during_measurement():
    model32 = tiny_mlp().float()
    batches32 = [(x.float(), y) for x, y in mlp_batches()]
    plain = fisher_trace(model32, batches32).value
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fisher_trace(model32, batches32).value
    assert under_autocast == plain
