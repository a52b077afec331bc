"""The study's adversarial part (issue 26, items 2 and 3): training on adversarial examples, the
robustness measured beside flatness, and the report's robustness tables and spectrum figure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_flatness.functional import adversarial_examples
from lightning_flatness.study import cli
from lightning_flatness.study.report import make_report
from lightning_flatness.study.robustness import plot_spectrum, training_of
from lightning_flatness.study.runs import read_scalars
from lightning_flatness.study.training import Classifier
from tests.study.test_sweep import TINY

torch.set_num_threads(1)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_an_adversarial_training_step_takes_its_loss_on_the_attacks_examples(attack):
    torch.manual_seed(0)
    model = Classifier(6, (8,), 3, 0.1, 16, adversarial=attack, epsilon=0.3, attack_steps=3, attack_seed=5)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss = model.training_step((x, y), 0)
    moved = adversarial_examples(model, (x, y), attack=attack, epsilon=0.3, steps=3, generator=5)
    assert loss.item() == pytest.approx(F.cross_entropy(model(moved), y).item(), rel=1e-6)
    assert loss.item() > F.cross_entropy(model(x), y).item()  # the attack raised it
    with pytest.raises(ValueError, match="adversarial must be one of"):
        Classifier(6, (8,), 3, 0.1, 16, adversarial="cw")


def test_sweep_with_adversarial_training_and_the_spectrum_then_report(tmp_path):
    args = ["sweep", *TINY, "--max-epochs", "1", "--metrics", "hessian_top_eig", "--seeds", "2", "--no-landscape",
            "--adversarial-training", "pgd", "--epsilon", "0.5", "--attack-steps", "2", "--spectrum-k", "5",
            "--logdir", str(tmp_path), "--no-report"]  # fmt: skip
    assert cli.main(args) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"bs{b}_lr0.1{a}_s{s}" for b in (16, 48) for a in ("", "_adv-pgd0.5") for s in (0, 1))
    logged = read_scalars(tmp_path / "bs48_lr0.1_adv-pgd0.5_s1")
    # robustness added to the metrics, at every measurement; the spectrum at the final weights only
    assert len(logged["robust/pgd_acc"]) == len(logged["flatness/hessian_top_eig"]) == 2
    assert list(logged["flatness/hessian_eig_5"]) == [1] and "flatness/hessian_eig_5_se" in logged
    report = make_report(tmp_path, tmp_path / "report", plots=False, echo=False, resamples=200)
    assert "flatness/hessian_eig_2" not in report.keys  # a long spectrum is a figure, not rows
    (figure,) = plot_spectrum(report.configurations, tmp_path)
    assert figure.name == "hessian_spectrum.png" and figure.stat().st_size > 0
    text = report.markdown
    assert "Robustness to adversaries" in text and "| adv-pgd0.5 | `robust/pgd_acc` |" in text
    # the table's mean over seeds is that of the logged final values
    config = next(c for c in report.configurations if c.name == "bs16_lr0.1_adv-pgd0.5")
    finals = [read_scalars(tmp_path / f"bs16_lr0.1_adv-pgd0.5_s{s}")["robust/pgd_acc"] for s in (0, 1)]
    mean = sum(series[max(series)] for series in finals) / 2
    assert "| bs16_lr0.1_adv-pgd0.5 | adv-pgd0.5 | 16 |" in text
    assert math.isclose(float(config.values("robust/pgd_acc").mean()), mean, rel_tol=1e-6)
    assert "| bs16_lr0.1 | " in text.split("normal vs adversarial training")[1]


def test_a_spectrum_without_the_eigenvalue_metric_is_refused():
    """Regression: --spectrum-k 20 with --metrics lacking hessian_top_eig trained every run and logged no spectrum,
    without a word (metric_objects only sets final_k on a HessianEigenvalues it finds)."""
    from lightning_flatness.study.sweep import SweepConfig

    with pytest.raises(ValueError, match=r"spectrum_k=20 \(--spectrum-k\).*hessian_top_eig"):
        SweepConfig(metrics=("fisher_trace",), spectrum_k=20)
    assert SweepConfig(metrics=("fisher_trace",)).metric_objects() == ["fisher_trace"]


def test_configuration_names_tell_the_training():
    assert training_of("bs64_lr0.1_adv-fgsm0.1") == ("bs64_lr0.1", "adv-fgsm0.1")
    assert training_of("bs64_lr0.1_esgd_adv-pgd1e-05") == ("bs64_lr0.1_esgd", "adv-pgd1e-05")
    assert training_of("bs64_lr0.1") == ("bs64_lr0.1", "normal")
