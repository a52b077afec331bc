"""The architecture study (issue 27, item 3; Li et al. 2018): ResNets with and without skip connections in
the sweep, their validation, and the report's architecture tables and figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_flatness import keys
from lightning_flatness.study import cli
from lightning_flatness.study.architectures import FIGURE, architecture_of, plot_architectures
from lightning_flatness.study.report import make_report
from lightning_flatness.study.resnet import Architecture, ResNet, parse_architecture
from lightning_flatness.study.runs import read_hparams, read_scalars
from lightning_flatness.study.sweep import SweepConfig
from lightning_flatness.study.tables import fmt
from lightning_flatness.study.training import Classifier
from tests.study.test_sweep import TINY

torch.set_num_threads(1)


def _twins(spec: str, in_features: int) -> tuple[ResNet, ResNet]:
    """The ResNet ``spec`` and its no-skip twin, built after the same seed."""
    arch = parse_architecture(spec)
    torch.manual_seed(0)
    res = ResNet(in_features, 10, arch)
    torch.manual_seed(0)
    return res, ResNet(in_features, 10, arch.twin)


@pytest.mark.parametrize(("in_features", "conv", "stride"), [(40, torch.nn.Conv1d, 1), (64, torch.nn.Conv2d, 1),
                                                              (784, torch.nn.Conv2d, 2)])  # fmt: skip
def test_resnets_take_flat_rows_and_differ_from_their_twins_only_by_the_shortcuts(in_features, conv, stride):
    res, plain = _twins("res2x8", in_features)
    assert isinstance(res.stem[0], conv) and res.stem[0].stride[0] == stride  # 1-D for mnist1d, 2-D for images
    # The same parameters, count and initial values (BatchNorm's statistics too): the identity shortcuts have none.
    assert [(n, p.shape) for n, p in res.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(res.state_dict().values(), plain.state_dict().values()))
    res.eval()  # a forward in training mode would move BatchNorm's running statistics
    plain.eval()
    assert res(torch.randn(3, in_features)).shape == (3, 10)
    x = torch.randn(5, in_features)
    assert not torch.allclose(res(x), plain(x))
    for block in plain.blocks:  # putting the shortcuts back makes the twin the ResNet
        block.skip = True
    assert torch.equal(res(x), plain(x))


def test_parameter_counts():
    res, plain = _twins("res2x8", 40)
    # stem conv 1*8*3 + BN 2*8; per block 2 convs 8*8*3 + 2 BNs 2*8; head 8*10 + 10
    expected = (24 + 16) + 2 * (2 * 192 + 2 * 16) + 90
    assert sum(p.numel() for p in res.parameters()) == sum(p.numel() for p in plain.parameters()) == expected == 962
    assert isinstance(Classifier(40, (8,), 10, 0.1, 16, architecture="plain3x4").net, ResNet)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in res.modules())


def test_architecture_specs_and_their_validation(capsys):
    assert parse_architecture("res8x16") == Architecture(8, 16, skip=True)
    assert parse_architecture("plain2x4").twin.name == "res2x4" and parse_architecture("res08x16").name == "res8x16"
    for bad in ("resnet", "res0x8", "res8x", "res8x16x2", "plain-2x4"):
        with pytest.raises(ValueError, match=f"architecture '{bad}' is not of the form"):
            parse_architecture(bad)
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--architectures", "res2x8", "resnet56"])
    err = capsys.readouterr().err
    assert "argument --architectures" in err and "'resnet56'" in err
    cases = {
        "architectures: architecture 'wide'": dict(architectures=("wide",)),
        "lists one twice": dict(architectures=("res2x8", "res02x8")),
        "data \\(with architectures\\)='cifar10'": dict(architectures=("res2x8",), data="cifar10"),
        "cannot be combined with lr_sweep": dict(architectures=("res2x8",), lr_sweep=True),
        "--no-landscape": dict(architectures=("res2x8",), convexity=True, landscape_every_n_epochs=0),
        "convexity_steps": dict(convexity=True, convexity_steps=1),
    }
    for message, kwargs in cases.items():
        with pytest.raises(ValueError, match=message):
            SweepConfig(**kwargs)
    config = SweepConfig(architectures=("res2x8",), metrics=("fisher_trace",))
    assert [getattr(m, "name", m) for m in config.metric_objects()] == ["fisher_trace", "hessian_top_eig",
                                                                          "hessian_min_eig"]  # always measured
    assert SweepConfig(architectures=("res2x8",)).metrics == ("hessian_top_eig", "hessian_min_eig")
    assert architecture_of("plain8x16_bs128_lr0.1") == (Architecture(8, 16, skip=False), "bs128_lr0.1")
    assert architecture_of("bs128_lr0.1") is None


def _final_mean(logdir, runs, key):
    """The mean over ``runs`` of each one's last logged ``key``."""
    finals = [read_scalars(logdir / run)[key] for run in runs]
    return float(np.mean([series[max(series)] for series in finals]))


@pytest.mark.filterwarnings("ignore:LandscapeOptions\\(convexity=True\\)")  # 4 products per run: some points unconverged
def test_two_architectures_two_seeds_end_to_end(tmp_path):
    args = ["sweep", *TINY, "--architectures", "res1x4", "plain1x4", "--architecture-batch-size", "32", "--seeds", "2",
            "--convexity", "--convexity-steps", "3", "--convexity-max-iter", "4", "--convexity-tol", "0.2",
            "--logdir", str(tmp_path), "--no-report"]  # fmt: skip
    assert cli.main(args) == 0
    runs = {a: [f"{a}_bs32_lr0.1_s{s}" for s in (0, 1)] for a in ("res1x4", "plain1x4")}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(runs["res1x4"] + runs["plain1x4"])
    assert read_hparams(tmp_path / runs["plain1x4"][1])["study/architecture"] == "plain1x4"
    report = make_report(tmp_path, tmp_path / "report", plots=False, echo=False, resamples=200)
    text = report.markdown
    section = text.split("Architectures (Li et al. 2018)")[1]
    row = next(line for line in section.splitlines() if line.startswith("| plain1x4_bs32_lr0.1 | no | 1 | 4 | 0/2 | 2 |"))
    for key in (keys.HESSIAN_TOP_EIG, keys.HESSIAN_MIN_EIG, keys.HESSIAN_EIG_RATIO, keys.LOSS_GAP, keys.TEST_ACC):
        assert f"| {fmt(_final_mean(tmp_path, runs['plain1x4'], key))} [" in row, key  # the logged finals' mean
    # Paired per seed: λ_max no skip / skip; the runs stopped at --max-epochs 2, far above the target.
    ratios = [read_scalars(tmp_path / p)[keys.HESSIAN_TOP_EIG][2] / read_scalars(tmp_path / r)[keys.HESSIAN_TOP_EIG][2]
              for p, r in zip(runs["plain1x4"], runs["res1x4"])]  # fmt: skip
    assert f"| plain1x4_bs32_lr0.1 | res1x4_bs32_lr0.1 | {fmt(float(np.mean(ratios)))} [" in section
    # From the final views: the slice's highest loss (a ratio) and the convexity map's mean (a difference), per seed
    assert "2-D slice max loss ratio | " in section and "map mean \\|λ_min/λ_max\\| difference |" in section
    assert "**Not at the target training loss**" in section and "res1x4_bs32_lr0.1_s1 (train loss" in section
    (figure,) = plot_architectures(report.configurations, tmp_path)
    assert figure.name == FIGURE and figure.stat().st_size > 0
    assert math.isfinite(report.configurations[0].values(keys.HESSIAN_EIG_RATIO)[0])
