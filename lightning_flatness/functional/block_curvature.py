"""Curvature of the diagonal blocks of the Hessian: one block per layer, module or group of parameters."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..validation import (
    BY_MODULE, check_block_name, check_blocks, check_cache_chunks, check_float, check_generator, check_int,
)  # fmt: skip
from ._graph_cache import CacheChunks
from ._losses import LossArg
from ._params import resolve_params
from ._restore import measurement_mode
from .hessian_eigenvalues import _cold_start, _start_vector, lanczos_with_errors
from .hutchinson import exact_trace, hutchinson_trace
from .objective import Objective

BlockSpec = Union[str, Mapping[str, Union[str, Sequence[str]]]]  # noqa: UP007 - a runtime alias LightningCLI reads


@dataclass(frozen=True)
class BlockCurvatureResult:
    """The curvature of one diagonal block ``H_BB`` of the Hessian.

    ``top_eig``: its largest eigenvalue (Lanczos), ``top_eig_se`` the standard error over the
    draw of the mini-batches (NaN with one mini-batch). ``trace``: ``tr H_BB`` (Hutchinson),
    ``trace_se`` its standard error over the probes and the mini-batches (the mini-batches' alone
    when computed exactly, see :func:`block_curvature`; NaN then with one mini-batch). ``num_params``: ``P_B``. ``n_hvp``: block products made (Lanczos
    and trace), ``n_grad``: block gradients (the start vector). ``vector``: the unit top
    eigenvector ``(P_B,)``, to warm-start the next measurement. ``params``: the parameter names.
    """

    top_eig: float
    top_eig_se: float
    trace: float
    trace_se: float
    num_params: int
    n_hvp: int
    n_grad: int
    converged: bool
    vector: Tensor
    params: tuple[str, ...]


def resolve_blocks(model: nn.Module, blocks: BlockSpec = BY_MODULE) -> dict[str, list[str]]:
    """``{block name: names of its trainable parameters}``, in ``model.named_parameters()`` order.

    A mapping's patterns are matched with :func:`fnmatch.fnmatchcase` against the names of
    ``model.named_parameters()`` (``*`` also matches dots). ``"by_module"``: one block per child
    module holding trainable parameters, named by its attribute name, and one per trainable
    parameter set directly on the module, named by its own (attribute names are unique, so
    the block names are). Wrappers are looked through: while a module has no trainable
    parameter of its own and exactly one child holding them all (a ``LightningModule``
    wrapping ``self.net``), its child's children are the blocks. Parameters matched by no
    pattern are not measured. Raises ``ValueError`` naming ``blocks`` for a pattern that
    matches nothing, a parameter in two blocks, or an unknown string.
    """
    spec = check_blocks(blocks)
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("blocks: model has no trainable parameters to measure (all have requires_grad=False).")
    if spec == BY_MODULE:
        return _by_module(model, named)
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name, patterns in spec.items():
        for pattern in patterns:
            if not any(fnmatchcase(n, pattern) for n in named):
                raise ValueError(f"blocks[{name!r}]: pattern {pattern!r} matches no trainable parameter; {_available(named)}")
        out[name] = [n for n in named if any(fnmatchcase(n, p) for p in patterns)]
        for n in out[name]:
            if n in owner:
                raise ValueError(f"blocks: parameter {n!r} is in two blocks, {owner[n]!r} and {name!r}; "
                                 "a block's patterns must not match another block's parameters.")  # fmt: skip
            owner[n] = name
    return out


def _available(named: list[str], shown: int = 8) -> str:
    more = f", ... ({len(named)} in all)" if len(named) > shown else ""
    return f"the trainable parameters are {', '.join(repr(n) for n in named[:shown])}{more}."


def _by_module(model: nn.Module, named: list[str]) -> dict[str, list[str]]:
    trainable = set(named)  # named_parameters' names: a tied parameter goes to its first module only
    root, prefix = model, ""
    while True:
        own = [n for n, p in root.named_parameters(recurse=False) if prefix + n in trainable]
        children = [(n, c) for n, c in root.named_children() if any(p.requires_grad for p in c.parameters())]
        if own or len(children) != 1:
            break
        prefix, root = f"{prefix}{children[0][0]}.", children[0][1]
    out = {check_block_name(n): [prefix + n] for n in own}
    for n, child in children:
        params = [f"{prefix}{n}.{pn}" for pn, _ in child.named_parameters()]
        if any(p in trainable for p in params):
            out[check_block_name(n)] = [p for p in params if p in trainable]
    return out


def block_curvature(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossArg = "cross_entropy",
    blocks: BlockSpec = BY_MODULE,
    *,
    trace_probes: int = 64,
    tol: float = 1e-4,
    max_iter: int = 100,
    generator: torch.Generator | int | None = None,
    dtype: torch.dtype | None = None,
    cache_chunks: CacheChunks = "auto",
    init: Mapping[str, Tensor] | None = None,
    gradient: Tensor | None = None,
    error_ratio: float | None = None,
) -> dict[str, BlockCurvatureResult]:
    r"""Top eigenvalue and trace of each diagonal block :math:`H_{BB} = \nabla^2_{w_B} L(w)` of the Hessian.

    ``blocks`` groups parameters (see :func:`resolve_blocks`): a mapping ``{name: pattern(s)}``,
    e.g. ``{"conv": "features.*", "head": "classifier.*"}``, or ``"by_module"``. For each block,
    :math:`L` is differentiated with respect to :math:`w_B` alone, every other parameter held
    fixed (:class:`Objective` with ``params``): :math:`\lambda_{\max}(H_{BB})` by :func:`lanczos`
    with the eigenvalue's standard error over the mini-batches and ``tol`` or ``error_ratio``
    as in :func:`hessian_eigenvalues` (``error_ratio=0.1``: each block's Lanczos stops at a tenth
    of its eigenvalue's standard error), and :math:`\operatorname{tr} H_{BB}` by
    :func:`hutchinson_trace` with ``trace_probes`` probes (with ``error_ratio``, stopped at the first
    block of 8 whose probe error is within that fraction of the mini-batches' error, at most
    ``trace_probes``), or exactly (``P_B`` products with the unit vectors, no probe error) when
    ``P_B <= trace_probes``; ``trace_se`` holds both errors (:class:`TraceResult`). By Cauchy interlacing
    :math:`\lambda_{\max}(H_{BB}) \le \lambda_{\max}(H)`, and the blocks' traces sum to the
    trace over the parameters they cover.

    Cost per block: ``n_hvp`` block products plus ``n_grad`` (1) block gradient for Lanczos'
    start vector (none with ``gradient``, the full flat ``∇L`` over the trainable parameters,
    or with ``init``: ``{name: (P_B,) vector}``, e.g. last measurement's ``vector``). A block
    product backpropagates only down to the block's earliest parameter, so it costs a full
    Hessian-vector product for the first layer and much less for the last (``docs/metrics.md``).
    The leading mini-batches' forward passes and gradient graphs (``cache_chunks``, as in
    :func:`hessian_eigenvalues`) are built once per block and shared by its Lanczos and trace products. Each block draws from its own
    generator, seeded from ``generator`` and its name, so adding a block changes no other's.

    Example:
        >>> import torch
        >>> from lightning_flatness.functional import block_curvature
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        >>> result = block_curvature(model, batches, blocks={"hidden": "0.*", "head": "2.*"})
        >>> sorted(result), result["head"].num_params
        (['head', 'hidden'], 27)
    """
    trace_probes, max_iter = check_int("trace_probes", trace_probes), check_int("max_iter", max_iter)
    cache_chunks, tol = check_cache_chunks(cache_chunks), check_float("tol", tol, inclusive=False)
    error_ratio = None if error_ratio is None else check_float("error_ratio", error_ratio, inclusive=False, maximum=1.0)
    base = int(torch.randint(2**62, (1,), generator=check_generator(generator)))
    resolved = resolve_blocks(model, blocks)
    named = dict(model.named_parameters())
    slices = _flat_slices(model)
    total = sum(s.stop - s.start for s in slices.values())
    if gradient is not None and (not isinstance(gradient, Tensor) or gradient.shape != (total,)):
        raise ValueError(f"gradient must be the flat ∇L over the {total} trainable parameters, shape ({total},), "
                         f"got {getattr(gradient, 'shape', type(gradient).__name__)}.")  # fmt: skip
    out = {}
    with measurement_mode(model):
        for name, params in resolved.items():
            gen = torch.Generator().manual_seed((base + zlib.crc32(name.encode())) % 2**63)
            objective = Objective(model, batches, loss_fn, [named[p] for p in params], dtype)
            block_grad = None if gradient is None else torch.cat([gradient[slices[p]] for p in params])
            start = None if init is None else init.get(name)
            solver = {"tol": tol, "max_iter": max_iter, "error_ratio": error_ratio, "cache_chunks": cache_chunks}
            out[name] = _one_block(objective, tuple(params), start, block_grad, gen, trace_probes, solver)
    return out


def _flat_slices(model: nn.Module) -> dict[str, slice]:
    """Where each trainable parameter lies in the flat vector of them all (:class:`Objective`'s layout)."""
    out, offset = {}, 0
    for n, p in resolve_params(model, None):
        out[n] = slice(offset, offset + p.numel())
        offset += p.numel()
    return out


def _one_block(
    objective: Objective, params: tuple[str, ...], init: Tensor | None, gradient: Tensor | None,
    gen: torch.Generator, trace_probes: int, solver: dict[str, Any],
) -> BlockCurvatureResult:  # fmt: skip
    size = objective.num_params
    if init is not None and init.numel() == size:
        vector, n_grad = _start_vector(init, size, objective.w0), 0
    else:  # no warm start, or the block changed size: a cold start
        vector, n_grad = _cold_start(objective, "gradient", gen, gradient)
    operator = objective.hessian_operator(solver["cache_chunks"])
    eig, se = lanczos_with_errors(
        objective, operator, vector, k=1, tol=solver["tol"], max_iter=solver["max_iter"], generator=gen,
        error_ratio=solver["error_ratio"],
    )  # fmt: skip
    trace = exact_trace(operator) if size <= trace_probes else hutchinson_trace(
        operator, trace_probes, gen, error_ratio=solver["error_ratio"])  # fmt: skip
    return BlockCurvatureResult(
        eig.values[0].item(), se[0].item(), trace.value, trace.se, size, operator.n_products, n_grad, eig.converged,
        eig.vectors[0], params,
    )  # fmt: skip

