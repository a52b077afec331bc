"""Built-in per-sample losses and resolution of the ``loss_fn`` argument.

A loss function has the signature ``loss_fn(model, batch)`` and returns the per-sample losses,
a tensor of shape ``(B,)``, never reduced, so that estimators can weight samples exactly and
take per-sample gradients. It may instead return a pair ``(losses, correct)``, where
``correct`` is a bool tensor of shape ``(B,)`` (whether each sample is classified correctly):
the estimators use the losses only, and the callback's gap logs the mean of ``correct`` as the
accuracy. The built-in losses know their own accuracy (:func:`builtin_losses_and_correct`).

Batches the built-in losses read (:func:`unpack_pair`, :func:`split_hf_batch`):

* ``"cross_entropy"``, ``"bce_with_logits"``, ``"mse"`` call ``model(inputs)``: a pair
  ``(inputs, targets)`` (a tuple or list, further elements ignored), or a dict holding exactly
  one of the key pairs :data:`DICT_KEYS`, or the pair named by ``batch_keys``
  (:class:`BuiltinLoss`), so that dict batches need an option, not a function.
* ``"hf_sequence_classification"``, ``"hf_causal_lm"``, ``"hf_token_classification"`` follow
  Hugging Face ``transformers``: the batch is a dict of the model's keyword inputs with the
  targets under ``"labels"``; they call ``model(**inputs)`` (every key but ``"labels"``, so the
  model computes no loss of its own) and read its ``.logits``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Union[Tensor, tuple[Tensor, Tensor]]]
LossArg = Union[str, LossFn]

# A loss's accepted return values, for error messages.
RETURNS = "per-sample losses, a 1-D tensor of shape (B,), or a pair (losses, correct)"


class BuiltinLossError(TypeError, ValueError):
    """The batch or the model's outputs do not fit a built-in loss (the message says which loss fits).

    Both a ``TypeError`` (a batch that is not a pair) and a ``ValueError`` (outputs of the wrong shape).
    """


# The (inputs key, targets key) pairs of a dict batch that the pair losses recognize without batch_keys.
DICT_KEYS: tuple[tuple[str, str], ...] = (
    ("x", "y"),
    ("input", "target"),
    ("inputs", "targets"),
    ("image", "label"),
    ("images", "labels"),
)
# Hugging Face's conventions: the targets' key, and the label of a position that is not counted.
HF_LABELS = "labels"
IGNORE_INDEX = -100
HF_LOSSES = ("hf_sequence_classification", "hf_causal_lm", "hf_token_classification")


def describe_batch(batch: Any) -> str:
    """A batch's type and shape, for error messages."""
    if isinstance(batch, Tensor):
        return f"a Tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} element(s)"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
    return f"a {type(batch).__name__}"


def looks_like_hf(batch: Any) -> bool:
    """Whether ``batch`` is laid out as Hugging Face's collators build it: a dict with ``input_ids`` and ``labels``."""
    return isinstance(batch, Mapping) and "input_ids" in batch and HF_LABELS in batch


def hf_loss_for(batch: Any) -> str:
    """The HF built-in that fits a Hugging Face batch: by the labels' shape, one per sequence or one per token."""
    labels = batch[HF_LABELS]
    return "hf_sequence_classification" if isinstance(labels, Tensor) and labels.dim() == 1 else "hf_causal_lm"


def _dict_keys(batch: Mapping, loss_name: str) -> tuple[str, str]:
    """The one recognized key pair of a dict batch; a refusal naming ``batch_keys`` when none or several fit."""
    found = [pair for pair in DICT_KEYS if pair[0] in batch and pair[1] in batch]
    if len(found) == 1:
        return found[0]
    keys = sorted(map(str, batch))
    if found:
        why = f"it holds several of the recognized key pairs, {found}, so which is the input is ambiguous"
    else:
        why = f"none of the recognized key pairs {list(DICT_KEYS)} is among its keys {keys}"
    raise BuiltinLossError(
        f'loss_fn="{loss_name}" cannot tell the inputs from the targets of a dict batch: {why}. Name them with '
        f'batch_keys=(inputs_key, targets_key), e.g. FlatnessCallback(batch_keys=("image", "label")) (in the '
        f'functional API: loss_fn=BuiltinLoss("{loss_name}", batch_keys=...)).'
    )


