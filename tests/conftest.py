"""Test-session settings and fixtures; shared models, oracles and helpers live in ``tests/helpers``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.models import cnn_batches, mlp_batches, tiny_cnn, tiny_mlp

# Tiny models: one intra-op thread avoids spin-wait overhead that dominates at this size.
torch.set_num_threads(1)


@pytest.fixture(params=["mlp", "cnn"])
def model_and_batches(request):
    if request.param == "mlp":
        return tiny_mlp(), mlp_batches()
    return tiny_cnn(), cnn_batches()
