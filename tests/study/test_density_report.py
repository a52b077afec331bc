"""The report's ``hessian_density.png`` overlay, from fake run directories."""

from __future__ import annotations

import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_flatness.functional import DenseOperator, spectral_density
from lightning_flatness.metrics import LogPosition
from lightning_flatness.metrics.spectral_density import read_final_density, write_json
from lightning_flatness.study.report import make_report

torch.set_num_threads(1)


def _run(root, name, scale, epochs=(1, 3)):
    w = SummaryWriter(log_dir=str(root / name))
    w.add_scalar("flatness/hessian_trace_slq", scale, 3)
    w.close()
    op = DenseOperator(torch.diag(scale * torch.linspace(-0.5, 2.0, 12, dtype=torch.float64)))
    for epoch in epochs:  # the latest is drawn
        res = spectral_density(op, num_probes=2, lanczos_steps=4, generator=epoch)
        write_json(root / name, res, *res.density(64), LogPosition(epoch, step=8 * epoch - 1))


def test_density_overlay_from_the_runs_json_files(tmp_path):
    root = tmp_path / "runs"
    _run(root, "bs16", 1.0)
    _run(root, "bs256", 4.0)
    (root / "bs16" / "hessian_density" / "epoch_000004.json").write_text("{not json")  # skipped: epoch 3 is used
    w = SummaryWriter(log_dir=str(root / "plain"))  # a run without density files is left out
    w.add_scalar("flatness/hessian_trace_slq", 2.0, 3)
    w.close()
    assert read_final_density(root / "bs16")["epochs_completed"] == 3 and read_final_density(root / "plain") is None
    out = tmp_path / "out"
    report = make_report(root, out, echo=False)
    assert out / "hessian_density.png" in report.files
    assert (out / "hessian_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_density_files_no_figure(tmp_path):
    w = SummaryWriter(log_dir=str(tmp_path / "runs" / "a"))
    w.add_scalar("flatness/hessian_top_eig", 1.0, 1)
    w.close()
    report = make_report(tmp_path / "runs", tmp_path / "out", echo=False)
    assert not (tmp_path / "out" / "hessian_density.png").exists()
    assert all(f.name != "hessian_density.png" for f in report.files)
