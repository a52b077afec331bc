r"""Accuracy and loss under adversarial input perturbations: FGSM and PGD (Goodfellow et al. 2015; Madry et al.
2018), in the :math:`L_\infty` or :math:`L_2` ball of radius :math:`\epsilon` around each input.

The inputs are perturbed, never the model: every pass runs inside
:func:`~lightning_flatness.functional.measurement_mode` (eval mode, parameters, buffers, ``.grad``
and every RNG state as before), and the random start draws from its own generator.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..validation import check_bool, check_choice, check_float, check_generator, check_int
from ._losses import LossArg, losses_and_correct, resolve_loss_fn
from ._restore import measurement_mode
from ._stats import MeanAccumulator, Reduce

ATTACKS = ("fgsm", "pgd")
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AdversarialResult:
    """Accuracy and mean loss on the perturbed inputs, the clean accuracy, and the drop between them.

    Each ``*_se`` is the standard error over the samples (the drop's is paired: per-sample
    differences). ``n_grad``: input-gradient passes over ``batches`` (FGSM 1, PGD ``1 + steps``).
    """

    accuracy: float
    accuracy_se: float
    loss: float
    loss_se: float
    clean_accuracy: float
    clean_accuracy_se: float
    drop: float
    drop_se: float
    n_grad: int


def _losses_and_correct(loss_fn: Any, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    losses, correct = losses_and_correct(loss_fn, model, batch)
    if correct is None:
        raise ValueError(
            "adversarial_accuracy needs each sample's correctness: use a built-in classification loss "
            '("cross_entropy", "bce_with_logits") or a loss_fn returning (losses, correct).'
        )
    return losses, correct


def perturbable_inputs(batch: Any) -> Tensor:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[0], Tensor):
        raise TypeError("adversarial_accuracy perturbs the inputs of batches that are pairs (inputs, targets) with a "
                        f"tensor of inputs; got {type(batch).__name__}.")  # fmt: skip
    if not batch[0].is_floating_point():
        raise TypeError(
            f"adversarial_accuracy perturbs the inputs, which must be floating point; these are {batch[0].dtype} "
            "(token ids?). Perturbing embeddings instead is not supported: measure a model that takes float inputs."
        )
    return batch[0]


def _step(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent direction of unit size in ``norm``: the sign (L∞) or the normalized gradient (L2)."""
    if norm == "linf":
        return grad.sign()
    flat = grad.reshape(grad.shape[0], -1)
    return (flat / _row_norms(flat)).to(grad.dtype).reshape(grad.shape)


def _project(delta: Tensor, norm: str, epsilon: float) -> Tensor:
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    flat = delta.reshape(delta.shape[0], -1)
    scale = (epsilon / _row_norms(flat)).clamp(max=1.0)
    return (flat * scale).to(delta.dtype).reshape(delta.shape)


def _row_norms(flat: Tensor) -> Tensor:
    """Each row's L2 norm, at least 1e-30, in at least float32: the floor underflows to 0 in float16."""
    wide = torch.promote_types(flat.dtype, torch.float32)
    return torch.linalg.vector_norm(flat, dim=1, keepdim=True, dtype=wide).clamp_min(1e-30)


@dataclass(frozen=True)
class BlockDraws:
    """Random starts that do not depend on how a subsample is batched: the sample at position ``j`` of
    the subsample starts from row ``j % block`` of a draw of ``block`` rows from ``generator(j // block)``.

    ``offset``: the position of the batch's first sample; ``generator(b)``: block ``b``'s generator,
    the same for every batch that holds part of it.
    """

    generator: Callable[[int], torch.Generator]
    offset: int
    block: int = 64


def _random_start(x: Tensor, norm: str, epsilon: float, gen: torch.Generator | BlockDraws) -> Tensor:
    """A uniform point of the L∞ box, or of the L2 ball (direction uniform, radius ε·U^(1/d)), per sample."""
    if isinstance(gen, BlockDraws):
        first, last = gen.offset // gen.block, (gen.offset + x.shape[0] - 1) // gen.block
        like = x.new_empty((gen.block, *x.shape[1:]))
        rows = torch.cat([_random_start(like, norm, epsilon, gen.generator(b)) for b in range(first, last + 1)])
        start = gen.offset - first * gen.block
        return rows[start : start + x.shape[0]]
    shape = x.shape
    if norm == "linf":
        u = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        return (epsilon * u).to(x)
    d = math.prod(shape[1:])
    z = torch.randn(shape[0], d, generator=gen, dtype=torch.float64)
    radius = epsilon * torch.rand(shape[0], 1, generator=gen, dtype=torch.float64) ** (1 / d)
    return (z / z.norm(dim=1, keepdim=True) * radius).reshape(shape).to(x)


