"""Plain self-attention rewritten so its projections are visible to the ghost-norm recorder.

``F.multi_head_attention_forward`` runs as one Python function: a ``TorchFunctionMode`` sees the
call, not the ``F.linear`` projections inside it, and the output projection runs on
``(T·B, E)`` rows, which hides the sample axis. For the common case (self-attention with the
packed in-projection, no masks, biases on keys and values or zero attention, no attention
weights returned, no dropout) :func:`self_attention` computes the same thing with the same
operations (in-projection, ``scaled_dot_product_attention``, out-projection) but keeps the
output projection's input as ``(T, B, E)``. Anything else runs the original function and its
parameters fall back to ``vmap``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn.functional as F
from torch import Tensor

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MUST_BE_NONE = ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")


def plain_self_attention(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The bound arguments of a ``multi_head_attention_forward`` call :func:`self_attention` covers."""
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = bound.arguments
    query = a["query"]
    plain = (
        isinstance(query, Tensor) and query.dim() == 3 and query is a["key"] and query is a["value"]
        and all(a[name] is None for name in _MUST_BE_NONE)
        and not (a["add_zero_attn"] or a["use_separate_proj_weight"] or a["need_weights"] or a["is_causal"])
        and (a["dropout_p"] == 0.0 or not a["training"])
        and a["in_proj_weight"] is not None and query.shape[-1] == a["embed_dim_to_check"]
        and a["embed_dim_to_check"] % a["num_heads"] == 0
    )  # fmt: skip
    return a if plain else None


def self_attention(a: dict[str, Any]) -> tuple[Tensor, None]:
    """``multi_head_attention_forward`` for the arguments :func:`plain_self_attention` accepted."""
    x = a["query"]  # (T, B, E): nn.MultiheadAttention moves batch_first inputs to this layout
    t, b, e = x.shape
    heads = a["num_heads"]
    qkv = F.linear(x, a["in_proj_weight"], a["in_proj_bias"])

    def split(part: Tensor) -> Tensor:  # (T, B, E) -> (B, heads, T, E / heads)
        return part.reshape(t, b * heads, e // heads).transpose(0, 1).reshape(b, heads, t, e // heads)

    q, k, v = (split(part) for part in qkv.unflatten(-1, (3, e)).unbind(-2))
    attended = F.scaled_dot_product_attention(q, k, v)
    attended = attended.permute(2, 0, 1, 3).reshape(t, b, e)
    return F.linear(attended, a["out_proj_weight"], a["out_proj_bias"]), None
