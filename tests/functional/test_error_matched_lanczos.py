"""Lanczos stopped at a tenth of the sampling error (``error_ratio``), against the value solved to ``tol=1e-10``.

On three small models (an MLP, a CNN with BatchNorm, a transformer encoder) and 50 redrawn
subsamples each, the value at ``error_ratio=0.1`` lies within ``0.1 se`` of the tightly solved one
on the same subsample, and its standard error is that of the tight solve; so does each diagonal
block's top eigenvalue (:func:`block_curvature`, 20 subsamples).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_flatness.functional import block_curvature, hessian_eigenvalues
from tests.helpers.models import tiny_cnn, tiny_mlp

SEEDS = range(50)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(7, 4)
        self.enc = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(tokens)).mean(1))


def _batches(model: str, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four mini-batches of 12 samples, drawn afresh for each seed."""
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (4,), "cnn": (1, 6, 6)}.get(model)
    out = []
    for _ in range(4):
        x = torch.randint(0, 7, (12, 5), generator=g) if shape is None else torch.randn(12, *shape, generator=g)
        out.append((x if shape is None else x.double(), torch.randint(0, 3, (12,), generator=g)))
    return out


MODELS = {"mlp": tiny_mlp, "cnn": tiny_cnn, "transformer": lambda: TinyTransformer().double()}


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_within_a_tenth_of_the_standard_error_of_the_tight_solve(model_name):
    model = MODELS[model_name]()
    worst = 0.0
    for seed in SEEDS:
        batches = _batches(model_name, seed)
        matched = hessian_eigenvalues(model, batches, error_ratio=0.1, generator=seed)
        tight = hessian_eigenvalues(model, batches, tol=1e-10, max_iter=300, generator=seed, verify=False)
        se = matched.se[0].item()
        assert matched.converged and tight.converged
        worst = max(worst, abs(matched.values[0].item() - tight.values[0].item()) / se)
        assert matched.se[0].item() == pytest.approx(tight.se[0].item(), rel=0.05)
    assert worst <= 0.1, worst


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_block_curvature_within_a_tenth_of_the_standard_error_of_the_tight_solve(model_name):
    """Each diagonal block's top eigenvalue, by the same rule (``BlockCurvature``'s default)."""
    model = MODELS[model_name]()
    worst = 0.0
    for seed in SEEDS[:20]:  # every block of every model: 20 subsamples keep it within seconds
        batches = _batches(model_name, seed)
        matched = block_curvature(model, batches, trace_probes=2, error_ratio=0.1, generator=seed)
        tight = block_curvature(model, batches, trace_probes=2, tol=1e-10, max_iter=300, generator=seed)
        for name, block in matched.items():
            assert block.converged and tight[name].converged
            worst = max(worst, abs(block.top_eig - tight[name].top_eig) / tight[name].top_eig_se)
    assert worst <= 0.1, worst
