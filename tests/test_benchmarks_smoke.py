"""Smoke test of ``python -m benchmarks``: the quickest run on a toy MLP, every peer involved."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def test_quick_benchmark_runs_and_writes_the_table(tmp_path):
    for peer in ("scipy", "pyhessian", "curvlinops", "backpack"):
        pytest.importorskip(peer)
    from benchmarks.run import main

    out = tmp_path / "RESULTS.md"
    text = main(
        ["--quick", "--models", "mlp", "--sections", "hvp,eigen,fisher", "--repeats", "1", "--out", str(out), "--strict"]
    )
    assert out.read_text() == text
    assert "## Targets" in text and "Quick smoke run" in text
    for row in ("HVP / gradient", "top eig HVPs, ours cold / PyHessian cold", "Fisher: loop time / ours",
                "Fisher: ours time / BackPACK"):  # fmt: skip
        assert row in text
    assert "error:" not in text  # every peer ran on the MLP
    # the three Fisher implementations agree sample by sample
    fisher = text.split("## 3.")[1].split("\n## ")[0]
    fisher_row = next(line for line in fisher.splitlines() if line.startswith("| MLP"))
    diffs = [float(tok) for tok in fisher_row.replace(",", " ").split() if "e-" in tok]
    assert diffs and max(diffs) < 1e-4


def test_memory_probe_in_process():
    """The memory section's child measurement, without the subprocess (no peers needed)."""
    import torch

    from benchmarks.memory import child

    result = child("fisher_trace", [128, 256], 128, "quick", "cpu", 0)
    assert set(result["peaks"]) == {"128", "256"}
    assert all(isinstance(v, int) for v in result["peaks"].values())
    assert torch.get_num_threads() >= 1


def test_fit_section_workloads():
    """Section 6's own workloads: the linear-teacher MLP and the ResNet, at full and toy size."""
    import torch

    from benchmarks.models import resnet_workload, teacher_workload

    cpu = torch.device("cpu")
    teacher, net = teacher_workload(cpu), resnet_workload(cpu)
    assert teacher.num_params == 78_858 and 50_000 <= net.num_params <= 100_000
    assert teacher.label == "MLP 40-256-256-10, linear teacher" and net.label == "ResNet 16-32-64 on 3x32x32"
    x, y = teacher.sample(2000, torch.Generator().manual_seed(0))
    assert x.shape == (2000, 40) and set(y.tolist()) == set(range(10))
    # the labels follow the teacher: least squares on x separates them far better than chance
    onehot = torch.nn.functional.one_hot(y, 10).float()
    fit = torch.linalg.lstsq(x, onehot).solution
    assert ((x @ fit).argmax(dim=1) == y).float().mean() > 0.5
    x2, y2 = teacher.sample(2000, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded
    images, _ = net.sample(4, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 32, 32) and net.model(images).shape == (4, 10)
    toy = resnet_workload(cpu, channels=(8, 16), side=8)
    assert toy.model(toy.sample(2, torch.Generator())[0]).shape == (2, 10)


def test_quick_fit_section_runs_the_new_workloads():
    """``--sections fit --quick`` on the linear-teacher MLP and the ResNet, the models space-separated."""
    from benchmarks.run import main

    text = main(["--quick", "--sections", "fit", "--models", "teacher_mlp", "resnet", "--repeats", "1", "--strict"])
    table = text.split("## 6.")[1]
    rows = [line for line in table.splitlines() if line.startswith(("| MLP", "| ResNet"))]
    assert [r.split(" | ")[0] for r in rows] == ["| MLP 40-64-10, linear teacher (3.3k)", "| ResNet 8-16 on 3x8x8 (5.3k)"]
    assert all("error:" not in r and r.count("×") >= 10 for r in rows)  # every part column filled


def test_quick_error_section(tmp_path):
    """Section 7 on the toy MLP: ours, PyHessian and Cockpit each give a curve and an error at ours' cost."""
    pytest.importorskip("pyhessian")
    with warnings.catch_warnings():  # cockpit-for-pytorch imports pkg_resources (setuptools < 81)
        warnings.simplefilter("ignore")
        pytest.importorskip("cockpit")
    from benchmarks.run import main

    out = tmp_path / "RESULTS.md"
    text = main(["--quick", "--models", "mlp", "--sections", "error", "--out", str(out), "--strict"])
    assert out.read_text() == text
    assert "top eig total error at equal cost, ours / best peer" in text
    table = text.split("## 7.")[1].split("\n\n")[1]
    rows = [line for line in table.splitlines() if line.startswith("| MLP")]
    assert len(rows) == 4 and "error:" not in table
    for row in rows[:3]:  # ours, PyHessian, Cockpit; then ours without the check, for reference
        assert "%" in row.split("|")[4]  # an error at ours' cost: each peer's sizes bracket it
    assert "verify=False" in rows[3]
