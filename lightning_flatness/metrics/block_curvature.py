"""The top eigenvalue and trace of each diagonal block of the Hessian (per layer, module or group; opt-in)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .. import keys
from ..functional import block_curvature, resolve_blocks
from ..functional.block_curvature import BlockSpec
from ..validation import BY_MODULE, check_blocks, check_bool, check_int
from .base import FlatnessMetric, MeasurementContext
from .hessian import lanczos_settings, stopping_rule


class BlockCurvature(FlatnessMetric):
    """Per block ``B`` of parameters, ``λ_max(H_BB)`` and ``tr H_BB`` of the Hessian's diagonal block.

    Logs ``flatness/hessian_top_eig/<block>`` and ``flatness/hessian_trace/<block>``
    (:func:`~lightning_flatness.keys.hessian_top_eig_block`,
    :func:`~lightning_flatness.keys.hessian_trace_block`), each with ``<key>_se``: over the draw
    of the mini-batches for the eigenvalue, over the Hutchinson probes and the mini-batches for the
    trace (the mini-batches' alone when exact). See :func:`~lightning_flatness.functional.block_curvature`.

    Args:
        blocks: ``{block name: parameter-name glob pattern(s)}`` matched against
            ``pl_module.named_parameters()`` (e.g. ``{"conv": "net.features.*", "head":
            "net.classifier.*"}``; names of letters, digits, ``_`` and ``-``), or ``"by_module"``
            (default): one block per child module of the ``LightningModule``, looking through a
            single wrapped network (:func:`~lightning_flatness.functional.resolve_blocks`). With
            a mapping the keys are known at construction; with ``"by_module"`` they are set in
            :meth:`setup`, when the callback gets the model (``Trainer.fit`` start), and the
            patterns of a mapping are checked against the model there too.
        trace_probes: Hutchinson probes per block, at most (a block of at most this many
            parameters gets its exact trace from that many products).
        tol, error_ratio, max_iter, cache_chunks: Lanczos' options, as for
            :class:`~lightning_flatness.metrics.HessianEigenvalues` (by default each block's
            Lanczos stops where its eigenvalue's error is a tenth of its standard error, and its
            trace's probes where their error is a tenth of the mini-batches'; ``tol`` given: every probe).
        warm_start: start each block's Lanczos from its previous top eigenvector (checkpointed).
        every_n_epochs: see :class:`~lightning_flatness.metrics.FlatnessMetric`.

    Cost per block: its Lanczos products plus at most ``min(trace_probes, P_B)`` block products (+1 block
    gradient on a cold start without the regret's gradient); a block product backpropagates only
    down to the block's first layer (``docs/metrics.md``).
    """

    name = "block_curvature"
    uses = ("gradient",)

    def __init__(
        self, blocks: BlockSpec = BY_MODULE, trace_probes: int = 64, tol: float | None = None,
        error_ratio: float = 0.1, max_iter: int = 100, cache_chunks: int | str = "auto", warm_start: bool = True,
        every_n_epochs: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__(every_n_epochs)
        spec = check_blocks(blocks)
        self.blocks = blocks
        self.trace_probes = check_int("trace_probes", trace_probes)
        self.tol, self.error_ratio, self.max_iter, self.cache_chunks = lanczos_settings(tol, error_ratio, max_iter, cache_chunks)
        self.warm_start = check_bool("warm_start", warm_start)
        self.keys = () if spec == BY_MODULE else block_keys(spec)
        self.vectors: dict[str, Tensor] = {}  # each block's last top eigenvector

    def setup(self, model: nn.Module) -> None:
        self.keys = block_keys(resolve_blocks(model, self.blocks))

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        results = block_curvature(
            ctx.model, ctx.batches, ctx.loss_fn, self.blocks, trace_probes=self.trace_probes,
            **stopping_rule(self.tol, self.error_ratio), max_iter=self.max_iter, generator=ctx.seed_for(self.name), dtype=ctx.dtype, cache_chunks=self.cache_chunks,
            init=self.vectors if self.warm_start else None, gradient=ctx.shared.gradient,
        )  # fmt: skip
        self.vectors = {name: r.vector.detach() for name, r in results.items()}
        out = {}
        for name, r in results.items():
            eig, trace = keys.hessian_top_eig_block(name), keys.hessian_trace_block(name)
            out.update({eig: r.top_eig, trace: r.trace, keys.se(trace): r.trace_se})
            if math.isfinite(r.top_eig_se):  # NaN with one mini-batch in all: not logged
                out[keys.se(eig)] = r.top_eig_se
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": {name: v.cpu() for name, v in self.vectors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vectors = dict(state.get("vectors", {}))


def block_keys(names: Any) -> tuple[str, ...]:
    """The keys of blocks ``names``: eigenvalues and traces, then their standard errors."""
    values = [key for name in names for key in (keys.hessian_top_eig_block(name), keys.hessian_trace_block(name))]
    return (*values, *(keys.se(key) for key in values))
