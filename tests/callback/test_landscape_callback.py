"""FlatnessCallback's loss-landscape views: schedule, TensorBoard images, JSON files, W&B, faults."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_flatness import FlatnessCallback, LandscapeOptions
from lightning_flatness.functional import loss_landscape
from lightning_flatness.landscape import read_final, views_from_json
from lightning_flatness.landscape import views as _landscape
from lightning_flatness.metrics import measurement_seed
from tests.helpers.lightning_models import Classifier, DataModule, trainer
from tests.helpers.loggers import offline_wandb

torch.set_num_threads(1)
SMALL = dict(num_samples=64, batch_size=16, gap_num_samples=96)
VIEWS = dict(steps=5, two_d=True, steps_2d=3)


def fit(tmp_path, cb, logger=False, **kwargs):
    seed_everything(0)
    model = Classifier()
    t = trainer(tmp_path, [cb], logger=logger, **kwargs)
    t.fit(model, DataModule())
    return t, model


def image_steps(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def json_epochs(log_dir):
    return sorted(int(f[len("epoch_"):-len(".json")]) for f in os.listdir(os.path.join(log_dir, "landscape")))


def test_views_logged_to_tensorboard_and_json_at_scheduled_epochs(tmp_path, monkeypatch):
    solves = []
    real = _landscape.hessian_eigenvalues
    monkeypatch.setattr(_landscape, "hessian_eigenvalues", lambda *a, **k: solves.append(1) or real(*a, **k))
    tb, cv = TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")
    cb = FlatnessCallback(measure_at_start=True, landscape=LandscapeOptions(every_n_epochs=2, **VIEWS), **SMALL)
    _, model = fit(tmp_path, cb, [tb, cv], max_epochs=3)
    expected = [0, 2, 3]  # initialization, epoch 2, the final weights
    # the rows' positions (issue 23, item 12): Lightning's step and epoch index of the same weights
    steps, epochs = [0, 15, 23], [-1, 1, 2]
    assert image_steps(tb.log_dir) == {tag: steps for tag in ("landscape/1d", "landscape/2d", "landscape/eigenvector")}
    assert json_epochs(tb.log_dir) == json_epochs(cv.log_dir) == epochs
    assert not solves  # the callback's own eigenvector: no extra Hessian-vector products
    with open(os.path.join(tb.log_dir, "landscape", "epoch_000002.json")) as f:
        raw = json.load(f)
    assert raw["format"] == "lightning-flatness/landscape"
    assert (raw["epoch"], raw["step"], raw["epochs_completed"]) == (2, 23, 3)
    views = views_from_json(raw)
    assert views.coordinates == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert len(views.loss_2d) == 3 and len(views.loss_2d[0]) == 3 and len(views.eig_train_loss) == 5
    assert views.n_forward == 5 + 9 + 2 * 5
    # The 1-D slice is the functional one on the measurement subsample, with the callback's fixed seed.
    want = loss_landscape(model, cb._data["measure"], steps=5, seed=measurement_seed(0, 0, "landscape"))
    assert views.loss_1d == pytest.approx(want.losses.tolist(), rel=1e-6)
    assert views.accuracy_1d == pytest.approx(want.accuracy.tolist(), rel=1e-6)
    # At a = 0 the eigenvector slice is the gap's train / test loss; λ₁ is the logged one.
    last = cb.history[-1][1]
    assert views.eig_train_loss[2] == pytest.approx(last["gap/train_loss"], rel=1e-5)
    assert views.eig_val_loss[2] == pytest.approx(last["gap/test_loss"], rel=1e-5)
    assert views.eigenvalue == pytest.approx(last["flatness/hessian_top_eig"], rel=1e-6)
    assert [v.epoch for v in cb._landscape.views] == expected
    assert read_final(tb.log_dir).epoch == 3


@pytest.mark.parametrize(
    "every, landscape, epochs, expected",
    [(1, -1, 2, [2]), (0, -1, 2, [2]), (1, 0, 2, []), (1, 2, 3, [2, 3]), (2, 3, 4, [4])],
)
def test_schedule(tmp_path, every, landscape, epochs, expected):
    views = LandscapeOptions(every_n_epochs=landscape, steps=3)
    cb = FlatnessCallback(metrics=["hessian_top_eig"], every_n_epochs=every, landscape=views, **SMALL)
    fit(tmp_path, cb, max_epochs=epochs)
    assert [v.epoch for v in cb._landscape.views] == expected


def test_eigenvector_computed_when_the_eigenvalue_is_not_measured(tmp_path, monkeypatch):
    solves = []
    real = _landscape.hessian_eigenvalues
    monkeypatch.setattr(_landscape, "hessian_eigenvalues", lambda *a, **k: solves.append(1) or real(*a, **k))
    cb = FlatnessCallback(metrics=["fisher_trace"], landscape=LandscapeOptions(steps=3), **SMALL)
    fit(tmp_path, cb, max_epochs=1)
    assert len(solves) == 1 and cb._landscape.views[0].eigenvalue > 0


def test_failure_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(_landscape, "loss_landscape", broken)
    cb = FlatnessCallback(metrics=["fisher_trace"], landscape=LandscapeOptions(every_n_epochs=1, steps=3), **SMALL)
    with pytest.warns(UserWarning, match="loss-landscape views failed") as record:
        fit(tmp_path, cb, max_epochs=2)
    assert sum("loss-landscape" in str(w.message) for w in record) == 1
    assert [x for x, _ in cb.history] == [1, 2] and cb._landscape.views == []
    cb = FlatnessCallback(metrics=["fisher_trace"], landscape=LandscapeOptions(every_n_epochs=1), on_error="raise", **SMALL)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, cb, max_epochs=1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(every_n_epochs=-2), "every_n_epochs"),
        (dict(every_n_epochs=1.5), "every_n_epochs"),
        (dict(steps=1), "steps"),
        (dict(span=0.0), "span"),
        (dict(two_d="yes"), "two_d"),
        (dict(steps_2d=0), "steps_2d"),
        (dict(eig_span=float("inf")), "eig_span"),
    ],
)
def test_invalid_landscape_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LandscapeOptions(**kwargs)
    with pytest.raises(TypeError, match="landscape"):
        FlatnessCallback(landscape={"every_n_epochs": 1})


def test_wandb_offline_gets_images_at_epochs(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    wb, experiment, logged = offline_wandb(tmp_path, monkeypatch)
    views = LandscapeOptions(every_n_epochs=1, steps=3, two_d=True, steps_2d=2)
    cb = FlatnessCallback(metrics=["hessian_top_eig"], measure_at_start=True, landscape=views, **SMALL)
    try:
        fit(tmp_path, cb, wb, max_epochs=1)
    finally:
        experiment.finish()
    rows = [r for r in logged if "landscape/1d" in r]
    # at the rows' position: Lightning's epoch index and step (issue 23, item 12)
    assert [(r["epoch"], r["trainer/global_step"]) for r in rows] == [(-1, 0), (0, 7)]
    for row in rows:
        assert {"landscape/1d", "landscape/2d", "landscape/eigenvector"} <= set(row)
        assert all(isinstance(row[k], wandb.Image) for k in row if k.startswith("landscape/"))


def test_files_written_before_the_position_fields_read_their_epoch_as_epochs_completed():
    from lightning_flatness.landscape import LandscapeViews, views_to_json

    raw = views_to_json(LandscapeViews(epoch=3, coordinates=[0.0], loss_1d=[1.0]))
    old = {**{k: v for k, v in raw.items() if k != "epochs_completed"}, "version": 1, "epoch": 3}
    assert views_from_json(old).epoch == views_from_json(raw).epoch == 3
