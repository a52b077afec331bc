"""``LandscapeOptions(convexity=True)``: the |λ_min/λ_max| map beside the 2-D slice, in the JSON files and the
images, training left bit-identical; its options refused at construction."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_flatness import FlatnessCallback, LandscapeOptions
from lightning_flatness.functional import loss_landscape
from lightning_flatness.landscape import views_from_json
from lightning_flatness.landscape.plots import images
from lightning_flatness.metrics import measurement_seed
from tests.helpers.lightning_models import Classifier, DataModule, trainer

torch.set_num_threads(1)
SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=0)
MAP = dict(every_n_epochs=1, steps=3, two_d=True, steps_2d=3, convexity=True, convexity_steps=3)


def fit(tmp_path, cb=None, logger=False):
    seed_everything(0)
    model = Classifier()
    trainer(tmp_path, [cb] if cb is not None else [], logger=logger, max_epochs=2).fit(model, DataModule())
    return model


def test_the_map_is_drawn_and_written_and_training_stays_bit_identical(tmp_path):
    plain = fit(tmp_path / "a")
    cb = FlatnessCallback(metrics=["hessian_top_eig"], landscape=LandscapeOptions(**MAP), on_error="raise", **SMALL)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    measured = fit(tmp_path / "b", cb, logger=tb)
    for key, value in plain.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, measured.state_dict()[key]), key
    with open(os.path.join(tb.log_dir, "landscape", "epoch_000001.json")) as f:
        views = views_from_json(json.load(f))
    assert views.convexity_coordinates == pytest.approx([-1.0, 0.0, 1.0])
    assert len(views.convexity_ratio) == 3 and all(0 <= r < 10 for row in views.convexity_ratio for r in row)
    assert views.n_hvp > 0 and views.n_forward == 3 + 9 + 9 + 3  # 1-D, 2-D, the map's losses, eigenvector (no gap: train only)
    # the map is the functional one, on the callback's measurement subsample with its seed
    want = loss_landscape(measured, cb._data["measure"], directions=2, steps=3, seed=measurement_seed(0, 0, "landscape"),
                          convexity=True).convexity  # fmt: skip
    assert torch.allclose(torch.tensor(views.convexity_ratio, dtype=torch.float64), want.ratio, rtol=1e-6)
    wide, narrow = images(views)["landscape/2d"], images(_without_map(views))["landscape/2d"]
    assert wide.shape[1] > 1.5 * narrow.shape[1]  # the map beside the surface


def _without_map(views):
    from dataclasses import replace

    return replace(views, convexity_coordinates=None, convexity_ratio=None, convexity_converged=None)


def test_unconverged_points_are_warned_about_once(tmp_path):
    options = LandscapeOptions(**{**MAP, "convexity_max_iter": 2})
    cb = FlatnessCallback(metrics=["fisher_trace"], landscape=options, **SMALL)
    with pytest.warns(UserWarning, match=r"convexity map .*convexity_max_iter=2") as record:
        fit(tmp_path, cb)
    assert sum("convexity map" in str(w.message) for w in record) == 1
    assert len(cb._landscape.views) == 2


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(convexity=True), "two_d"), (dict(two_d=True, convexity="yes"), "convexity"),
     (dict(convexity_steps=1), "convexity_steps"), (dict(convexity_tol=0.0), "convexity_tol"),
     (dict(convexity_tol=2.0), "convexity_tol"), (dict(convexity_max_iter=1), "convexity_max_iter")],
)  # fmt: skip
def test_invalid_convexity_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LandscapeOptions(**kwargs)
