"""Per-sample squared gradient norms: ghost norms and the vmap fallback, against a per-sample loop."""

import pytest
import torch
from torch import nn

from lightning_flatness.functional import _ghost, _per_sample, fisher_trace
from tests.helpers.oracles import per_sample_grads_loop


class SequenceModel(nn.Module):
    """Linear layers applied per position (T = 5), so ghost norms take the Gram-matrix form."""

    def __init__(self, width: int = 3, hidden: int = 40) -> None:
        super().__init__()
        self.embed = nn.Linear(width, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.mix(h))
        return self.head(h.mean(1))


class ReusedLinear(nn.Module):
    """The same Linear called twice per forward: must fall back to vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class TokenModel(nn.Module):
    """Embedding (with padding) + learned positions + LayerNorm + per-position Linear layers.

    ``seq_first`` runs the body on (T, B, d), as sequence-first models do, with T == B so only
    the one-sample probe can tell the sample axis.
    """

    def __init__(self, seq_first: bool = False, vocab: int = 6, d: int = 8, t: int = 7) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(t, 1, d) if seq_first else torch.randn(t, d))
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, tokens):
        h = self.embed(tokens.T if self.seq_first else tokens)
        h = torch.tanh(self.mix(self.norm(h + self.pos)))
        return self.head(h.mean(0 if self.seq_first else 1))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Tanh(),
            nn.Conv2d(4, 3, 3, stride=2, dilation=1, padding=1, padding_mode="reflect"), nn.Tanh(),
            nn.Conv2d(3, 3, 2, dilation=2), nn.BatchNorm2d(3, affine=False), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class Encoder(nn.Module):
    """A one-layer ``nn.TransformerEncoder`` on (B, T, d) inputs, optionally sequence-first or causal."""

    def __init__(self, batch_first: bool = True, causal: bool = False, d: int = 8, t: int = 7) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.batch_first, self.causal = batch_first, causal
        self.head = nn.Linear(d * t, 3)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype) if self.causal else None
        h = self.encoder(x if self.batch_first else x.transpose(0, 1), mask=mask)
        return self.head((h if self.batch_first else h.transpose(0, 1)).flatten(1))


def _randomize_batch_norm(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model


def _models():
    torch.manual_seed(0)
    frozen_bias = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    frozen_bias[0].bias.requires_grad_(False)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    tied[2].weight = tied[0].weight  # a weight shared by two modules: vmap for both
    return {
        "sequence": (SequenceModel().double(), (2, 5, 3)),
        "reused": (ReusedLinear().double(), (2, 4)),
        "frozen_bias": (frozen_bias, (2, 4)),
        "tied": (tied, (2, 4)),
        "inplace_relu": (nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double(), (2, 4)),
        "conv_bn": (_randomize_batch_norm(ConvNet()).double(), (2, 2, 8, 8)),
        "tokens": (TokenModel().double(), "tokens"),
        "tokens_seq_first": (TokenModel(seq_first=True).double(), "tokens"),
        "transformer": (Encoder().double(), (2, 7, 8)),
        "transformer_seq_first": (Encoder(batch_first=False).double(), (2, 7, 8)),
        "masked_transformer": (Encoder(causal=True).double(), (2, 7, 8)),
    }


def _data(shape, n=7):
    g = torch.Generator().manual_seed(1)
    if shape == "tokens":
        x = torch.randint(0, 6, (n, 7), generator=g)  # token 0 is padding
    else:
        x = torch.randn(n, *shape[1:], generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


NAMES = [
    "sequence", "reused", "frozen_bias", "tied", "inplace_relu", "conv_bn", "tokens", "tokens_seq_first",
    "transformer", "transformer_seq_first", "masked_transformer",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_sq_norms_equal_the_per_sample_loop(name):
    model, shape = _models()[name]
    x, y = _data(shape)
    loop = per_sample_grads_loop(model, x, y).pow(2).sum(1)
    assert fisher_trace(model, [(x, y)]).value == pytest.approx(loop.mean().item(), rel=1e-10)


# Parameters that must go through vmap; every other one must take the ghost path.
VMAP_ONLY = {
    "sequence": set(), "frozen_bias": set(), "conv_bn": set(), "tokens": set(), "tokens_seq_first": set(),
    "reused": {"shared.weight", "shared.bias"},  # one Linear called twice
    "tied": {"0.weight", "0.bias", "2.bias"},  # a weight shared by two modules (and the layer it shares)
    "inplace_relu": {"0.weight", "0.bias"},  # its output is overwritten by ReLU(inplace=True)
    "transformer_seq_first": set(),
    "transformer": set(),  # plain self-attention is rewritten so its projections are recorded
    # with a mask it runs as one opaque call
    "masked_transformer": {f"encoder.layers.0.self_attn.{n}" for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")},
}  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_ghost_path_covers_every_supported_parameter(monkeypatch, name):
    """Fails if a supported layer silently stops taking the fast path, or an unsafe one takes it."""
    model, shape = _models()[name]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    seen = []
    original = _per_sample._vmap_sq_norms

    def spy(objective, batch, tensors, rest, size):
        seen.extend(names[i] for i in rest)
        return original(objective, batch, tensors, rest, size)

    monkeypatch.setattr(_per_sample, "_vmap_sq_norms", spy)
    x, y = _data(shape)
    fisher_trace(model, [(x, y)])
    assert set(seen) == VMAP_ONLY[name]


def test_outer_product_norm_forms_agree():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    d = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    explicit = torch.einsum("bto,bti->boi", d, a).pow(2).sum((1, 2))
    assert torch.allclose(_ghost._outer_sq_norms(a, d), explicit, rtol=1e-12)
    # wide layers take the Gram-matrix form instead of the materialized product
    a_wide = torch.randn(3, 2, 50, generator=g, dtype=torch.float64)
    d_wide = torch.randn(3, 2, 40, generator=g, dtype=torch.float64)
    explicit = torch.einsum("bto,bti->boi", d_wide, a_wide).pow(2).sum((1, 2))
    assert torch.allclose(_ghost._outer_sq_norms(a_wide, d_wide), explicit, rtol=1e-12)
