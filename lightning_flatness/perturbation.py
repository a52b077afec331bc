"""PACGen perturbed optimization (Wang et al. 2018) as a Lightning callback."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from . import _subsample as sub
from ._preflight import check_strategy, head, probe_loss
from .functional import pacgen_perturbation_scale
from .functional._losses import check_loss_fn
from .functional.pacgen import NORMALIZATIONS
from .validation import check_choice, check_float, check_int

__all__ = ["PACGenPerturbation"]

DISTRIBUTIONS = ("gaussian", "uniform")


def _train_set_size(trainer: Trainer) -> int:
    """``n`` for ``normalization="sum"``: the size of the training DataLoader's dataset (all ranks)."""
    size = sub.dataset_size(sub.first_loader(trainer.train_dataloader))
    if size is None:
        raise ValueError("PACGenPerturbation(normalization='sum') cannot size the training set (no sized dataset); "
                         "pass num_train=<number of training samples>.")  # fmt: skip
    return size


class PACGenPerturbation(Callback):
    r"""Trains at randomly perturbed weights, with PACGen's per-coordinate noise scale.

    Wang, Keskar, Xiong & Socher (arXiv:1809.07402, "Identifying Generalization Properties in
    Neural Networks", AISTATS 2020) bound the generalization gap by the loss *under a
    perturbation* of the weights whose per-coordinate scale is
    :math:`\sigma_i = \min(N_i, 1/\sqrt{\max(H_{ii} + \rho N_i, \text{tiny})})`,
    :math:`N_i = \gamma|w_i| + \epsilon` (:func:`~lightning_flatness.functional.pacgen_perturbation_scale`):
    large along flat coordinates, small along sharp ones, and propose optimizing the perturbed
    loss :math:`E_u L(w + u)`. This callback takes its stochastic gradient:

    * ``on_train_batch_start`` (before the training step's forward): save the clean weights
      :math:`w` and set them to :math:`w + u`, :math:`u_i = \text{noise\_scale}\cdot\sigma_i\,\xi_i`
      with :math:`\xi_i \sim N(0, 1)` (``distribution="gaussian"``) or :math:`U[-\sqrt3, \sqrt3]`
      (``"uniform"``, the same variance; the paper's analysis uses a box posterior);
    * the training step's forward and backward run at :math:`w + u`;
    * ``on_before_optimizer_step`` (after the backward, before the optimizer): copy the clean
      :math:`w` back, bit for bit. The optimizer then updates exactly the unperturbed weights
      with :math:`\nabla L_b(w + u)`. (With gradient accumulation the weights are restored
      and re-perturbed with fresh noise at every accumulated batch; if no optimizer step
      happens, ``on_train_batch_end`` restores them.)

    :math:`\sigma` is (re-)estimated at the clean weights every ``every_n_steps`` optimizer
    steps, on a fixed small batch: ``batches`` if given, else the first ``num_samples`` samples
    of the first training batch seen. Cost per estimate: as
    :func:`~lightning_flatness.functional.pacgen_perturbation_scale`, ``num_probes`` (+ ``2 *
    rho_probes`` when ``rho`` is ``None``) Hessian-vector products on that batch; per step:
    drawing :math:`P` random numbers and two copies of the parameters. The perturbed
    parameters are those with ``requires_grad=True``.

    Randomness comes from the callback's own CPU generator (seeded by ``seed``, drawn on the CPU
    and moved to the device, so noise is the same on every device), never the global RNG; the
    generator, the step of the last estimate and :math:`\sigma` are saved in checkpoints.

    Not compatible with optimizers that evaluate their closure several times per step
    (:class:`~lightning_flatness.optim.EntropySGD`, ``torch.optim.LBFGS``): the weights are restored
    after the first evaluation; this is rejected at ``on_train_start``. Nor with strategies that
    shard the parameters or split the model (FSDP, DeepSpeed, ``ModelParallelStrategy``): only a
    single device and DDP are accepted, checked in ``setup`` (``ValueError``, see docs/faq.md).
    Before the first training step the loss is evaluated on two samples of the estimation batch
    (``batches`` at ``on_train_start``, else the first training batch's), so that a module
    without ``forward``, batches that are not ``(inputs, targets)`` for a built-in ``loss_fn``,
    or a ``loss_fn`` that is not per-sample fail there with one ``TypeError`` that says what to do.

    Args:
        noise_scale: multiplies :math:`\sigma` (0 disables the perturbation but keeps the bookkeeping).
        every_n_steps: optimizer steps between estimates of :math:`\sigma`.
        num_samples: samples of the first training batch used for the estimate (when ``batches`` is None).
        batches: explicit estimation batches (a list of batches ``loss_fn`` accepts).
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable ``loss_fn(model, batch) -> (B,)``.
        gamma, eps, rho, num_probes, rho_probes: as in :func:`~lightning_flatness.functional.pacgen`.
        normalization: ``"mean"`` (default): :math:`\sigma` from the mean loss's curvature, as
            above; ``"sum"``: from the summed training loss's, :math:`n(H_{ii} + \rho N_i)`, the
            bound's optimal width (``docs/metrics.md``), smaller by up to :math:`\sqrt n`.
        num_train: ``n`` for ``"sum"``; None: the length of the training DataLoader's dataset.
        distribution: ``"gaussian"`` or ``"uniform"``.
        seed: seeds the callback's generator (noise and the estimator's probes).

    Example::

        trainer = L.Trainer(callbacks=[PACGenPerturbation(noise_scale=0.5), FlatnessCallback()])
    """

    def __init__(
        self,
        noise_scale: float = 1.0,
        every_n_steps: int = 100,
        num_samples: int = 64,
        batches: Union[Sequence[Any], None] = None,
        loss_fn: Union[str, Callable] = "cross_entropy",
        gamma: float = 0.1,
        eps: float = 0.1,
        rho: Union[float, None] = None,
        num_probes: int = 16,
        rho_probes: int = 3,
        distribution: str = "gaussian",
        seed: int = 0,
        normalization: str = "mean",
        num_train: Union[int, None] = None,
    ) -> None:
        super().__init__()
        self.noise_scale = check_float("noise_scale", noise_scale)
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        self.num_samples = check_int("num_samples", num_samples)
        if batches is not None and (isinstance(batches, (str, bytes)) or iter(batches) is batches or len(batches) == 0):
            raise ValueError("batches must be None or a non-empty list of batches.")
        self.batches = list(batches) if batches is not None else None
        self.loss_fn = check_loss_fn(loss_fn)
        self.gamma = check_float("gamma", gamma)
        self.eps = check_float("eps", eps, inclusive=False)
        self.rho = None if rho is None else check_float("rho", rho)
        self.num_probes = check_int("num_probes", num_probes)
        self.rho_probes = check_int("rho_probes", rho_probes)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self.seed = check_int("seed", seed, 0)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.num_train = None if num_train is None else check_int("num_train", num_train)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.sigma: Tensor | None = None  # flat (P,), float64, on the parameters' device
        self.estimated_at: int | None = None  # global step of the last estimate
        self._clean: list[Tensor] | None = None
        self._params: list[Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(seed=self.seed)

    # ----------------------------------------------------------------- helpers
    def _trainable(self, pl_module: LightningModule) -> list[Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def _estimate(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        if self.batches is None:
            self.batches = [head(batch, self.num_samples)]
            probe_loss(pl_module, self.batches[0], self.loss_fn, type(self).__name__)
        params = self._trainable(pl_module)
        num_train = self.num_train
        if self.normalization == "sum" and num_train is None:
            num_train = _train_set_size(trainer)
        self.sigma = pacgen_perturbation_scale(
            pl_module, self.batches, self.loss_fn, gamma=self.gamma, eps=self.eps, rho=self.rho,
            num_probes=self.num_probes, rho_probes=self.rho_probes, generator=self.generator, params=params,
            normalization=self.normalization, num_train=num_train,
        )  # fmt: skip
        self.estimated_at = trainer.global_step

    def _draw(self, num: int) -> Tensor:
        if self.distribution == "gaussian":
            return torch.randn(num, generator=self.generator, dtype=torch.float64)
        return (torch.rand(num, generator=self.generator, dtype=torch.float64) * 2 - 1) * 3**0.5

    @torch.no_grad()
    def perturb(self, params: list[Tensor]) -> None:
        """Save ``params`` and add the noise ``u`` (no-op bookkeeping when ``noise_scale`` is 0)."""
        assert self.sigma is not None
        total = sum(p.numel() for p in params)
        if self.sigma.numel() != total:
            raise RuntimeError(
                f"PACGenPerturbation: the trainable parameters changed ({total} now, {self.sigma.numel()} when sigma "
                "was estimated); re-create the callback or lower every_n_steps."
            )
        self._params = params
        self._clean = [p.detach().clone() for p in params]
        if self.noise_scale == 0:
            return
        device = params[0].device
        if self.sigma.device != device:  # e.g. restored from a checkpoint on the CPU
            self.sigma = self.sigma.to(device)
        u = self._draw(total).to(device) * self.sigma * self.noise_scale
        offset = 0
        for p in params:
            n = p.numel()
            p.add_(u[offset : offset + n].view_as(p).to(p.dtype))
            offset += n

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved clean weights back (exact); no-op when nothing is perturbed."""
        if self._clean is None or self._params is None:
            return
        for p, clean in zip(self._params, self._clean):
            p.copy_(clean)
        self._clean = self._params = None

    @property
    def perturbed(self) -> bool:
        return self._clean is not None

    # ------------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer, type(self).__name__)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from .optim import EntropySGD

        for opt in trainer.optimizers:
            inner = getattr(opt, "optimizer", opt)
            if isinstance(inner, (EntropySGD, torch.optim.LBFGS)):
                raise ValueError(
                    f"PACGenPerturbation cannot be combined with {type(inner).__name__}, which evaluates its closure "
                    "several times per step: the weights are restored after the first evaluation."
                )
        if self.batches is not None:  # else the first training batch's head, probed in _estimate
            probe_loss(pl_module, self.batches[0], self.loss_fn, type(self).__name__)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.restore()  # gradient accumulation: the previous micro-batch's perturbation
        if self.sigma is None or self.estimated_at is None or trainer.global_step - self.estimated_at >= self.every_n_steps:
            self._estimate(trainer, pl_module, batch)
        self.perturb(self._trainable(pl_module))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.restore()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.restore()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore()  # e.g. a LightningModule.on_train_batch_start that returned -1

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.restore()

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "estimated_at": self.estimated_at,
            "sigma": None if self.sigma is None else self.sigma.detach().cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.estimated_at = state_dict["estimated_at"]
        self.sigma = state_dict["sigma"]
