"""The per-sample paths (ghost norms, vmap, a loop over samples): each chosen where it works, each
equal to a plain per-sample loop in float64, on models that need it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_flatness.functional import _per_sample, fisher_trace, grad_noise_scale


class Recurrent(nn.Module):
    """``nn.RNN``/``GRU``/``LSTM`` (batch-first) and a head on the last step: vmap has no batching rule
    for their fused cells."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class RenormedEmbedding(nn.Module):
    """``nn.Embedding(max_norm=1.0)`` renormalizes the rows it looks up in place (``aten::embedding_renorm_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, max_norm=1.0)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


class PaddedEncoder(nn.Module):
    """``nn.TransformerEncoder`` with its default ``enable_nested_tensor=True`` and a key padding mask."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(d, 3)

    def forward(self, x, padding):
        return self.head(self.encoder(x, src_key_padding_mask=padding).mean(1))


class Checkpointed(nn.Module):
    """A block under ``checkpoint(use_reentrant=True)``, which supports ``.backward()`` only: neither
    ``torch.autograd.grad`` (the ghost pass) nor vmap runs through it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(checkpoint(self.block, torch.tanh(self.inp(x)), use_reentrant=True))


def padded_loss(model, batch):
    x, padding, y = batch
    return F.cross_entropy(model(x, padding), y, reduction="none")


def _case(name):
    """``(model, batch, loss_fn, the path auto picks)``: float64, 6 samples."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (6,), generator=g)
    if name in ("GRU", "RNN", "LSTM"):
        return Recurrent(name).double(), (torch.randn(6, 5, 4, generator=g, dtype=torch.float64), y), "ghost+loop"
    if name == "embedding_max_norm":
        return RenormedEmbedding().double(), (torch.randint(0, 10, (6, 5), generator=g), y), "ghost+loop"
    if name == "encoder_padding_mask":
        padding = torch.zeros(6, 5, dtype=torch.bool)
        padding[:3, 3:] = True  # the first three samples are 3 tokens long
        return PaddedEncoder().double(), (torch.randn(6, 5, 8, generator=g, dtype=torch.float64), padding, y), "ghost+loop"
    if name == "checkpoint_reentrant":
        return Checkpointed().double(), (torch.randn(6, 4, generator=g, dtype=torch.float64), y), "loop"
    if name == "mlp":
        mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        return mlp, (torch.randn(6, 4, generator=g, dtype=torch.float64), y), "ghost"
    if name == "group_norm":  # GroupNorm has no ghost formula: vmap for its parameters
        net = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        return net, (torch.randn(6, 4, generator=g, dtype=torch.float64), y), "ghost+vmap"
    raise KeyError(name)


def _loss_fn(batch):
    return padded_loss if len(batch) == 3 else "cross_entropy"