def _evaluate(loss_fn: Any, model: nn.Module, batch: Any, x: Tensor, grad: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-sample ``(losses, correct, ∇_x Σ losses)`` at inputs ``x`` (the gradient only with ``grad``)."""
    if not grad:
        with torch.no_grad():
            losses, correct = _losses_and_correct(loss_fn, model, (x, *batch[1:]))
        return losses, correct, None
    losses, correct, g = _input_gradient(_losses_and_correct, loss_fn, model, batch, x)
    return losses, correct, g


def _input_gradient(
    evaluate: Callable, loss_fn: Any, model: nn.Module, batch: Any, x: Tensor
) -> tuple[Tensor, Tensor | None, Tensor]:  # fmt: skip
    """``evaluate(loss_fn, model, batch at x)``'s detached ``(losses, correct)`` and ``∇_x Σ losses``; only the
    inputs are differentiated, so the parameters' ``.grad`` is left as it was."""
    x = x.detach().requires_grad_(True)
    losses, correct = evaluate(loss_fn, model, (x, *batch[1:]))
    (g,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), None if correct is None else correct.detach(), g


def _fgsm_point(x0: Tensor, grad: Tensor, opts: dict[str, Any]) -> Tensor:
    """FGSM's input: one step of ``epsilon`` along the steepest-ascent direction of ``norm``."""
    eps, norm = opts["epsilon"], opts["norm"]
    return x0 + _project(eps * _step(grad, norm), norm, eps)


def _pgd_start(x0: Tensor, opts: dict[str, Any], gen: torch.Generator | BlockDraws) -> Tensor:
    """PGD's first perturbation: a uniform point of the ball with ``random_start``, else none."""
    return _random_start(x0, opts["norm"], opts["epsilon"], gen) if opts["random_start"] else torch.zeros_like(x0)


def _pgd_step(delta: Tensor, grad: Tensor, opts: dict[str, Any]) -> Tensor:
    """One PGD step of ``step_size`` from ``delta``, projected back onto the ball."""
    return _project(delta + opts["step_size"] * _step(grad, opts["norm"]), opts["norm"], opts["epsilon"])


def _attack_batch(
    loss_fn: Any, model: nn.Module, batch: Any, opts: dict[str, Any], gen: torch.Generator | BlockDraws
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:  # fmt: skip
    """Per-sample clean correctness, and ``{attack: (attacked correct, attacked loss)}`` for one batch.

    One pass serves both attacks: PGD starts where FGSM ends. PGD counts a sample as robust only if
    the FGSM point and every iterate classify it correctly, and reports the largest loss among them:
    never weaker than FGSM on the same inputs.
    """
    x0 = perturbable_inputs(batch)
    _, clean, grad = _evaluate(loss_fn, model, batch, x0)
    losses, correct, _ = _evaluate(loss_fn, model, batch, _fgsm_point(x0, grad, opts), grad=False)
    out = {"fgsm": (correct, losses)}
    if "pgd" in opts["attacks"]:
        delta = _pgd_start(x0, opts, gen)
        for _ in range(opts["steps"]):
            step_losses, step_correct, g = _evaluate(loss_fn, model, batch, x0 + delta)
            losses, correct = torch.maximum(losses, step_losses), correct & step_correct
            delta = _pgd_step(delta, g, opts)
        final_losses, final_correct, _ = _evaluate(loss_fn, model, batch, x0 + delta, grad=False)
        out["pgd"] = (correct & final_correct, torch.maximum(losses, final_losses))
    return clean, out


def attack_options(
    attacks: Sequence[str], norm: str, epsilon: float, steps: int, step_size: float | None, random_start: bool
) -> dict[str, Any]:  # fmt: skip
    """The attacks' options, validated (each error names the argument and what it accepts)."""
    chosen = tuple(check_choice("attack", a, ATTACKS) for a in attacks)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"attacks must name each of {ATTACKS} at most once, and at least one; got {tuple(attacks)!r}.")
    opts = {
        "attacks": chosen, "norm": check_choice("norm", norm, NORMS), "epsilon": check_float("epsilon", epsilon),
        "steps": check_int("steps", steps), "random_start": check_bool("random_start", random_start),
    }  # fmt: skip
    opts["step_size"] = 2.5 * opts["epsilon"] / opts["steps"] if step_size is None else check_float("step_size", step_size, inclusive=False)
    return opts


def attack_statistics(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossArg, opts: dict[str, Any],
    generators: Iterable[torch.Generator | BlockDraws], reduce: Reduce | None = None,
) -> dict[str, AdversarialResult]:  # fmt: skip
    """``{attack: AdversarialResult}`` over ``batches`` (the model measured in place, inside
    :func:`measurement_mode`); ``generators``: for PGD's random start, one per batch, or
    :class:`BlockDraws` (draws that do not depend on how the samples are batched); ``reduce`` sums
    the per-sample statistics over processes (each holding a shard of the batches)."""
    fn, _ = resolve_loss_fn(loss_fn)
    attacks = opts["attacks"]
    acc = MeanAccumulator(1 + 3 * len(attacks))  # per sample: clean correct; per attack: correct, loss, drop
    with measurement_mode(model):
        for batch, gen in zip(batches, generators):
            clean, attacked = _attack_batch(fn, model, batch, opts, gen)
            c = clean.double()
            columns = [c] + [t for a in attacks for t in _columns(c, *attacked[a])]
            acc.add(torch.stack(columns, dim=1))
    mean, se = (t.tolist() for t in acc.result(reduce))
    n_grad = {"fgsm": 1, "pgd": 1 + opts["steps"]}
    return {a: _result(mean, se, 1 + 3 * i, n_grad[a]) for i, a in enumerate(attacks)}


def _result(mean: list[float], se: list[float], j: int, n_grad: int) -> AdversarialResult:
    """One attack's result from the accumulated columns: clean at 0; correct, loss, drop from ``j``."""
    return AdversarialResult(
        accuracy=mean[j], accuracy_se=se[j], loss=mean[j + 1], loss_se=se[j + 1],
        clean_accuracy=mean[0], clean_accuracy_se=se[0], drop=mean[j + 2], drop_se=se[j + 2], n_grad=n_grad,
    )  # fmt: skip


def _columns(clean: Tensor, correct: Tensor, losses: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    attacked = correct.double()
    return attacked, losses.double(), clean - attacked


def adversarial_accuracy(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    attack: str = "pgd",
    norm: str = "linf",
    epsilon: float = 0.1,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | int | None = None,
) -> AdversarialResult:
    r"""Accuracy and loss of ``model`` on inputs perturbed by FGSM or PGD within ``epsilon`` in ``norm``.

    FGSM: :math:`x' = x + \epsilon\,\operatorname{sign}\nabla_x\ell` (L∞) or
    :math:`x + \epsilon\,\nabla_x\ell/\|\nabla_x\ell\|_2` (L2), per sample. PGD: from a uniform point
    of the ball (``random_start``) or from ``x``, ``steps`` steps of size ``step_size`` (default
    :math:`2.5\epsilon/\text{steps}`, Madry et al.) along the same directions, each projected back
    onto the ball; a sample counts as robust only if the FGSM point and every iterate classify it
    correctly, and its loss is the largest among them, so PGD is never weaker than FGSM on the same
    inputs. The inputs are not clamped to a data range. ``epsilon=0`` gives the clean accuracy.

    On a linear classifier with two classes both attacks are exact: the worst perturbation lowers
    the margin :math:`(w_y - w_j)^\top x + b_y - b_j` by :math:`\epsilon\|w_y - w_j\|_1` (L∞) or
    :math:`\epsilon\|w_y - w_j\|_2` (L2), the dual norm, and the loss's gradient points there.

    Batches are pairs ``(inputs, targets, ...)`` with floating-point inputs; ``loss_fn`` must give
    each sample's correctness (a built-in classification loss, or ``(losses, correct)``). Cost:
    ``n_grad`` input-gradient passes (FGSM 1, PGD ``1 + steps``) and as many loss evaluations, per
    batch. Standard errors are over the samples.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import adversarial_accuracy
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(2, 2)
        >>> batches = [(torch.randn(16, 2), torch.randint(0, 2, (16,)))]
        >>> r = adversarial_accuracy(model, batches, attack="fgsm", epsilon=0.0)
        >>> r.accuracy == r.clean_accuracy, r.n_grad
        (True, 1)
    """
    opts = attack_options((attack,), norm, epsilon, steps, step_size, random_start)
    gen = check_generator(generator)
    return attack_statistics(model, batches, loss_fn, opts, itertools.repeat(gen))[opts["attacks"][0]]


def adversarial_examples(
    model: nn.Module,
    batch: Any,
    loss_fn: LossArg = "cross_entropy",
    *,
    attack: str = "pgd",
    norm: str = "linf",
    epsilon: float = 0.1,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | int | None = None,
) -> Tensor:
    r"""The inputs of ``batch`` moved by FGSM or PGD within ``epsilon``: the examples adversarial training
    (Madry et al. 2018) takes its steps on, :math:`\min_w \mathbb{E}\max_{\|\delta\|\le\epsilon}\ell(x + \delta)`.

    FGSM: the point :func:`adversarial_accuracy` attacks with; PGD: its last iterate (not the worst
    point seen, as the measurement takes: training follows Madry et al.). The model runs in its
    current mode, and only the inputs get gradients: the parameters' ``.grad`` is left as it was.
    Returns detached inputs of the same shape and dtype. Cost: 1 (FGSM) or ``steps`` (PGD)
    input-gradient passes on the batch.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import adversarial_examples
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
        >>> moved = adversarial_examples(model, (x, y), attack="fgsm", epsilon=0.1)
        >>> bool((moved - x).abs().max() <= 0.1 + 1e-7)
        True
    """
    opts = attack_options((attack,), norm, epsilon, steps, step_size, random_start)
    fn, _ = resolve_loss_fn(loss_fn)
    x0 = perturbable_inputs(batch)

    def gradient(x: Tensor) -> Tensor:  # training needs no correctness: any per-sample loss will do
        return _input_gradient(losses_and_correct, fn, model, batch, x)[2]

    if opts["attacks"][0] == "fgsm":
        return _fgsm_point(x0, gradient(x0), opts).detach()
    delta = _pgd_start(x0, opts, check_generator(generator))
    for _ in range(opts["steps"]):
        delta = _pgd_step(delta, gradient(x0 + delta), opts)
    return (x0 + delta).detach()
