"""The wheel a user installs: built from this tree, installed without extras into a fresh virtual
environment, it runs ``FlatnessCallback()`` in a two-epoch fit (issue 25, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FIT = textwrap.dedent(
    """
    import importlib.util, math, torch
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset
    from lightning_flatness import FlatnessCallback

    assert importlib.util.find_spec("mnist1d") is None and importlib.util.find_spec("sklearn") is None  # no extras

    class Net(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)
        def validation_step(self, batch, _):
            pass
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 4, generator=g), torch.randint(0, 3, (96,), generator=g))
    callback = FlatnessCallback(num_samples=32, batch_size=16, gap_num_samples=32)
    trainer = Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    values = callback.history[-1][1]
    keys = ["flatness/hessian_top_eig", "flatness/grad_cosine_regret", "flatness/fisher_trace", "flatness/pacgen"]
    assert all(math.isfinite(values[k]) for k in keys), values
    print("fit ok", len(callback.history))
    """
)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``args`` in ``cwd``, without this process's ``PYTHONPATH`` (which would show the fresh environment this
    tree, and pip an installed ``lightning-flatness``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_the_wheel_without_extras_runs_the_callback(tmp_path):
    built = _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                 "-w", str(tmp_path / "dist"), cwd=tmp_path)  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lightning_flatness-*.whl")
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    # the CPU wheel of torch, pinned as the project's own set-up pins it, then the wheel with no extras
    installed = _run(str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / ".ci" / "constraints.txt"),
                     "torch==2.13.0", str(wheel), cwd=tmp_path)  # fmt: skip
    if installed.returncode != 0 and any(s in installed.stderr for s in ("NewConnectionError", "Could not fetch URL")):
        pytest.skip(f"no package registry reachable: {installed.stderr[-300:]}")
    assert installed.returncode == 0, installed.stderr[-2000:]
    fit = _run(str(python), "-c", FIT, cwd=tmp_path)
    assert fit.returncode == 0 and "fit ok 2" in fit.stdout, (fit.stdout[-1000:], fit.stderr[-3000:])
