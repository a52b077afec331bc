"""Hugging Face ``transformers`` models under the callback with the built-in ``"hf_*"`` losses (issue 25, item 2).

Tiny models built from configs (no download, no network), wrapped in a LightningModule whose
``forward(**inputs)`` returns the Hugging Face output: every default metric is finite with
``on_error="raise"``, training is bit-identical with and without the callback, the top
eigenvalue equals ``scipy.sparse.linalg.eigsh`` on the same subsample, and the per-sample
losses average to the model's own ``.loss``.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import LightningModule, seed_everything
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

transformers = pytest.importorskip("transformers")
scipy_linalg = pytest.importorskip("scipy.sparse.linalg")

from lightning_flatness import FlatnessCallback  # noqa: E402
from lightning_flatness._preflight import LossFnError, probe_loss  # noqa: E402
from lightning_flatness.functional import BUILTIN_LOSSES, Objective, hessian_eigenvalues  # noqa: E402
from lightning_flatness.functional._restore import measurement_mode  # noqa: E402
from tests.helpers.lightning_models import trainer  # noqa: E402

VOCAB, STEPS, CLASSES = 50, 8, 3
DEFAULT_KEYS = ("flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/fisher_trace", "flatness/pacgen",
                "flatness/grad_noise_scale", "gap/train_loss", "gap/test_loss")  # fmt: skip
MEASURED = tuple(key for key in DEFAULT_KEYS if key != "flatness/grad_noise_scale")
OPTIONS = dict(num_samples=32, batch_size=8, gap_num_samples=32, on_error="raise")


# --------------------------------------------------------------------------- tiny models and data
def bert(**extra):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=32, num_labels=CLASSES, **extra,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class Sequences(Dataset):
    """Token sequences as Hugging Face's collators give them: dicts of ``input_ids``, ``attention_mask``, ``labels``.

    ``task="classification"``: one label per sequence, from its first and last tokens. ``"causal_lm"``: the
    labels are the tokens, and the padding at the end of every fourth sequence is ``-100`` (not counted).
    """

    def __init__(self, n: int, task: str, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, STEPS), generator=g)
        self.ids[:, 1::2] = (self.ids[:, ::2] * 3 + 1) % VOCAB  # something to learn
        self.mask = torch.ones(n, STEPS, dtype=torch.long)
        self.mask[::4, -3:] = 0
        self.ids[::4, -3:] = 0  # padding
        if task == "classification":
            self.labels = (self.ids[:, 0] + self.ids[:, 4]) % CLASSES
        else:
            self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class HFModule(LightningModule):
    """The usual wrapper: ``forward(**inputs)`` returns the Hugging Face output; training uses its own ``.loss``."""

    def __init__(self, build) -> None:
        super().__init__()
        self.model = build()

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


CASES = {  # name: (model builder, task, loss_fn)
    "bert": (bert, "classification", "hf_sequence_classification"),
    "gpt2": (gpt2, "causal_lm", "hf_causal_lm"),
    "llama": (llama, "causal_lm", "hf_causal_lm"),
}


def fit(tmp_path, case: str, cb=None):
    build, task, _ = CASES[case]
    seed_everything(0)
    model = HFModule(build)
    train, val = Sequences(64, task), Sequences(32, task, seed=1)
    loaders = DataLoader(train, batch_size=8, shuffle=True), DataLoader(val, batch_size=16)
    trainer(tmp_path, [cb] if cb is not None else [], max_epochs=2).fit(model, *loaders)
    return model, train


def measured_subsample(cb, dataset, batch_size=8):
    idx = cb._indices["measure"].tolist()
    return [default_collate([dataset[i] for i in idx[s : s + batch_size]]) for s in range(0, len(idx), batch_size)]


def eigsh_top(model, batches, loss_fn) -> float:
    """The top eigenvalue by ARPACK on Hessian-vector products, float64, eval mode."""
    import numpy as np

    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, dtype=torch.float64)
        n = objective.num_params

        def matvec(v):
            return objective.hvp(torch.as_tensor(np.asarray(v).reshape(-1), dtype=torch.float64)).numpy()

        op = scipy_linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        return float(scipy_linalg.eigsh(op, k=1, which="LA", tol=1e-10, return_eigenvectors=False)[0])


# --------------------------------------------------------------------------- the callback
@pytest.mark.parametrize("case", list(CASES))
def test_every_default_metric_is_finite_training_bit_identical_and_the_top_eigenvalue_is_eigsh(tmp_path, case):
    loss_fn = CASES[case][2]
    plain, _ = fit(tmp_path / "a", case)
    cb = FlatnessCallback(loss_fn=loss_fn, measure_at_start=True, **OPTIONS)
    measured, train = fit(tmp_path / "b", case, cb)
    rows = [row for _, row in cb.history]
    assert len(rows) == 3 and all(key in row for row in rows for key in MEASURED), rows
    for key in DEFAULT_KEYS:  # the noise scale where the 32 samples resolve |G|² (else warned, not logged)
        logged = [row[key] for row in rows if key in row]
        assert logged and all(math.isfinite(value) for value in logged), (key, rows)
    values = rows[-1]
    assert ("gap/train_acc" in values) == (case == "bert")  # token-level losses define no accuracy
    a, b = plain.state_dict(), measured.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    batches = measured_subsample(cb, train)
    reference = eigsh_top(measured, batches, loss_fn)
    eig = hessian_eigenvalues(measured, batches, loss_fn, tol=1e-10, max_iter=300, dtype=torch.float64)
    assert eig.values[0].item() == pytest.approx(reference, rel=1e-7)  # measured: 1e-15, 6e-12, 3e-9
    # float32 and the default tol: measured 7e-6 (bert), 6e-5 (gpt2), 1e-3 (llama) from eigsh
    assert values["flatness/hessian_top_eig"] == pytest.approx(reference, rel=5e-3)


# --------------------------------------------------------------------------- the per-sample losses
@pytest.mark.parametrize("case", list(CASES))
def test_per_sample_losses_average_to_the_models_own_loss(case):
    build, task, loss_fn = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    data = Sequences(8, task)
    batch = default_collate([data[i] for i in range(1, 8, 2)])  # unpadded: every sequence counts as many tokens
    with torch.no_grad():
        losses = BUILTIN_LOSSES[loss_fn](model, batch)
        own = model(**batch).loss
    assert losses.shape == (4,)
    assert losses.mean().item() == pytest.approx(own.item(), rel=1e-6)


def test_a_causal_lm_sequence_is_the_mean_over_its_counted_tokens_and_none_counts_zero():
    torch.manual_seed(0)
    model = gpt2().eval()
    data = Sequences(8, "causal_lm")
    batch = default_collate([data[i] for i in range(4)])  # sequence 0 is padded: 4 counted targets, not 7
    batch["labels"][1] = -100  # sequence 1: no counted token
    with torch.no_grad():
        losses = BUILTIN_LOSSES["hf_causal_lm"](model, batch)
        alone = model(**{k: v[:1] for k, v in batch.items()}).loss
    assert losses[0].item() == pytest.approx(alone.item(), rel=1e-6)  # HF's mean over the one sequence's tokens
    assert losses[1].item() == 0.0


def test_token_classification_is_not_shifted():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=32, num_labels=CLASSES,
    )  # fmt: skip
    model = transformers.BertForTokenClassification(config).eval()
    data = Sequences(8, "causal_lm")
    batch = default_collate([data[i] for i in range(1, 8, 2)])
    batch["labels"] = batch["labels"] % CLASSES
    with torch.no_grad():
        losses = BUILTIN_LOSSES["hf_token_classification"](model, batch)
        own = model(**batch).loss
    assert losses.mean().item() == pytest.approx(own.item(), rel=1e-6)


# --------------------------------------------------------------------------- the start-up message
@pytest.mark.parametrize(("task", "fits"), [("classification", "hf_sequence_classification"), ("causal_lm", "hf_causal_lm")])
def test_the_start_up_message_names_the_hf_loss_for_hugging_face_batches(task, fits):
    torch.manual_seed(0)
    data = Sequences(4, task)
    batch = default_collate([data[i] for i in range(4)])
    with pytest.raises(LossFnError, match=rf'look like Hugging Face\'s.*FlatnessCallback\(loss_fn="{fits}"\)'):
        probe_loss(HFModule(bert), batch, "cross_entropy", "FlatnessCallback")


def test_an_hf_loss_on_a_pair_batch_says_what_it_needs():
    with pytest.raises(LossFnError, match=r'loss_fn="hf_causal_lm" needs batches that are dicts .*"labels"'):
        probe_loss(HFModule(gpt2), (torch.zeros(2, 3), torch.zeros(2)), "hf_causal_lm", "FlatnessCallback")


def test_an_hf_loss_on_a_model_whose_forward_returns_no_logits_says_what_forward_should_be():
    class Loss(HFModule):
        def forward(self, **inputs):
            return (self.model(**inputs).logits,)

    data = Sequences(4, "classification")
    batch = default_collate([data[i] for i in range(4)])
    with pytest.raises(LossFnError, match=r"def forward\(self, \*\*inputs\): return self.model\(\*\*inputs\)"):
        probe_loss(Loss(bert), batch, "hf_sequence_classification", "FlatnessCallback")


# --------------------------------------------------------------------------- per-sample gradients
@pytest.mark.parametrize("case", list(CASES))
def test_the_fisher_trace_takes_the_loop_and_equals_a_per_sample_loop_in_float64(case):
    """Issue 25, item 3: HF's masking code has no ``vmap`` rule, so the parameters ghost norms do not cover take
    the per-sample loop; the trace equals a plain loop of per-sample gradients."""
    from lightning_flatness.functional import fisher_trace

    build, task, loss_fn = CASES[case]
    torch.manual_seed(0)
    model = HFModule(build).double()
    data = Sequences(6, task)
    batch = default_collate([data[i] for i in range(6)])  # with padded sequences
    result = fisher_trace(model, [batch], loss_fn, dtype=torch.float64)
    assert result.per_sample_path == "ghost+loop"
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    with measurement_mode(model):
        for i in range(6):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            grads = torch.autograd.grad(BUILTIN_LOSSES[loss_fn](model, one).sum(), params, allow_unused=True)
            norms.append(sum((g**2).sum() for g in grads if g is not None).item())
    assert result.value == pytest.approx(sum(norms) / 6, rel=1e-10)
