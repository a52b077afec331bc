"""Accuracy under FGSM and PGD (issue 26, item 1, the functional estimator) against closed forms on linear
classifiers, with the model left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_flatness.functional import adversarial_accuracy

DUAL = {"linf": 1, "l2": 2}  # the margin falls by ε‖w_y − w_j‖ in the dual norm: L1 for L∞, L2 for L2


def linear(classes: int, dim: int = 5, seed: int = 0) -> tuple[nn.Linear, list]:
    torch.manual_seed(seed)
    model = nn.Linear(dim, classes).double()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(40, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (40,), generator=g))
               for _ in range(3)]  # fmt: skip
    return model, batches


def robust_accuracy(model: nn.Linear, batches: list, norm: str, epsilon: float) -> float:
    """The exact fraction of samples no perturbation within ε can misclassify."""
    w, b = model.weight.detach(), model.bias.detach()
    robust = []
    for x, y in batches:
        margins = (x @ w.T + b).gather(1, y[:, None]) - (x @ w.T + b)  # (B, C): class y against each j
        gaps = (w[y][:, None, :] - w[None, :, :]).norm(p=DUAL[norm], dim=2)  # ‖w_y − w_j‖
        worst = (margins - epsilon * gaps).masked_fill(torch.nn.functional.one_hot(y, w.shape[0]).bool(), math.inf)
        robust.append(worst.min(1).values > 0)
    return torch.cat(robust).double().mean().item()


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_on_a_two_class_linear_model_both_attacks_are_exact(attack, norm):
    model, batches = linear(2)
    for epsilon in (0.05, 0.2, 0.5):
        got = adversarial_accuracy(model, batches, attack=attack, norm=norm, epsilon=epsilon, generator=0)
        want = robust_accuracy(model, batches, norm, epsilon)
        assert got.accuracy == pytest.approx(want, abs=1e-12), (epsilon, got.accuracy, want)
        assert 0 < want < got.clean_accuracy  # the test can fail: some samples are flipped, not all


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_on_several_classes_pgd_is_never_weaker_than_fgsm_and_never_beyond_the_exact_worst_case(norm):
    model, batches = linear(4)
    for epsilon in (0.1, 0.3):
        fgsm = adversarial_accuracy(model, batches, attack="fgsm", norm=norm, epsilon=epsilon)
        pgd = adversarial_accuracy(model, batches, attack="pgd", norm=norm, epsilon=epsilon, steps=20, generator=1)
        exact = robust_accuracy(model, batches, norm, epsilon)
        assert exact <= pgd.accuracy <= fgsm.accuracy <= fgsm.clean_accuracy
        assert pgd.loss >= fgsm.loss
        assert pgd.accuracy == pytest.approx(exact, abs=0.02)  # 20 steps reach the worst case here (measured: equal)


def test_epsilon_zero_is_the_clean_accuracy_and_the_model_is_untouched():
    model, batches = linear(3)
    model.weight.grad = torch.ones_like(model.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    r = adversarial_accuracy(model, batches, attack="pgd", epsilon=0.0, generator=0)
    assert r.accuracy == r.clean_accuracy and r.drop == 0.0 and r.n_grad == 11
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.weight.grad, torch.ones_like(model.weight)) and torch.equal(torch.get_rng_state(), rng)


def test_the_standard_errors_are_over_the_samples():
    model, batches = linear(2)
    r = adversarial_accuracy(model, batches, attack="fgsm", epsilon=0.2)
    n = sum(len(y) for _, y in batches)
    assert r.accuracy_se == pytest.approx(math.sqrt(r.accuracy * (1 - r.accuracy) / (n - 1)), rel=1e-9)


def test_token_ids_and_bad_options_are_refused_naming_them():
    model = nn.Embedding(10, 2)
    with pytest.raises(TypeError, match="floating point.*embeddings"):
        adversarial_accuracy(model, [(torch.randint(0, 10, (4,)), torch.randint(0, 2, (4,)))])
    lin, batches = linear(2)
    for kwargs, match in (({"attack": "cw"}, "attack"), ({"norm": "l1"}, "norm"), ({"epsilon": -1.0}, "epsilon"),
                          ({"steps": 0}, "steps")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            adversarial_accuracy(lin, batches, **kwargs)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_training_examples_are_the_attacks_points_inside_the_ball_and_leave_grad_alone(norm):
    """``adversarial_examples``: FGSM's is the point ``adversarial_accuracy`` attacks with (the same accuracy,
    exactly); PGD's last iterate stays in the ball and, on two classes, reaches the closed form's worst case."""
    from lightning_flatness.functional import adversarial_examples

    model, batches = linear(2)
    model.weight.grad = torch.full_like(model.weight, 7.0)
    eps = 0.2
    moved = {a: [adversarial_examples(model, b, attack=a, norm=norm, epsilon=eps, steps=20, generator=3) for b in batches]
             for a in ("fgsm", "pgd")}  # fmt: skip
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 7.0)) and model.bias.grad is None
    with torch.no_grad():
        accuracy = {a: torch.cat([(model(x).argmax(1) == b[1]) for x, b in zip(xs, batches)]).double().mean().item()
                    for a, xs in moved.items()}  # fmt: skip
    want = robust_accuracy(model, batches, norm, eps)
    assert accuracy["fgsm"] == adversarial_accuracy(model, batches, attack="fgsm", norm=norm, epsilon=eps).accuracy
    assert accuracy["fgsm"] == pytest.approx(want, abs=1e-12)
    assert accuracy["pgd"] == pytest.approx(want, abs=1e-12)
    for xs in moved.values():
        for x, (x0, _) in zip(xs, batches):
            size = (x - x0).abs().amax(1) if norm == "linf" else (x - x0).norm(dim=1)
            assert size.max() <= eps * (1 + 1e-12) and not x.requires_grad


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_block_draws_do_not_depend_on_the_batching(norm):
    """The random starts of BlockDraws are a function of each sample's place in the subsample: one batch of 10
    or batches of 3, 5 and 2 (crossing the blocks of 4) start every sample from the same point."""
    from lightning_flatness.functional.adversarial import BlockDraws, _random_start

    x = torch.zeros(10, 2, 3)
    block = lambda b: torch.Generator().manual_seed(100 + b)  # noqa: E731
    whole = _random_start(x, norm, 0.5, BlockDraws(block, 0, block=4))
    parts = [_random_start(x[s:e], norm, 0.5, BlockDraws(block, s, block=4)) for s, e in ((0, 3), (3, 8), (8, 10))]
    assert torch.equal(torch.cat(parts), whole)
    assert len({tuple(row.flatten().tolist()) for row in whole}) == 10  # ten different starts
    bound = whole.abs().amax(dim=(1, 2)) if norm == "linf" else whole.flatten(1).norm(dim=1)
    assert bool((bound <= 0.5 + 1e-6).all())


def test_a_float16_model_with_a_zero_input_gradient_stays_finite_under_l2():
    """The L2 step divides by the gradient's norm, floored at 1e-30, which is 0 in float16: 0/0 was NaN."""
    model = nn.Linear(4, 2).half()
    with torch.no_grad():
        model.weight.zero_()  # the loss does not depend on the inputs: a zero input gradient
    batches = [(torch.randn(8, 4).half(), torch.randint(0, 2, (8,)))]
    r = adversarial_accuracy(model, batches, attack="pgd", norm="l2", epsilon=0.5, steps=3, generator=0)
    assert math.isfinite(r.loss) and r.accuracy == r.clean_accuracy
