"""Bad input fails loudly, naming the argument."""

import pytest
import torch

from lightning_flatness.functional import (
    fisher_trace,
    hessian_eigenvalues,
    hessian_trace,
    pacgen,
)
from tests.helpers.estimators import FUNCTIONS as ALL
from tests.helpers.models import mlp_batches, tiny_mlp


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_empty_batches(fn):
    with pytest.raises(ValueError, match="batches is empty"):
        fn(tiny_mlp(), [])


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_unknown_loss_name(fn):
    with pytest.raises(ValueError, match="loss_fn='hinge'.*cross_entropy"):
        fn(tiny_mlp(), mlp_batches(), "hinge")


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_non_finite_loss(fn):
    x, y = mlp_batches()[0]
    bad = [(x, y), (torch.full_like(x, float("nan")), y)]
    with pytest.raises(ValueError, match="non-finite"):
        fn(tiny_mlp(), bad)


def test_finiteness_check_is_exact_when_the_fast_sum_overflows():
    from lightning_flatness.functional.objective import Objective

    objective = Objective(tiny_mlp(), mlp_batches(), dtype=torch.float32)
    huge = torch.full((4,), 3e38)  # finite, but their float32 sum is inf
    assert torch.equal(objective.average(huge.clone(), 2, "gradient"), huge / 2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="non-finite gradient"):
            objective.average(torch.tensor([1.0, bad, -3e38, 3e38]), 1, "gradient")


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_one_shot_iterator_is_rejected(fn):
    with pytest.raises(TypeError, match="re-iterable"):
        fn(tiny_mlp(), iter(mlp_batches()))


def test_reduced_loss_is_rejected():
    def mean_loss(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    with pytest.raises(ValueError, match="per-sample losses"):
        hessian_trace(tiny_mlp(), mlp_batches(), mean_loss)


@pytest.mark.parametrize("k", [0, -1, 52, 1.5])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k"):
        hessian_eigenvalues(tiny_mlp(), mlp_batches(), k=k)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"dtype": torch.int64}, "dtype"),
        ({"generator": "seed"}, "generator"),
        ({"params": []}, "params"),
        ({"params": [torch.nn.Parameter(torch.zeros(2))]}, "params"),
    ],
)
def test_bad_eigen_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hessian_eigenvalues(tiny_mlp(), mlp_batches(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"gamma": -0.1}, "gamma"), ({"eps": 0.0}, "eps"), ({"rho": -1.0}, "rho"), ({"num_probes": 0}, "num_probes"),
     ({"hessian_diag": torch.ones(3)}, "hessian_diag")],
)
def test_bad_pacgen_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pacgen(tiny_mlp(), mlp_batches(), **kwargs)


def test_wrong_batch_type_for_builtin_loss():
    with pytest.raises(TypeError, match="pair"):
        fisher_trace(tiny_mlp(), [torch.randn(4, 4, dtype=torch.float64)])


def test_model_without_trainable_parameters():
    model = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_trace(model, mlp_batches())
