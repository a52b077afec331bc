"""Flatness-seeking optimizers: Entropy-SGD (Chaudhari et al., ICLR 2017)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .validation import check_bool, check_choice, check_float, check_int

__all__ = ["EntropySGD"]

PARAMETRIZATIONS = ("authors", "paper")


class EntropySGD(Optimizer):
    r"""Entropy-SGD (Chaudhari et al., ICLR 2017, Algorithm 1): SGD on the local free energy.

    Each :meth:`step` minimizes :math:`-T\log Z(w;\gamma)`, :math:`Z(w;\gamma) = \int
    \exp(-(f(w') + \tfrac\gamma2\|w - w'\|^2)/T)\,dw'` (:math:`T = \epsilon^2/2`), whose gradient
    is :math:`\gamma(w - \langle w'\rangle)`; the default outer step follows
    :math:`w - \langle w'\rangle` (the same direction, without the factor :math:`\gamma`). The
    Gibbs average is estimated by an inner SGLD loop of :math:`L` = ``num_steps`` steps, each
    evaluating ``closure`` once:

    .. code-block:: text

        w', mu <- w
        for l = 1..L:
            g  <- grad f(w')                          # closure(), + weight_decay * w'
            w' <- w' - eta' (g + gamma_t (w' - w)) + sqrt(eta') * eps * N(0, I)
            mu <- (1 - alpha) mu + alpha w'
        d  <- w - mu                                  # parametrization="authors" (default)
        d  <- gamma_t (w - mu)                        # parametrization="paper": the local-entropy gradient
        v  <- momentum v + (1 - dampening) d          # if momentum > 0 (d is left in p.grad)
        d  <- d + momentum v  (nesterov)  or  v
        w  <- w - lr d

    with scoping :math:`\gamma_t = \min(\gamma_0(1+\gamma_1)^t, \gamma_{max})`, :math:`t` the
    number of steps taken. Per step: ``num_steps`` closure evaluations (forward + backward),
    no extra memory beyond three copies of the parameters (``w``, :math:`\mu`, momentum).

    The two parametrizations differ only in the outer step: ``"paper"`` with ``lr`` steps exactly
    like ``"authors"`` with ``lr * gamma_t``; for a constant scope (``gamma_growth=0``),
    ``lr_paper = lr_authors / gamma``. The default, ``"authors"``, is the authors' code's outer
    step (their code, ucla-vision/entropy-sgd, is what implementations copy): ``lr`` is the
    fraction of the way from :math:`w` to the anchor :math:`\mu`. The default ``lr=1`` sets
    :math:`w \leftarrow \mu`, about ``num_steps - 3`` SGD steps' worth at ``sgld_lr`` where the
    curvature is small compared with ``1 / (num_steps * sgld_lr)`` (with ``alpha=0.25``);
    SGD-like values 0.01–0.1 move that fraction of the way and are that much slower. In the
    ``"paper"`` form the default scope :math:`\gamma_0 = 0.03` makes such values move only
    ``0.03 * lr`` of the way. With momentum :math:`m` the steady step is ``lr / (1 - m)`` of the
    way: use ``lr`` near ``1 - m`` (the authors' script: ``lr=0.1``, Nesterov momentum 0.9).
    Coming from ``SGD(lr=eta)``: ``EntropySGD(params, sgld_lr=eta)``.

    Args:
        params: parameters or parameter groups.
        lr: the outer step size :math:`\eta` (see ``parametrization``); larger than 1 (``"paper"``:
            ``lr * gamma_t`` larger than 1) overshoots the anchor.
        num_steps: inner SGLD steps :math:`L` (the paper uses 5–20).
        sgld_lr: the inner step :math:`\eta'` (paper and code: 0.1); the inner loop is SGD at
            this rate, so it plays the part of SGD's learning rate.
        noise: the thermal noise :math:`\epsilon` (paper and code: 1e-4); ``0`` turns the inner
            loop into plain gradient descent on :math:`f + \tfrac\gamma2\|w - \cdot\|^2`.
        gamma: :math:`\gamma_0`, the initial scope (coupling).
        gamma_growth: :math:`\gamma_1` of the scoping schedule (``0``: constant :math:`\gamma`).
        gamma_max: cap on :math:`\gamma_t`; default ``1 / sgld_lr``, where the coupling term of
            the inner step pulls :math:`w'` all the way back to :math:`w` (beyond
            ``2 / sgld_lr`` the inner loop diverges, which is rejected).
        alpha: weight of the newest sample in the running average :math:`\mu`; default 0.25,
            the authors' code (``mw = 0.75 mw + 0.25 w'``).
        momentum, dampening, nesterov: as in :class:`torch.optim.SGD`, on the outer step.
        weight_decay: L2 penalty added to the inner gradients (it is part of :math:`f`, so it
            reaches the outer step through :math:`\mu`).
        parametrization: ``"authors"`` (default; outer step ``lr * (w - mu)``, as in the authors'
            code) or ``"paper"`` (``lr * gamma_t * (w - mu)``, Algorithm 1 exactly).
        seed: seeds the optimizer's own generator (one per device, drawing on that device) for
            the Langevin noise; the global RNG is never used. Their states are part of
            :meth:`state_dict`, so a resumed run draws the same noise.

    ``closure`` is required: it must re-evaluate the loss at the current parameters, call
    ``backward()`` and return the loss; it may draw a fresh mini-batch each call (the paper) or
    re-use the current one (Lightning's automatic optimization, which passes a closure that runs
    ``training_step`` and ``backward`` on the current batch, so the inner loop explores that
    batch's loss). Gradients are zeroed before every call. Parameters whose ``.grad`` is ``None``
    after the first call are left untouched (as in :class:`torch.optim.SGD`). :meth:`step`
    returns the first call's loss, i.e. the loss at :math:`w`. Not supported: gradient
    accumulation over several batches, and fp16 ``GradScaler`` (Lightning's ``16-mixed``), which
    steps without a closure; bf16 works.

    Example:
        >>> import torch
        >>> from lightning_flatness.optim import EntropySGD
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> opt = EntropySGD(model.parameters(), lr=1.0, num_steps=5, seed=0)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)

    References:
        Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun, Zecchina,
        "Entropy-SGD: Biasing Gradient Descent into Wide Valleys", ICLR 2017; code:
        github.com/ucla-vision/entropy-sgd.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        num_steps: int = 20,
        sgld_lr: float = 0.1,
        noise: float = 1e-4,
        gamma: float = 0.03,
        gamma_growth: float = 1e-3,
        gamma_max: float | None = None,
        alpha: float = 0.25,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        parametrization: str = "authors",
        seed: int = 0,
    ) -> None:
        defaults = self._check(
            dict(
                lr=lr, num_steps=num_steps, sgld_lr=sgld_lr, noise=noise, gamma=gamma, gamma_growth=gamma_growth,
                gamma_max=gamma_max, alpha=alpha, momentum=momentum, dampening=dampening, nesterov=nesterov,
                weight_decay=weight_decay, parametrization=parametrization,
            )
        )  # fmt: skip
        self._seed = check_int("seed", seed, 0)
        self._generators: dict[str, torch.Generator] = {}
        super().__init__(params, defaults)

    @staticmethod
    def _check(group: dict[str, Any]) -> dict[str, Any]:
        out = dict(group)
        out["lr"] = check_float("lr", group["lr"])
        out["num_steps"] = check_int("num_steps", group["num_steps"])  # the inner SGLD steps L
        out["sgld_lr"] = check_float("sgld_lr", group["sgld_lr"], inclusive=False)
        out["noise"] = check_float("noise", group["noise"])
        out["gamma"] = check_float("gamma", group["gamma"], inclusive=False)
        out["gamma_growth"] = check_float("gamma_growth", group["gamma_growth"])
        gmax = group["gamma_max"]
        gmax = 1.0 / out["sgld_lr"] if gmax is None else check_float("gamma_max", gmax, inclusive=False)
        if gmax * out["sgld_lr"] >= 2:
            raise ValueError(
                f"gamma_max * sgld_lr must be < 2 or the inner SGLD loop diverges, got gamma_max={gmax!r} and "
                f"sgld_lr={out['sgld_lr']!r}."
            )
        if out["gamma"] > gmax:
            raise ValueError(f"gamma must be <= gamma_max, got gamma={out['gamma']!r} and gamma_max={gmax!r}.")
        out["gamma_max"] = group["gamma_max"]
        out["alpha"] = check_float("alpha", group["alpha"], inclusive=False, maximum=1.0)
        out["momentum"] = check_float("momentum", group["momentum"], maximum=1.0, inclusive_maximum=False)
        out["dampening"] = check_float("dampening", group["dampening"], maximum=1.0)
        if check_bool("nesterov", group["nesterov"]) and (out["momentum"] <= 0 or out["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0.")
        out["weight_decay"] = check_float("weight_decay", group["weight_decay"])
        out["parametrization"] = check_choice("parametrization", group["parametrization"], PARAMETRIZATIONS)
        return out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.param_groups[-1].update(self._check(self.param_groups[-1]))

    @staticmethod
    def scoped_gamma(group: dict[str, Any], t: int) -> float:
        """:math:`\\gamma_t = \\min(\\gamma_0 (1 + \\gamma_1)^t, \\gamma_{max})` for the group at step ``t``."""
        gmax = 1.0 / group["sgld_lr"] if group["gamma_max"] is None else group["gamma_max"]
        try:
            grown = group["gamma"] * (1.0 + group["gamma_growth"]) ** t
        except OverflowError:
            grown = math.inf
        return min(grown, gmax)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    def _noise_like(self, p: Tensor) -> Tensor:
        if p.dtype in (torch.float32, torch.float64):
            return torch.randn(p.shape, generator=self._generator(p.device), dtype=p.dtype, device=p.device)
        noise = torch.randn(p.shape, generator=self._generator(p.device), dtype=torch.float32, device=p.device)
        return noise.to(p.dtype)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Entropy-SGD step: ``num_steps`` closure evaluations, then the outer update."""
        if closure is None:
            raise ValueError(
                "EntropySGD.step needs a closure that re-evaluates the loss and calls backward(): the inner SGLD "
                "loop evaluates the gradient at num_steps perturbed points."
            )
        groups = self.param_groups
        num_steps = {g["num_steps"] for g in groups}
        if len(num_steps) != 1:
            raise ValueError(f"all parameter groups must share num_steps (one closure call per step), got {num_steps}.")
        inner = num_steps.pop()
        params = [p for g in groups for p in g["params"]]

        def evaluate() -> Any:
            for p in params:
                p.grad = None
            with torch.enable_grad():
                return closure()

        first = evaluate()
        active = [[p for p in g["params"] if p.grad is not None] for g in groups]
        t = 0
        for plist in active:
            if plist:
                t = int(self.state[plist[0]].get("step", 0))
                break
        gammas = [self.scoped_gamma(g, t) for g in groups]
        with torch.no_grad():
            anchors = [[p.detach().clone() for p in plist] for plist in active]
            means = [[p.detach().clone() for p in plist] for plist in active]
        for ell in range(inner):
            if ell > 0:
                evaluate()
            with torch.no_grad():
                for g, gamma, plist, ws, mus in zip(groups, gammas, active, anchors, means):
                    lr, amp, wd, alpha = g["sgld_lr"], math.sqrt(g["sgld_lr"]) * g["noise"], g["weight_decay"], g["alpha"]
                    for p, w, mu in zip(plist, ws, mus):
                        d = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                        if wd:
                            d.add_(p, alpha=wd)
                        d.add_(p - w, alpha=gamma)
                        p.add_(d, alpha=-lr)
                        if amp:
                            p.add_(self._noise_like(p), alpha=amp)
                        mu.mul_(1 - alpha).add_(p, alpha=alpha)
        with torch.no_grad():
            for g, gamma, plist, ws, mus in zip(groups, gammas, active, anchors, means):
                self._outer_step(g, gamma, plist, ws, mus, t)
        return first

    def _outer_step(self, group: dict[str, Any], gamma: float, params: list[Tensor], anchors: list[Tensor],
                    means: list[Tensor], t: int) -> None:  # fmt: skip
        """``w <- w - lr d`` from the anchors ``w`` and means ``mu``, with SGD's momentum on ``d``."""
        mom, damp = group["momentum"], group["dampening"]
        for p, w, mu in zip(params, anchors, means):
            p.copy_(w)
            d = w - mu
            if group["parametrization"] == "paper":
                d.mul_(gamma)
            p.grad = d.clone()
            state = self.state[p]
            if mom > 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(mom).add_(d, alpha=1 - damp)
                d = d.add(buf, alpha=mom) if group["nesterov"] else buf
            p.add_(d, alpha=-group["lr"])
            state["step"] = t + 1

    # The generators' states travel with the optimizer's state, so a resumed run draws the same noise.
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["generators"] = {key: gen.get_state() for key, gen in self._generators.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators", {})
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # saved before the option existed, when the outer step was Algorithm 1's
            group.setdefault("parametrization", "paper")
        for key, value in generators.items():
            self._generator(torch.device(key)).set_state(value)