def unpack_pair(batch: Any, loss_name: str, batch_keys: Optional[tuple[str, str]] = None) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of a batch for a pair loss: the first two elements of a tuple or list, or two
    entries of a dict (``batch_keys``, or the one pair of :data:`DICT_KEYS` it holds)."""
    if isinstance(batch, Mapping):
        keys = batch_keys if batch_keys is not None else _dict_keys(batch, loss_name)
        missing = [key for key in keys if key not in batch]
        if missing:
            raise BuiltinLossError(
                f"batch_keys={tuple(keys)!r}: the batch has no key(s) {missing}; its keys are {sorted(map(str, batch))}."
            )
        return batch[keys[0]], batch[keys[1]]
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise BuiltinLossError(
            f'loss_fn="{loss_name}" needs batches that are pairs (inputs, targets) or dicts with named inputs and '
            f"targets, but the batches are {describe_batch(batch)}. Pass a callable loss_fn(model, batch) for other "
            "batch types."
        )
    return batch[0], batch[1]


def split_hf_batch(batch: Any, loss_name: str) -> tuple[dict[str, Any], Tensor]:
    """``(keyword inputs, labels)`` of a Hugging Face batch: every key but ``"labels"``, and ``"labels"``."""
    if not isinstance(batch, Mapping) or HF_LABELS not in batch:
        raise BuiltinLossError(
            f'loss_fn="{loss_name}" needs batches that are dicts of the model\'s keyword inputs with the targets '
            f'under "labels", as Hugging Face\'s collators build them, but the batches are {describe_batch(batch)}.'
        )
    return {key: value for key, value in batch.items() if key != HF_LABELS}, batch[HF_LABELS]


def hf_logits(output: Any, loss_name: str) -> Tensor:
    """The logits of what ``model(**inputs)`` returned: a ``transformers`` ``ModelOutput`` (``.logits``), a dict
    with ``"logits"``, or the logits tensor itself."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise BuiltinLossError(
            f'loss_fn="{loss_name}" calls model(**inputs) and reads the logits of its output, but it returned '
            f"{type(output).__name__} without a logits tensor. The module's forward should return the Hugging Face "
            "model's output, e.g. `def forward(self, **inputs): return self.model(**inputs)` (with "
            "return_dict=True, the default)."
        )
    return logits


def _one_output_unit(outputs: Tensor) -> bool:
    return outputs.dim() < 2 or outputs.shape[1] == 1


def _cross_entropy(outputs: Tensor, y: Tensor) -> Tensor:
    # Cross-entropy over one logit is 0 for every sample: every curvature would be logged as 0.
    if _one_output_unit(outputs):
        raise BuiltinLossError(
            f'loss_fn="cross_entropy" needs one logit per class, outputs of shape (B, C) with C >= 2; the model '
            f"returns shape {tuple(outputs.shape)}, and cross-entropy over a single logit is 0 for every sample. "
            'For one output unit use loss_fn="bce_with_logits" (binary classification, targets 0/1 of shape (B,) '
            'or (B, 1)) or loss_fn="mse" (regression), or a callable loss_fn(model, batch).'
        )
    return F.cross_entropy(outputs, y, reduction="none")


def _class_correct(outputs: Tensor, y: Tensor) -> Optional[Tensor]:
    """The arg-max class against integer labels; ``None`` for class probabilities (no hard label)."""
    if y.is_floating_point() or y.dim() != 1:
        return None
    return outputs.argmax(1) == y


