"""``HessianMinEigenvalue`` under DDP (2 CPU processes, gloo, each a shard of the mini-batches): values and
standard errors equal the single-process ones; the convexity map on rank 0 alone, without collectives."""

from __future__ import annotations

import csv
import glob
import json
import os

import pytest
import torch
import torch.distributed
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from lightning_flatness import FlatnessCallback, HessianEigenvalues, HessianMinEigenvalue, LandscapeOptions, keys
from lightning_flatness.functional import hessian_eigenvalue_ratio
from tests.callback.test_callback_ddp import subsample
from tests.helpers.lightning_models import Classifier, DataModule, trainer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
SOLVER = dict(tol=1e-8, max_iter=400)


def test_ddp_two_processes_equal_single_process(tmp_path):
    seed_everything(0)
    model = Classifier(dropout=0.0)
    dm = DataModule(shuffle=False)
    landscape = LandscapeOptions(every_n_epochs=1, steps=3, two_d=True, steps_2d=2, convexity=True, convexity_steps=2)
    cb = FlatnessCallback([HessianEigenvalues(**SOLVER), HessianMinEigenvalue(**SOLVER)], num_samples=96, batch_size=16,
                          gap_num_samples=0, landscape=landscape)  # fmt: skip
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer(tmp_path, [cb], logger=logger, max_epochs=1, strategy="ddp_spawn", devices=2).fit(model, dm)
    (written,) = glob.glob(os.path.join(str(tmp_path), "csv", "*", "metrics.csv"))  # rank 0 alone writes
    with open(written) as f:
        (row,) = [r for r in csv.DictReader(f) if r.get(keys.HESSIAN_MIN_EIG)]
    with open(os.path.join(os.path.dirname(written), "landscape", "epoch_000000.json")) as f:
        assert len(json.load(f)["convexity"]["ratio"]) == 2  # rank 0 mapped it while rank 1 went on
    batches = subsample(dm.train_set, 0, 96, 16)  # 6 mini-batches: ranks hold 3 each
    want = hessian_eigenvalue_ratio(model, batches, **SOLVER)  # `model`: rank 0's final weights, loaded back
    expected = {
        keys.HESSIAN_MIN_EIG: want.smallest.values[0].item(), keys.se(keys.HESSIAN_MIN_EIG): want.smallest.se[0].item(),
        keys.HESSIAN_EIG_RATIO: want.ratio, keys.se(keys.HESSIAN_EIG_RATIO): want.se,
    }  # fmt: skip
    for key, value in expected.items():
        # the error bars rest on the Ritz vectors, which the two runs reach from other starts (0.014 % apart)
        rel = 1e-3 if key.endswith("_se") else 1e-5
        assert float(row[key]) == pytest.approx(value, rel=rel), (key, row[key], value)
