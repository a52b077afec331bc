"""Section 8: robustness to adversaries (``AdversarialRobustness``) in gradient-equivalents, and the cost
of a training step on adversarial examples (the study's ``--adversarial-training``).

The metric runs as the callback runs it (``FlatnessMetric.compute`` on a ``MeasurementContext`` whose
``held_out`` is the gap's validation subsample), FGSM alone and FGSM with PGD-10, each divided by one
plain parameter gradient of the same subsample; the training steps are timed against a plain SGD step
on the same batch. Workloads with float inputs only: attacks perturb inputs, not token ids.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lightning_flatness.functional import adversarial_examples, measurement_mode
from lightning_flatness.metrics import AdversarialRobustness, MeasurementContext

from ._common import Config, Row, Section, fmt_ratio, fmt_time, interleaved, median_ratio, middle, model_label, plain_gradient
from .models import issue_cnn_workload, readme_workload, train_briefly

PASSES = {"fgsm": "1 + 1 fwd", "pgd": "11 + 2 fwd"}  # input-gradient passes + forward passes, per sample


def _metric(attacks: tuple[str, ...], ctx: MeasurementContext) -> Callable[[], None]:
    metric = AdversarialRobustness(attacks=attacks, epsilon=0.1, steps=10)

    def run() -> None:
        with measurement_mode(ctx.model):
            metric.compute(ctx)

    return run


def _step(model: torch.nn.Module, batch: tuple, attack: str | None) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: timed steps leave the weights as they are

    def step() -> None:
        x, y = batch
        if attack is not None:
            x = adversarial_examples(model, (x, y), attack=attack, epsilon=0.1, steps=10)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def run(cfg: Config) -> Section:
    n, chunk, batch_size = (256, 128, 32) if cfg.quick else (2048, 256, 64)
    rounds = 2 if cfg.quick else 3
    section = Section(
        "robust",
        f"8. AdversarialRobustness on a {n}-sample held-out subsample, and adversarial training steps (batch {batch_size})",
        ["model", "gradient (subsample)", "FGSM", "FGSM + PGD-10", "passes: FGSM / PGD", "train step: plain",
         "FGSM step / plain", "PGD-10 step / plain"],
    )  # fmt: skip
    for work in (readme_workload(cfg.device, cfg.seed), issue_cnn_workload(cfg.device, cfg.seed)):
        train_briefly(work, 3, cfg.device, cfg.seed)
        model = work.model.eval()
        held_out = work.batches(n, chunk, cfg.seed + 11, cfg.device)
        ctx = MeasurementContext(model, held_out[:1], "cross_entropy", 1, cfg.seed, chunk, held_out=held_out)
        times = interleaved({"grad": plain_gradient(model, held_out), "fgsm": _metric(("fgsm",), ctx),
                             "pgd": _metric(("fgsm", "pgd"), ctx)}, rounds, cfg.device)  # fmt: skip
        batch = work.batches(batch_size, batch_size, cfg.seed + 12, cfg.device)[0]
        model.train()
        steps = interleaved({"plain": _step(model, batch, None), "fgsm": _step(model, batch, "fgsm"),
                             "pgd": _step(model, batch, "pgd")}, rounds, cfg.device)  # fmt: skip
        section.rows.append(Row({
            "model": model_label(work.label, work.num_params), "gradient (subsample)": fmt_time(middle(times["grad"])),
            "FGSM": fmt_ratio(median_ratio(times["fgsm"], times["grad"]), 1),
            "FGSM + PGD-10": fmt_ratio(median_ratio(times["pgd"], times["grad"]), 1),
            "passes: FGSM / PGD": f"{PASSES['fgsm']} / {PASSES['pgd']}", "train step: plain": fmt_time(middle(steps["plain"])),
            "FGSM step / plain": fmt_ratio(median_ratio(steps["fgsm"], steps["plain"]), 1),
            "PGD-10 step / plain": fmt_ratio(median_ratio(steps["pgd"], steps["plain"]), 1),
        }))  # fmt: skip
    section.notes.append(
        f"FGSM and FGSM + PGD-10 = `AdversarialRobustness(attacks=..., epsilon=0.1, steps=10).compute` as the callback "
        f"runs it, on {n} held-out samples in chunks of {chunk} (eval mode) / one plain parameter gradient of the same "
        "chunks, the median over interleaved rounds of the ratio within a round. passes = per sample, input-gradient "
        "passes (forward and backward to the inputs) + forward-only passes: FGSM's gradient at the clean inputs and "
        "the loss at the attacked ones; PGD shares the clean pass and FGSM's point, then 10 steps and the last "
        "iterate's loss. The clean accuracy of `robust/*_drop` comes from the same clean pass. train step = one SGD "
        "step on the batch (lr 0), plain or on its FGSM / PGD-10 examples (`adversarial_examples`), as "
        "`lightning-flatness sweep --adversarial-training` takes them."
    )
    return section
