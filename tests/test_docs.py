"""Every Python block of the README and ``docs/*.md`` runs as written (issue 23, item 13).

A block that uses ``model``, ``datamodule`` or ``batches`` stands for the reader's own; it runs
here with tiny ones (:func:`reader_namespace`): ``model``, a ``LightningModule`` with a
``features`` and a ``classifier`` child (the names the ``block_curvature`` example selects),
``datamodule`` 256 training and 128 validation samples of 8 features in 3 classes, and
``batches``, four mini-batches of 32 of them. Nothing else is provided: a block that forgets an
import fails. Blocks that cannot run here are in :data:`NOT_RUN`, each with its reason.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.lightning_models import DataModule

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# "file:line" of a block's opening fence -> why it does not run here (keep this short).
NOT_RUN: dict[str, str] = {}


def blocks() -> list:
    out = []
    for path in FILES:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            where = f"{path.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}"
            marks = [pytest.mark.skip(reason=NOT_RUN[where])] if where in NOT_RUN else []
            out.append(pytest.param(match.group(1), id=where, marks=marks))
    return out


class ReaderModel(L.LightningModule):
    """The reader's ``model`` in the examples: a small classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.classifier = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def reader_namespace() -> dict:
    """The names an example may use without defining them: the reader's model and data."""
    torch.manual_seed(0)
    datamodule = DataModule(n_train=256, n_val=128, batch_size=32)
    x, y = datamodule.train_set.tensors
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]
    return {"model": ReaderModel(), "datamodule": datamodule, "batches": batches}


def test_the_docs_have_python_blocks():
    assert len(blocks()) >= 10


@pytest.mark.parametrize("code", blocks())
def test_python_block_runs_as_written(code, tmp_path, monkeypatch):
    if "import transformers" in code:  # the Hugging Face examples: an optional dependency (the dev extra has it)
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # a block may write logs ("runs/")
    torch.set_num_threads(1)
    namespace = {"__name__": "__docs__", **reader_namespace()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the examples' output is not what is tested here
        exec(compile(code, "<docs block>", "exec"), namespace)  # noqa: S102
