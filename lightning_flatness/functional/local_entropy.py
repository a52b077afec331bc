r"""Local entropy (Chaudhari et al., Entropy-SGD, ICLR 2017) by SGLD and thermodynamic integration.

**Gibbs measure.** With temperature :math:`T = \text{noise}^2/2` and coupling :math:`s`,

.. math::
    p_s(w') \propto \exp\!\Big(-\frac{L(w') + \tfrac s2\|w - w'\|^2}{T}\Big),\qquad
    Z(w; s) = \int \exp\!\Big(-\frac{L(w') + \tfrac s2\|w - w'\|^2}{T}\Big)\,dw'.

Chaudhari et al.'s local entropy is :math:`\log Z(w;\gamma)` (their :math:`T = 1`). Its
gradient is :math:`\nabla_w \log Z = -\gamma(w - \langle w'\rangle_\gamma)/T`, so
``grad`` :math:`= \gamma(w - \mu) = \nabla_w[-T\log Z]` is the gradient of the local free
energy, the step direction of Entropy-SGD (Algorithm 1).

**SGLD (Algorithm 1's inner loop).** :math:`w'_0 = w`, and for :math:`\ell = 1..L`
(``num_steps``), with :math:`\eta` = ``step_size`` and :math:`\xi_\ell \sim N(0, I)`,

.. math::
    w'_\ell = w'_{\ell-1} - \eta\big(\nabla L_{b_\ell}(w'_{\ell-1}) + s\,(w'_{\ell-1} - w)\big)
    + \sqrt\eta\;\text{noise}\;\zeta_\ell,

a discretization of the Langevin diffusion whose stationary law is :math:`p_s`. With
``integrator="euler"``, :math:`\zeta_\ell = \xi_\ell`: Algorithm 1 exactly (Euler–Maruyama),
whose stationary variance along a direction of curvature :math:`h` is
:math:`T/((h+s)(1 - \eta(h+s)/2))`, a relative bias :math:`\eta(h+s)/2`. With
``integrator="lm"`` (default), :math:`\zeta_\ell = (\xi_\ell + \xi_{\ell+1})/2`
(Leimkuhler & Matthews 2013): the same drift, noise of the same scale and the same cost,
but the stationary law is exact for quadratic :math:`L` (for any stable :math:`\eta`) and
accurate to :math:`O(\eta^2)` otherwise. :math:`\nabla L_b` is the gradient of one element of
``batches`` per step, cycling through them in order, scaled by :math:`M n_b/N` (:math:`M`
batches, :math:`n_b` samples in batch :math:`b`, :math:`N` in all) so that one cycle averages
to :math:`\nabla L` exactly; a single batch gives the exact gradient. The anchor ``mean``
comes from the chain at :math:`s = \gamma`: with ``alpha`` a float, Algorithm 1's exponential
average :math:`\mu \leftarrow (1-\alpha)\mu + \alpha w'_\ell` from :math:`\mu = w` over all
steps; with ``alpha=None`` (default) the uniform mean of the post-burn-in :math:`w'_\ell`,
the lower-variance estimate of :math:`\langle w'\rangle_\gamma`.

**Free energy** (``free_energy=True``). ``value`` is the *excess* local entropy, relative to
a perfectly flat loss equal to :math:`L(w)` everywhere:

.. math::
    F_{ex}(w;\gamma) = \log Z(w;\gamma) - \Big[-\frac{L(w)}{T} + \frac P2\log\frac{2\pi T}{\gamma}\Big].

For a quadratic :math:`L(w+x) = L(w) + g^\top x + \tfrac12 x^\top H x` it is exactly
:math:`-\tfrac12\sum_i\log(1 + h_i/\gamma) + g^\top(H+\gamma I)^{-1}g/(2T)`; at a minimum
(:math:`g = 0`) it is :math:`-\tfrac12\log\det(H+\gamma I) + \text{const}`, independent of
:math:`T`, :math:`\le 0`, and more negative the sharper the minimum (larger is flatter).
It is estimated by thermodynamic integration over the coupling, :math:`F_{ex}(\gamma) =
F_{ex}(\Gamma) - \int_\gamma^\Gamma \tfrac{dF_{ex}}{ds}\,ds`. The derivative is
:math:`\tfrac{dF_{ex}}{ds} = \tfrac P{2s} - \tfrac{E_s\|w'-w\|^2}{2T}`, which by Stein's
identity (integration by parts, :math:`E_s[x\cdot\nabla U] = PT` for :math:`x = w'-w` and
:math:`U = L(w+x) + \tfrac s2\|x\|^2`) equals :math:`E_s[x\cdot\nabla L(w+x)]/(2Ts)`; this
*virial* form is what is averaged, using the gradient the step computes anyway: flat
directions contribute exactly 0 to it, where the first form carries variance
:math:`\propto P` from the isotropic noise. The couplings :math:`\gamma = s_0 < \dots <
s_{K-1} = \Gamma` (``num_rungs`` = K, ``gamma_max`` = :math:`\Gamma`, default
:math:`100\gamma`) are geometric; each rung is a chain of ``num_steps`` steps warm-started
from the previous rung's last state, with step :math:`\eta_0 = \eta` and :math:`\eta_k =
\min(\eta, c/s_k)` above (:math:`c` = 0.5 for ``"lm"``, 0.1 for ``"euler"``) so the tight
upper rungs stay stable and mix in a few steps; the first ``burn_in`` fraction of each chain is discarded. The integral of
:math:`f(u) = s\,dF_{ex}/ds` over :math:`u = \log s` is composite Simpson (``num_rungs``
odd). Tail: for smooth :math:`L`, :math:`f = c_1/s + c_2/s^2 + O(s^{-3})` (:math:`c_1 =
\tfrac12\operatorname{tr}H - \|g\|^2/(2T)`), so :math:`F_{ex}(\Gamma) = -\int_{\log\Gamma}^\infty
f\,du \approx -(c_1/\Gamma + c_2/(2\Gamma^2))`, with :math:`c_1, c_2` fitted to the two top
rungs (``tail``).

**Error.** ``stderr`` is the Monte-Carlo error: per rung, :math:`\sqrt{\mathrm{var}\,\tau/n}`
over the :math:`n` post-burn-in samples, :math:`\tau` the integrated autocorrelation time
(Geyer's initial monotone sequence estimator; about :math:`1/(2\eta_k(h + s_k))` steps along
curvature :math:`h`, so ``num_steps`` should be a few hundred times that; shorter chains
make the error estimate itself low by tens of percent),
combined over rungs as independent. ``quadrature_error`` bounds the deterministic quadrature error in
practice (it compares Simpson with the trapezoid rule, and the two-point tail with the
one-point :math:`-f(\Gamma)`); it is small when :math:`\Gamma` exceeds the top Hessian
eigenvalue about tenfold (pass ``gamma_max``) and the ladder is fine enough. Not included,
and to be kept small by the settings: (1) the discretization bias, zero on quadratics with
``"lm"``, relative :math:`\eta(h+s)/2` per curved direction with ``"euler"``; (2) mini-batch
gradient noise, which heats the chain by a relative :math:`\eta\,\mathrm{Var}(\nabla
L_b)/(2T)`; (3) incomplete equilibration when ``num_steps`` is short compared with
:math:`1/(\eta\gamma)` (the slowest, flattest directions at :math:`s = \gamma`).

**Cost.** ``n_grad`` mini-batch gradients (one forward and one backward pass of one element
of ``batches`` each): ``num_steps`` without the free energy, ``num_rungs * num_steps`` with
it; plus one forward pass over ``batches`` (:math:`L(w)` and :math:`N`). Memory: a few flat
vectors. The model is never written to (parameters are substituted functionally) and the
global RNG is not used: the noise comes from ``generator``, a CPU generator (a fixed seed by
default), drawn on the CPU in the compute dtype, so results are reproducible and the same on
every device up to floating-point differences. Under a cross-process reduction (the callback
under DDP) each process steps its own batches and the gradients are summed, so all
processes run the same chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..validation import check_choice, check_float, check_generator, check_int
from ._losses import LossArg
from ._restore import measurement_mode
from ._stats import renamed_field
from .objective import Objective

INTEGRATORS = ("lm", "euler")
# Upper rungs step with min(step_size, c / s): the coupling term alone then mixes in a few steps
# and stays stable; c is smaller for Euler, whose stationary variance is biased by ~ eta * s / 2.
COUPLING_STEP = {"lm": 0.5, "euler": 0.1}


@dataclass(frozen=True)
class LocalEntropyResult:
    r"""SGLD estimates around ``w`` at coupling ``gamma``; see :func:`local_entropy`.

    ``mean``: the anchor :math:`\mu \approx \langle w'\rangle_\gamma` (flat ``(P,)``).
    ``grad``: :math:`\gamma(w - \mu)`, the descent direction of Entropy-SGD.
    ``value``: the excess local entropy :math:`F_{ex}(w;\gamma)` (nats; ``nan`` when
    ``free_energy=False``), ``se`` its Monte-Carlo standard error.
    ``loss``: :math:`L(w)`. ``temperature``: :math:`T = \text{noise}^2/2`.
    ``gammas``, ``derivatives``, ``derivatives_se``: the coupling ladder :math:`s_k`, the
    estimates of :math:`dF_{ex}/ds` there and their standard errors (float64). ``tail``: the
    tail term :math:`F_{ex}(\Gamma)`
    included in ``value``. ``quadrature_error``: an (over-)estimate of the deterministic
    quadrature error, \|Simpson − trapezoid\| + \|two-point − one-point tail\|.
    ``n_grad``: mini-batch gradient evaluations (each one forward and one backward pass of one
    element of ``batches``). ``stderr`` and ``derivative_stderrs``: deprecated names of ``se`` and
    ``derivatives_se``.
    """

    mean: Tensor
    grad: Tensor
    value: float
    se: float
    loss: float
    temperature: float
    gammas: Tensor
    derivatives: Tensor
    derivatives_se: Tensor
    tail: float
    quadrature_error: float
    n_grad: int

    stderr = renamed_field("se", "stderr")
    derivative_stderrs = renamed_field("derivatives_se", "derivative_stderrs")


def _chain_stats(samples: Tensor) -> tuple[float, float]:
    """Mean of a chain of samples and its standard error ``sqrt(var * tau / n)``.

    ``tau`` is the integrated autocorrelation time by Geyer's initial monotone sequence
    estimator: the FFT autocorrelation summed in adjacent-lag pairs up to the first
    non-positive pair, the pair sums made non-increasing (Geyer 1992, "Practical Markov chain
    Monte Carlo"). Like every such estimate it runs somewhat low on short chains (about 20%
    with ~20 autocorrelation times of samples).
    """
    x = samples.to(torch.float64)
    n = x.numel()
    mean = x.mean().item()
    if n < 2:
        return mean, float("nan")
    centered = x - x.mean()
    var = centered.pow(2).mean().item()
    if var == 0:
        return mean, 0.0
    spectrum = torch.fft.rfft(centered, n=2 * n)
    acf = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * n)[: n - n % 2]
    pairs = (acf / acf[0]).view(-1, 2).sum(1)
    stop = (pairs <= 0).nonzero()
    pairs = pairs[: stop[0, 0].item() if len(stop) else len(pairs)]
    tau = 2 * torch.cummin(pairs, 0).values.sum().item() - 1 if len(pairs) else 1.0
    return mean, math.sqrt(var * max(tau, 1.0) / n)


def local_entropy(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    *,
    gamma: float,
    num_steps: int,
    step_size: float,
    noise: float,
    alpha: float | None = None,
    free_energy: bool = True,
    num_rungs: int = 9,
    gamma_max: float | None = None,
    burn_in: float = 0.25,
    integrator: str = "lm",
    generator: torch.Generator | int | None = None,
    params: Iterable[Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> LocalEntropyResult:
    r"""The Entropy-SGD anchor :math:`\langle w'\rangle` and the local entropy of ``L`` around ``w``.

    The Gibbs measure, the SGLD chain (Algorithm 1's inner loop), the free energy by
    thermodynamic integration, its error and its cost are derived in this module's docstring
    (:mod:`lightning_flatness.functional.local_entropy`) and in ``docs/flatness_training.md``.
    ``n_grad`` = ``num_steps`` mini-batch gradients without the free energy, ``num_rungs *
    num_steps`` with it.

    Args:
        gamma: the coupling :math:`\gamma > 0` (Entropy-SGD's scope).
        num_steps: SGLD steps :math:`L` (per rung).
        step_size: SGLD step :math:`\eta` (Entropy-SGD's :math:`\eta'`); ``step_size * gamma``
            must be < 1, and ``step_size * (gamma + top eigenvalue)`` < 2 for stability.
        noise: the noise scale :math:`\epsilon` of the SGLD step (``> 0`` for the free energy).
        alpha: Algorithm 1's averaging weight in ``(0, 1]``, or ``None`` for the uniform mean.
        free_energy: also estimate ``value`` (``num_rungs`` chains instead of one).
        num_rungs, gamma_max, burn_in: the thermodynamic-integration ladder (see above).
        integrator: ``"lm"`` or ``"euler"`` (see above).

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import local_entropy
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
        >>> r = local_entropy(model, batches, gamma=1.0, num_steps=50, step_size=0.05, noise=0.5, num_rungs=3)
        >>> r.mean.shape, r.grad.shape, r.n_grad, r.se > 0
        (torch.Size([8]), torch.Size([8]), 150, True)

    References:
        Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun, Zecchina,
        "Entropy-SGD: Biasing Gradient Descent into Wide Valleys", ICLR 2017 (Algorithm 1).
        Welling & Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics", ICML 2011.
        Leimkuhler & Matthews, "Rational Construction of Stochastic Numerical Methods for Molecular
        Sampling", Appl. Math. Res. Express 2013.
        Frenkel & Smit, "Understanding Molecular Simulation", ch. 7 (thermodynamic integration).
    """
    cfg = _Settings.checked(gamma, num_steps, step_size, noise, alpha, free_energy, num_rungs, gamma_max, burn_in, integrator)
    gen = check_generator(generator)
    with measurement_mode(model):
        objective = Objective(model, batches, loss_fn, params, dtype)
        loss, scale = _loss_and_gradient_scale(objective)
        chain = _Chain(objective, cfg, scale, gen)
        derivatives, stderrs = [], []
        for rung, s in enumerate(cfg.gammas.tolist()):
            virial = chain.run(rung, s)
            if virial is not None:
                # s * dF/ds = E[x . grad L] / (2T): the integrand in log s.
                m, se = _chain_stats(virial[cfg.keep_from :] / (2 * cfg.temperature))
                derivatives.append(m / s)
                stderrs.append(se / s)
    w, mean = objective.w0, chain.mean
    grad = cfg.gamma * (w - mean)
    if not cfg.free_energy:
        nan = float("nan")
        empty = torch.empty(0, dtype=torch.float64)
        return LocalEntropyResult(mean, grad, nan, nan, loss, cfg.temperature, cfg.gammas, empty, empty, nan, nan, chain.n_grad)
    d = torch.tensor(derivatives, dtype=torch.float64)
    se = torch.tensor(stderrs, dtype=torch.float64)
    value, stderr, tail, quadrature_error = _integrate(cfg.gammas, d, se)
    return LocalEntropyResult(
        mean, grad, value, stderr, loss, cfg.temperature, cfg.gammas, d, se, tail, quadrature_error, chain.n_grad
    )


@dataclass(frozen=True)
class _Settings:
    """The validated options of :func:`local_entropy`."""

    gamma: float
    num_steps: int
    step_size: float
    noise: float
    alpha: float | None
    free_energy: bool
    gammas: Tensor  # the coupling ladder s_0 = gamma < ... < s_{K-1} (just gamma without the free energy)
    integrator: str
    keep_from: int  # the first post-burn-in step

    @property
    def temperature(self) -> float:
        return self.noise**2 / 2

    @classmethod
    def checked(
        cls, gamma: float, num_steps: int, step_size: float, noise: float, alpha: float | None, free_energy: bool,
        num_rungs: int, gamma_max: float | None, burn_in: float, integrator: str,
    ) -> _Settings:  # fmt: skip
        gamma = check_float("gamma", gamma, inclusive=False)
        num_steps = check_int("num_steps", num_steps)
        step_size = check_float("step_size", step_size, inclusive=False)
        noise = check_float("noise", noise)
        if step_size * gamma >= 1:
            raise ValueError(
                f"step_size * gamma must be < 1 for a stable, accurate SGLD chain, got step_size={step_size!r} and "
                f"gamma={gamma!r}; use a smaller step_size."
            )
        if alpha is not None:
            alpha = check_float("alpha", alpha, inclusive=False, maximum=1.0)
        burn_in = check_float("burn_in", burn_in)
        if burn_in >= 1:
            raise ValueError(f"burn_in must be a fraction in [0, 1), got {burn_in!r}.")
        integrator = check_choice("integrator", integrator, INTEGRATORS)
        gammas = torch.tensor([gamma], dtype=torch.float64)
        if free_energy:
            if noise == 0:
                raise ValueError("noise must be > 0 for the free energy (T = noise**2 / 2); or pass free_energy=False.")
            gammas = _coupling_ladder(gamma, num_rungs, gamma_max)
        keep_from = int(burn_in * num_steps)
        if free_energy and num_steps - keep_from < 2:
            raise ValueError(f"num_steps={num_steps} leaves fewer than 2 samples after burn_in={burn_in}.")
        return cls(gamma, num_steps, step_size, noise, alpha, free_energy, gammas, integrator, keep_from)


def _coupling_ladder(gamma: float, num_rungs: int, gamma_max: float | None) -> Tensor:
    """``num_rungs`` geometric couplings from ``gamma`` to ``gamma_max`` (default ``100 * gamma``)."""
    num_rungs = check_int("num_rungs", num_rungs)
    if num_rungs < 3 or num_rungs % 2 == 0:
        raise ValueError(f"num_rungs must be odd and >= 3 (Simpson's rule over gamma..gamma_max), got {num_rungs!r}.")
    top = 100 * gamma if gamma_max is None else check_float("gamma_max", gamma_max, inclusive=False)
    if not top > gamma:
        raise ValueError(f"gamma_max must be > gamma, got gamma_max={gamma_max!r} and gamma={gamma!r}.")
    gammas = torch.logspace(math.log10(gamma), math.log10(top), num_rungs, dtype=torch.float64)
    gammas[0], gammas[-1] = gamma, top
    return gammas


def _cycle(objective: Objective) -> Iterator[Any]:
    while True:
        yield from objective.iter_batches()


def _loss_and_gradient_scale(objective: Objective) -> tuple[float, float]:
    """``L(w)`` and the factor that makes one process-summed batch gradient average to ``∇L`` over a cycle.

    Per step: (sum over processes of one batch's summed gradient) * M / (R * N), with M the
    batches per process, R the processes and N the samples, all summed over processes.
    """
    w = objective.w0
    total, count, local_batches = torch.zeros((), dtype=w.dtype, device=w.device), 0, 0
    with torch.no_grad():
        for batch in objective.iter_batches():
            losses = objective.losses(w, batch)
            total += losses.sum()
            count += losses.numel()
            local_batches += 1
    loss = objective.average(total, count, "loss").item()
    counts = objective.reduce_sum(torch.tensor([float(local_batches), 1.0], dtype=torch.float64, device=w.device))
    return loss, counts[0].item() / (counts[1].item() * objective.num_samples)


class _Chain:
    """The SGLD chain of :func:`local_entropy`, warm-started from rung to rung; ``mean`` is the anchor μ."""

    def __init__(self, objective: Objective, cfg: _Settings, scale: float, gen: torch.Generator) -> None:
        self.objective, self.cfg, self.scale, self.gen = objective, cfg, scale, gen
        w = objective.w0
        self.data = _cycle(objective)
        self.current, self.mean = w.clone(), w.clone()
        self.n_grad = 0
        self.xi_prev = self._gaussian() if cfg.integrator == "lm" else None

    def _gaussian(self) -> Tensor:
        w = self.objective.w0
        return torch.randn(self.objective.num_params, generator=self.gen, dtype=w.dtype).to(w.device)

    def _gradient(self) -> Tensor:
        """The scaled process-summed gradient of the next mini-batch at the chain's state."""
        leaf = self.current.detach().requires_grad_(True)
        losses = self.objective.losses(leaf, next(self.data))
        (g,) = torch.autograd.grad(losses.sum(), leaf, allow_unused=True, materialize_grads=True)
        self.n_grad += 1
        return self.objective.reduce_sum(g) * self.scale

    def run(self, rung: int, s: float) -> Tensor | None:
        """``num_steps`` steps at coupling ``s``; the virial ``x·∇L`` per step when the free energy is asked for."""
        cfg, w = self.cfg, self.objective.w0
        # Rung 0 is Algorithm 1's chain at the user's step; upper rungs cap eta * s.
        eta = cfg.step_size if rung == 0 else min(cfg.step_size, COUPLING_STEP[cfg.integrator] / s)
        amplitude = math.sqrt(eta) * cfg.noise
        virial = torch.empty(cfg.num_steps, dtype=torch.float64, device=w.device) if cfg.free_energy else None
        for step in range(cfg.num_steps):
            g = self._gradient()
            with torch.no_grad():
                x = self.current - w
                if virial is not None:
                    virial[step] = torch.dot(x, g)
                xi = self._gaussian()
                if self.xi_prev is not None:  # Leimkuhler-Matthews: the mean of consecutive draws
                    xi, self.xi_prev = (xi + self.xi_prev) / 2, xi
                self.current = self.current - eta * (g + s * x) + amplitude * xi
                if rung == 0:
                    self._update_mean(step)
        if not torch.isfinite(self.current).all():
            raise ValueError(f"the SGLD chain diverged at coupling {s:.4g} (non-finite parameters); use a smaller step_size.")
        return virial

    def _update_mean(self, step: int) -> None:
        alpha, keep_from = self.cfg.alpha, self.cfg.keep_from
        if alpha is not None:
            self.mean.mul_(1 - alpha).add_(self.current, alpha=alpha)
        elif step >= keep_from:
            self.mean += (self.current - self.mean) / (step - keep_from + 1)


def _integrate(gammas: Tensor, d: Tensor, se: Tensor) -> tuple[float, float, float, float]:
    """``(value, se, tail, quadrature_error)`` of the free energy from the ladder's derivatives."""
    f, f_se = gammas * d, gammas * se  # s dF/ds and its error, on the log-s grid
    du = math.log(gammas[-1].item() / gammas[0].item()) / (len(gammas) - 1)
    simpson = torch.ones_like(f)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    simpson *= du / 3
    trapezoid = torch.full_like(f, du)
    trapezoid[0] = trapezoid[-1] = du / 2
    # f(s) = c1/s + c2/s^2 through the two top rungs (ratio r): its integral beyond Gamma.
    r = math.exp(du)
    tail_weights = torch.zeros_like(f)
    tail_weights[-1] = 1 + 1 / (2 * (r - 1))
    tail_weights[-2] = -1 / (2 * (r * r - r))
    weights = simpson + tail_weights
    tail = -(tail_weights * f).sum().item()
    value = -(weights * f).sum().item()
    stderr = (weights * f_se).pow(2).sum().sqrt().item()
    quadrature_error = abs(((simpson - trapezoid) * f).sum().item()) + abs(tail + f[-1].item())
    return value, stderr, tail, quadrature_error
