"""BlockCurvature under DDP: 2 CPU processes (gloo), each with a shard; the values equal single-process ones."""

from __future__ import annotations

import copy
import csv
import glob
import os

import pytest
import torch
import torch.distributed
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from lightning_flatness import BlockCurvature, FlatnessCallback, keys
from lightning_flatness.functional import block_curvature
from lightning_flatness.metrics import measurement_seed
from tests.callback.test_callback_ddp import subsample
from tests.helpers.lightning_models import Classifier, DataModule, trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def test_ddp_block_curvature_equals_single_process(tmp_path):
    seed_everything(0)
    model = Classifier(dropout=0.0)
    initial = copy.deepcopy(model)
    metric = BlockCurvature(tol=1e-8, max_iter=400, trace_probes=8)  # "by_module": keys set on every rank
    cb = FlatnessCallback([metric], num_samples=96, batch_size=16, gap_num_samples=0, measure_at_start=True)
    t = trainer(tmp_path, [cb], logger=CSVLogger(str(tmp_path), name="csv"), max_epochs=1, strategy="ddp_spawn",
                devices=2, limit_train_batches=2)  # fmt: skip
    t.fit(model, DataModule(shuffle=False))
    (written,) = glob.glob(os.path.join(str(tmp_path), "csv", "*", "metrics.csv"))
    with open(written) as f:
        row = next(r for r in csv.DictReader(f) if r.get(keys.hessian_top_eig_block("0")) and r["step"] == "0")
    # at initialization every rank has the same BatchNorm statistics: the single-process value is defined
    batches = subsample(DataModule(shuffle=False).train_set, 0, 96, 16)  # 6 mini-batches: ranks hold 3 each
    expected = block_curvature(
        initial, batches, tol=1e-8, max_iter=400, trace_probes=8, generator=measurement_seed(0, 0, metric.name)
    )
    assert set(expected) == {"0", "1", "4"}
    worst = 0.0
    for name, r in expected.items():
        for key, want in ((keys.hessian_top_eig_block(name), r.top_eig), (keys.hessian_trace_block(name), r.trace),
                          (keys.se(keys.hessian_top_eig_block(name)), r.top_eig_se)):  # fmt: skip
            assert float(row[key]) == pytest.approx(want, rel=1e-4), (key, row[key], want)
            worst = max(worst, abs(float(row[key]) - want) / abs(want))
    print(f"DDP vs single process: max relative difference {worst:.2e}")