def loop_sq_norms(model, batch, backward=False):
    """``‖∇ℓ_i‖²`` by a plain loop over samples in eval mode: ``torch.autograd.grad`` of each sample's
    loss (``.backward()`` with ``backward=True``, for reentrant checkpointing, which refuses ``grad``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    out = []
    for i in range(len(batch[-1])):
        *inputs, y = (t[i : i + 1] for t in batch)
        loss = F.cross_entropy(model(*inputs), y, reduction="sum")
        if backward:
            model.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in params]
        else:
            grads = torch.autograd.grad(loss, params)
        out.append(sum((g**2).sum() for g in grads))
    return torch.stack(out)


NEED_LOOP = ["GRU", "RNN", "LSTM", "embedding_max_norm", "encoder_padding_mask", "checkpoint_reentrant"]


@pytest.mark.parametrize("name", NEED_LOOP + ["mlp", "group_norm"])
def test_auto_path_equals_the_per_sample_loop(name):
    model, batch, expected = _case(name)
    result = fisher_trace(model, [batch], _loss_fn(batch))  # first: the oracle renorms the model's embedding
    assert all(p.grad is None for p in model.parameters())  # nothing leaked into the model
    loop = loop_sq_norms(model, batch, backward=name == "checkpoint_reentrant")
    assert result.per_sample_path == expected
    assert result.value == pytest.approx(loop.mean().item(), rel=1e-10)
    assert torch.allclose(result.sample_sq_norms[0], loop, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["group_norm", "GRU"])
def test_forced_loop_equals_the_per_sample_loop(name):
    model, batch, _ = _case(name)
    result = fisher_trace(model, [batch], _loss_fn(batch), per_sample="loop")
    assert result.per_sample_path == "ghost+loop"
    assert result.value == pytest.approx(loop_sq_norms(model, batch).mean().item(), rel=1e-10)


def test_forced_vmap_on_a_recurrent_model_is_refused():
    model, batch, _ = _case("GRU")
    with pytest.raises(ValueError, match=r"per_sample='vmap' cannot compute .* torch\.func\.vmap fails .*'auto' or 'loop'"):
        fisher_trace(model, [batch], per_sample="vmap")
    with pytest.raises(ValueError, match=r"per_sample='vmap'"):
        grad_noise_scale(model, [batch], per_sample="vmap")


@pytest.mark.parametrize("fn", [fisher_trace, grad_noise_scale])
def test_unknown_per_sample_is_refused(fn):
    model, batch, _ = _case("mlp")
    with pytest.raises(ValueError, match=r"per_sample='fast' is not accepted; choose one of \['auto', 'vmap', 'loop'\]"):
        fn(model, [batch], per_sample="fast")


def test_path_is_chosen_once_per_model(monkeypatch):
    model, batch, _ = _case("GRU")
    calls = []
    original = _per_sample._try_paths
    monkeypatch.setattr(_per_sample, "_try_paths", lambda *a: calls.append(1) or original(*a))
    first = fisher_trace(model, [batch, batch])
    second = fisher_trace(model, [batch])
    assert len(calls) == 1 and first.value == pytest.approx(second.value, rel=1e-12)


def test_grad_noise_scale_on_a_recurrent_model():
    """Its per-sample norms come from the loop too: trace of the covariance as from the loop's gradients."""
    model, batch, _ = _case("GRU")
    halves = [tuple(t[:3] for t in batch), tuple(t[3:] for t in batch)]
    result = grad_noise_scale(model, halves, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    rows = []
    for i in range(6):
        loss = F.cross_entropy(model(batch[0][i : i + 1]), batch[1][i : i + 1], reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    grads = torch.stack(rows)
    mean = grads.mean(0)
    trace = 6 / 5 * ((grads**2).sum(1).mean() - mean @ mean)
    assert result.trace_cov == pytest.approx(trace.item(), rel=1e-9)


def test_mc_fisher_on_a_recurrent_model_runs():
    model, batch, _ = _case("LSTM")
    result = fisher_trace(model, [batch], kind="mc", num_samples=2, generator=0)
    assert result.per_sample_path == "ghost+loop" and result.value > 0


class ShapeDependent(nn.Module):
    """A GRU only for sequences longer than 4 steps: two trial samples of short ones show ``vmap`` working."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.lin, self.head = nn.GRU(3, 5, batch_first=True), nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        if x.shape[1] > 4:
            return self.head(self.gru(x)[0][:, -1])
        return self.head(torch.tanh(self.lin(x)).mean(1))


def test_a_kept_vmap_path_that_fails_on_a_later_batch_gives_way_to_the_loop():
    """Found by review: the path kept from short sequences (``vmap``) raised on long ones; now the loop takes over
    for them and from then on."""
    torch.manual_seed(0)
    model = ShapeDependent().double()
    g = torch.Generator().manual_seed(1)
    short = (torch.randn(6, 3, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g))
    long = (torch.randn(6, 6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g))
    assert fisher_trace(model, [short]).per_sample_path == "ghost+vmap"
    result = fisher_trace(model, [long])
    params, norms = list(model.parameters()), []
    for i in range(6):  # the plain loop; `lin` is unused on long sequences
        loss = F.cross_entropy(model(long[0][i : i + 1]), long[1][i : i + 1])
        norms.append(sum((g**2).sum() for g in torch.autograd.grad(loss, params, allow_unused=True) if g is not None))
    assert result.value == pytest.approx(torch.stack(norms).mean().item(), rel=1e-10)
    assert fisher_trace(model, [long]).per_sample_path == "ghost+loop"
