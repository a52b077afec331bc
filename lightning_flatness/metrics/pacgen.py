"""PACGen, the PAC-Bayes flatness measure of Wang et al. (2018)."""

from __future__ import annotations

from .. import keys
from .._failures import ConfigurationError
from ..functional import pacgen
from ..functional._losses import LossArg
from ..functional.pacgen import ERROR_RATIO, NORMALIZATIONS
from ..validation import check_bool, check_choice, check_float, check_int
from .base import FlatnessMetric, MeasurementContext


class PACGen(FlatnessMetric):
    """``flatness/pacgen``: PACGen Ψ (:func:`~lightning_flatness.functional.pacgen`), with its
    standard error ``flatness/pacgen_se`` and ``flatness/pacgen_curved_fraction``, the fraction of
    coordinates whose curvature factor is above its floor (0: Ψ measures only the weights' magnitudes).

    Args:
        normalization: ``"sum"`` (default): ``H_ii`` and ``ρ`` of the summed training loss
            ``n·L``, as the PAC-Bayes bound behind Ψ takes them (``docs/metrics.md``); ``"mean"``:
            of the mean loss, Ψ as the paper prints it.
        num_train: ``n`` for ``"sum"``; ``None``: the size of the trainer's training set.
        gamma, eps: the perturbation box ``N_i = gamma·|w_i| + eps``.
        rho: the Hessian-Lipschitz constant; ``None`` estimates it (``2 * rho_probes`` HVPs).
        num_probes: Hutchinson probes of the Hessian's diagonal; ``None`` (default): the diagonal
            to first order from ``rho``'s own products when that is accurate (no product of its
            own; on large models the rule), else probes in blocks of 4 until their part of Ψ's
            error is ``error_ratio`` of ``rho``'s, at most 16 (``docs/metrics.md``).
        rho_probes: finite-difference draws of the ``rho`` estimate.
        error_ratio: with ``num_probes=None``, the fraction of Ψ's standard error the first-order
            remainder may reach, and of ``rho``'s part the diagonal's probes stop at (default 0.1).
        screen: use ``hessian_max`` from :class:`~lightning_flatness.metrics.HessianEigenvalues`
            (when it runs in the same measurement and converged) as a bound on every ``H_ii``:
            where it shows ``H_ii`` cannot move Ψ off its floor, the diagonal is not needed.
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.
    """

    name = "pacgen"
    uses = ("hessian_max",)

    def __init__(
        self, normalization: str = "sum", num_train: int | None = None, gamma: float = 0.1, eps: float = 0.1,
        rho: float | None = None, num_probes: int | None = None, rho_probes: int = 3, screen: bool = True,
        error_ratio: float = ERROR_RATIO, every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.num_train = None if num_train is None else check_int("num_train", num_train)
        self.gamma = check_float("gamma", gamma)
        self.eps = check_float("eps", eps, inclusive=False)
        self.rho = None if rho is None else check_float("rho", rho)
        self.num_probes = None if num_probes is None else check_int("num_probes (probes, or None)", num_probes)
        self.rho_probes = check_int("rho_probes", rho_probes)
        self.screen = check_bool("screen", screen)
        self.error_ratio = check_float("error_ratio", error_ratio, inclusive=False)
        self.keys = (keys.PACGEN, keys.se(keys.PACGEN), keys.PACGEN_CURVED_FRACTION)

    def check_setup(self, loss_fn: LossArg, train_size: int | None) -> None:
        self._num_train(train_size)  # an iterable training set: ask for n now, not at every measurement

    def _num_train(self, train_size: int | None) -> int | None:
        num_train = self.num_train or train_size
        if self.normalization == "sum" and num_train is None:
            raise ConfigurationError(
                'PACGen(normalization="sum") needs the number of training samples n: the training set has no length '
                'here (an iterable dataset); pass PACGen(num_train=...), or normalization="mean".'
            )
        return num_train

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        num_train = self._num_train(ctx.train_size)
        pac = pacgen(
            ctx.model, ctx.batches, ctx.loss_fn, normalization=self.normalization, num_train=num_train,
            gamma=self.gamma, eps=self.eps, rho=self.rho, num_probes=self.num_probes, rho_probes=self.rho_probes,
            generator=ctx.seed_for(self.name), hessian_max=ctx.shared.hessian_max if self.screen else None,
            dtype=ctx.dtype, error_ratio=self.error_ratio,
        )  # fmt: skip
        return {keys.PACGEN: pac.value, keys.se(keys.PACGEN): pac.se, keys.PACGEN_CURVED_FRACTION: pac.curved_fraction}