def _single_logit(outputs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``outputs`` and ``y`` as ``(B,)``, when both hold one number per sample."""
    size = outputs.shape[0] if outputs.dim() > 0 else 0
    if outputs.dim() not in (1, 2) or outputs.numel() != size:
        raise BuiltinLossError(
            f'loss_fn="bce_with_logits" needs one logit per sample, outputs of shape (B,) or (B, 1); the model '
            f'returns shape {tuple(outputs.shape)}. For C >= 2 classes use loss_fn="cross_entropy".'
        )
    if y.dim() not in (1, 2) or y.numel() != size:
        raise BuiltinLossError(
            f'loss_fn="bce_with_logits" needs one target per sample, 0 or 1, of shape (B,) or (B, 1), for outputs of '
            f"shape {tuple(outputs.shape)}; got targets of shape {tuple(y.shape)}."
        )
    return outputs.reshape(size), y.reshape(size)


def _binary_cross_entropy(outputs: Tensor, y: Tensor) -> Tensor:
    logits, targets = _single_logit(outputs, y)
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")


def _binary_correct(outputs: Tensor, y: Tensor) -> Tensor:
    logits, targets = _single_logit(outputs, y)
    return (logits > 0) == (targets > 0.5)  # a positive logit predicts class 1


def _mse(outputs: Tensor, y: Tensor) -> Tensor:
    if outputs.shape != y.shape:
        if outputs.numel() != y.numel() or outputs.shape[:1] != y.shape[:1]:
            raise BuiltinLossError(
                f'loss_fn="mse" needs targets with the outputs\' shape; the model returns shape {tuple(outputs.shape)} '
                f"and the targets have shape {tuple(y.shape)} (broadcasting them would pair every output with every "
                "target)."
            )
        y = y.reshape(outputs.shape)  # (B,) targets for (B, 1) outputs: the same numbers per sample
    squared = (outputs - y) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def _sequence_classification(logits: Tensor, labels: Tensor) -> Tensor:
    if labels.dim() != 1 or labels.is_floating_point() or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise BuiltinLossError(
            'loss_fn="hf_sequence_classification" needs logits of shape (B, C) and integer labels of shape (B,), '
            f"one class per sequence; got logits of shape {tuple(logits.shape)} and labels of shape "
            f"{tuple(labels.shape)} ({labels.dtype}). For one label per token use "
            'loss_fn="hf_token_classification" or "hf_causal_lm"; for multi-label or regression heads, a callable '
            "loss_fn(model, batch)."
        )
    return _cross_entropy(logits, labels)


def _token_losses(logits: Tensor, labels: Tensor, shift: bool, loss_name: str) -> Tensor:
    """Per sequence, the mean token cross-entropy over the positions whose label is not ``-100``.

    ``shift``: position ``t`` predicts the label at ``t + 1``, as Hugging Face's causal LMs shift
    them (the last position predicts nothing). A sequence with no counted position has loss 0
    (and zero gradient): it adds nothing to the objective, yet still counts as a sample in the
    mean over samples.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape or labels.is_floating_point():
        raise BuiltinLossError(
            f'loss_fn="{loss_name}" needs logits of shape (B, T, C) and integer labels of shape (B, T), one per '
            f"token; got logits of shape {tuple(logits.shape)} and labels of shape {tuple(labels.shape)} "
            f'({labels.dtype}). For one label per sequence use loss_fn="hf_sequence_classification".'
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counted = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return per_token.sum(1) / counted.to(per_token.dtype)


def _pair_forward(model: nn.Module, batch: Any, name: str, keys: Optional[tuple[str, str]]) -> tuple[Tensor, Tensor]:
    x, y = unpack_pair(batch, name, keys)
    return model(x), y


def _hf_forward(model: nn.Module, batch: Any, name: str, keys: Optional[tuple[str, str]]) -> tuple[Tensor, Tensor]:
    inputs, labels = split_hf_batch(batch, name)
    return hf_logits(model(**inputs), name), labels


def _no_accuracy(outputs: Tensor, y: Tensor) -> None:
    return None


@dataclass(frozen=True)
class _Builtin:
    losses: Callable[[Tensor, Tensor], Tensor]  # (model outputs, targets) -> (B,)
    correct: Callable[[Tensor, Tensor], Optional[Tensor]]  # -> (B,) bool, or None: no accuracy
    forward: Callable[..., tuple[Tensor, Tensor]] = _pair_forward  # (model, batch, name, keys) -> (outputs, targets)


_BUILTINS: dict[str, _Builtin] = {
    "cross_entropy": _Builtin(_cross_entropy, _class_correct),
    "bce_with_logits": _Builtin(_binary_cross_entropy, _binary_correct),
    "mse": _Builtin(_mse, _no_accuracy),  # regression: no accuracy
    "hf_sequence_classification": _Builtin(_sequence_classification, _class_correct, _hf_forward),
    # token level: no accuracy (a sequence is rarely right at every token, and a fraction is not a bool)
    "hf_causal_lm": _Builtin(lambda o, y: _token_losses(o, y, True, "hf_causal_lm"), _no_accuracy, _hf_forward),
    "hf_token_classification": _Builtin(
        lambda o, y: _token_losses(o, y, False, "hf_token_classification"), _no_accuracy, _hf_forward
    ),
}


def check_batch_keys(batch_keys: Any) -> Optional[tuple[str, str]]:
    """``batch_keys`` as a pair of distinct strings ``(inputs_key, targets_key)``, or ``None``."""
    if batch_keys is None:
        return None
    if (
        not isinstance(batch_keys, (tuple, list)) or len(batch_keys) != 2
        or not all(isinstance(key, str) for key in batch_keys) or batch_keys[0] == batch_keys[1]
    ):  # fmt: skip
        raise ValueError(
            "batch_keys must be None (dict batches with one of the key pairs "
            f"{list(DICT_KEYS)}) or a pair of two different strings (inputs_key, targets_key), e.g. "
            f'("image", "label"); got {batch_keys!r}.'
        )
    return (batch_keys[0], batch_keys[1])


@dataclass(frozen=True)
class BuiltinLoss:
    """A built-in loss by name, as a ``loss_fn(model, batch)`` returning the per-sample losses.

    ``batch_keys=(inputs_key, targets_key)`` names the entries of dict batches for
    ``"cross_entropy"``, ``"bce_with_logits"`` and ``"mse"``, whose default recognizes only the
    pairs of :data:`DICT_KEYS`; the ``"hf_*"`` losses always read ``"labels"`` and pass the rest
    as keyword inputs, and take no ``batch_keys``. What ``loss_fn="cross_entropy"`` resolves to,
    and what ``FlatnessCallback(batch_keys=...)`` builds.

    Example:
        >>> import torch
        >>> loss = BuiltinLoss("mse", batch_keys=("features", "value"))
        >>> loss(torch.nn.Linear(3, 1), {"features": torch.ones(4, 3), "value": torch.zeros(4, 1)}).shape
        torch.Size([4])
    """

    name: str
    batch_keys: Optional[tuple[str, str]] = None

    def __post_init__(self) -> None:
        if self.name not in _BUILTINS:
            raise ValueError(
                f"loss_fn={self.name!r} is not a built-in loss; accepted names: {sorted(_BUILTINS)}, or a callable "
                f"loss_fn(model, batch) returning {RETURNS}."
            )
        object.__setattr__(self, "batch_keys", check_batch_keys(self.batch_keys))
        if self.batch_keys is not None and self.name in HF_LOSSES:
            raise ValueError(
                f'batch_keys applies to loss_fn="cross_entropy", "bce_with_logits" and "mse"; loss_fn="{self.name}" '
                'reads the targets under "labels" and passes every other key to model(**inputs). Pass batch_keys=None.'
            )

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        builtin = _BUILTINS[self.name]
        return builtin.losses(*builtin.forward(model, batch, self.name, self.batch_keys))

    def losses_and_correct(self, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
        """The per-sample losses and correctness from one forward pass (``None``: the loss has no accuracy)."""
        builtin = _BUILTINS[self.name]
        outputs, y = builtin.forward(model, batch, self.name, self.batch_keys)
        return builtin.losses(outputs, y), builtin.correct(outputs, y)

    def check_batch(self, batch: Any) -> None:
        """Raise :class:`BuiltinLossError` (saying what fits) if the batch's structure does not fit this loss."""
        if self.name in HF_LOSSES:
            split_hf_batch(batch, self.name)
        else:
            unpack_pair(batch, self.name, self.batch_keys)


def builtin_losses_and_correct(name: str, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
    """The built-in loss ``name`` and its per-sample correctness from one forward pass."""
    return BuiltinLoss(name).losses_and_correct(model, batch)


def cross_entropy_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample cross-entropy ``F.cross_entropy(model(x), y, reduction="none")`` for logits ``(B, C)``,
    ``C >= 2``, and integer labels ``(B,)`` or class probabilities ``(B, C)``."""
    return BuiltinLoss("cross_entropy")(model, batch)


def bce_with_logits_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample ``F.binary_cross_entropy_with_logits(model(x), y, reduction="none")`` for one logit per
    sample, ``(B,)`` or ``(B, 1)``, and targets 0/1 (float, integer or bool) of shape ``(B,)`` or ``(B, 1)``."""
    return BuiltinLoss("bce_with_logits")(model, batch)


def mse_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample mean over output dimensions of ``(model(x) - y) ** 2``."""
    return BuiltinLoss("mse")(model, batch)


def hf_sequence_classification_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample cross-entropy of a Hugging Face sequence classifier: ``model(**inputs).logits`` ``(B, C)``
    against ``batch["labels"]`` ``(B,)``, ``inputs`` being every other key of the dict batch."""
    return BuiltinLoss("hf_sequence_classification")(model, batch)


def hf_causal_lm_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per sequence, the mean next-token cross-entropy of a Hugging Face causal LM over the tokens it counts:
    logits ``(B, T, C)`` at position ``t`` against ``batch["labels"][:, t + 1]``, labels ``-100`` ignored, as
    ``GPT2LMHeadModel`` shifts them; a sequence with no counted token has loss 0."""
    return BuiltinLoss("hf_causal_lm")(model, batch)


def hf_token_classification_loss(model: nn.Module, batch: Any) -> Tensor:
    """Per sequence, the mean token cross-entropy of logits ``(B, T, C)`` against ``batch["labels"]`` ``(B, T)``,
    not shifted (token classification, masked LM), labels ``-100`` ignored; no counted token: loss 0."""
    return BuiltinLoss("hf_token_classification")(model, batch)


BUILTIN_LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy_loss,
    "bce_with_logits": bce_with_logits_loss,
    "mse": mse_loss,
    "hf_sequence_classification": hf_sequence_classification_loss,
    "hf_causal_lm": hf_causal_lm_loss,
    "hf_token_classification": hf_token_classification_loss,
}


def split_output(out: Any) -> tuple[Tensor, Optional[Tensor]]:
    """``(losses, correct or None)`` from what a loss function returned; ``ValueError`` if it is neither form."""
    losses, correct = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(out).__name__
        if isinstance(out, tuple) and len(out) != 2:
            got = f"a tuple of {len(out)} elements"
        raise ValueError(
            f"loss_fn must return {RETURNS}, got {got}; use reduction=\"none\" and do not average over the batch."
        )
    if correct is not None and not (
        isinstance(correct, Tensor) and correct.dtype == torch.bool and correct.shape == losses.shape
    ):
        got = f"{correct.dtype} of shape {tuple(correct.shape)}" if isinstance(correct, Tensor) else type(correct).__name__
        raise ValueError(
            "loss_fn returned (losses, correct): correct must be a bool tensor of the losses' shape "
            f"{tuple(losses.shape)}, True where a sample is classified correctly (e.g. logits.argmax(1) == y); got {got}."
        )
    return losses, correct


def losses_and_correct(loss_fn: LossFn, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
    """Per-sample losses and correctness from one forward pass: a built-in loss's own, else what the callable
    returns, checked by :func:`split_output` (``None``: no accuracy)."""
    if isinstance(loss_fn, BuiltinLoss):
        return loss_fn.losses_and_correct(model, batch)
    return split_output(loss_fn(model, batch))


def resolve_loss_fn(loss_fn: LossArg) -> tuple[LossFn, str | None]:
    """Return ``(callable, builtin_name)``: a built-in name or function as its :class:`BuiltinLoss`, and
    ``builtin_name`` ``None`` for user callables."""
    if isinstance(loss_fn, BuiltinLoss):
        return loss_fn, loss_fn.name
    if isinstance(loss_fn, str):
        return BuiltinLoss(loss_fn), loss_fn  # refuses an unknown name, naming the accepted ones
    if callable(loss_fn):
        for name, fn in BUILTIN_LOSSES.items():
            if loss_fn is fn:
                return BuiltinLoss(name), name
        return loss_fn, None
    raise TypeError(
        f"loss_fn must be one of {sorted(BUILTIN_LOSSES)} or a callable loss_fn(model, batch); "
        f"got {type(loss_fn).__name__}."
    )


def with_batch_keys(loss_fn: LossArg, batch_keys: Optional[tuple[str, str]]) -> LossArg:
    """``loss_fn`` reading dict batches by ``batch_keys``: a :class:`BuiltinLoss`; ``loss_fn`` itself when
    ``batch_keys`` is ``None``. A callable ``loss_fn`` unpacks its batches itself and takes no ``batch_keys``."""
    if batch_keys is None:
        return loss_fn
    fn, name = resolve_loss_fn(loss_fn)
    if name is None:
        raise ValueError(
            f"batch_keys={batch_keys!r} names the dict entries a built-in loss reads; loss_fn is a callable, which "
            f'unpacks the batch itself. Pass batch_keys=None, or a built-in loss_fn such as "cross_entropy".'
        )
    return BuiltinLoss(name, batch_keys)


def check_loss_fn(loss_fn: LossArg) -> LossArg:
    """``loss_fn`` if it is a built-in name or a callable; else a ``ValueError`` that names what is accepted."""
    try:
        resolve_loss_fn(loss_fn)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"loss_fn={loss_fn!r} is not accepted; use one of {sorted(BUILTIN_LOSSES)} or a callable "
            f"loss_fn(model, batch) returning {RETURNS}."
        ) from err
    return loss_fn
