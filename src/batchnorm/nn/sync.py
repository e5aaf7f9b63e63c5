r"""Synchronized batch normalization over ``torch.distributed`` (any backend: gloo, nccl, ...).

In training, every rank computes the count, mean and biased variance of its own part of the
batch; the parts are all-gathered and merged exactly with Chan's parallel algorithm
(:func:`batchnorm.functional.combine_stats`), so uneven per-rank batch sizes and ranks with no
samples at all give the statistics of the concatenated batch. The backward all-reduces
``sum(dy)`` and ``sum(dy * xhat)`` and applies the closed-form input gradient with the global
count; the gradients of gamma and beta are each rank's own share, so their sum over ranks (what
DDP's gradient all-reduce computes, up to its averaging) is the full-batch gradient, as with
``torch.nn.SyncBatchNorm``.

The layer runs the one functional path (:func:`batchnorm.functional.batch_norm_with_update`)
with a collective hook over its process group (:class:`_Distributed`), which reduces the
statistics and the backward's sums across the ranks (:mod:`batchnorm.ops.collective`).

Without an initialized process group (or with one process) the layer is plain BN; in eval
mode (or with frozen statistics) it never communicates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as F
from .freeze import has_tail, is_foreign
from .modules import _NormBase


def _world(process_group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gather_stats(mean: Tensor, var: Tensor, count: Tensor, process_group: Any = None,
                 dtype: torch.dtype | None = None) -> F.Stats:
    """All-gather per-rank ``(C,)`` mean, biased variance and scalar count; merge them exactly.

    Returns the global :class:`~batchnorm.functional.Stats` in float64 (identical on every rank).
    A first, fixed-size exchange carries each rank's channel count, input ``dtype`` and count, so
    ranks that disagree (different models, or inputs of different dtypes) all raise the same
    ``ValueError`` instead of failing inside the collective or hanging.
    """
    c = mean.numel()
    world = dist.get_world_size(process_group)
    code = _DTYPES.index(dtype) if dtype in _DTYPES else -1
    header = torch.tensor([float(c), float(code), float(count)], dtype=torch.float64)
    heads = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(heads, header, group=process_group)
    table = torch.stack(heads)  # (P, 3): channels, dtype code, count
    if bool((table[:, :2] != table[0, :2]).any()):
        ranks = "; ".join(
            f"rank {r}: {int(ch)} channels, {_DTYPES[int(k)] if k >= 0 else 'float64 statistics'}"
            for r, (ch, k, _) in enumerate(table.tolist()))
        raise ValueError(
            f"SyncBatchNorm: the ranks disagree ({ranks}); every rank must run the same model (same "
            "num_features) on inputs of the same dtype. Nothing was updated."
        )
    packed = torch.cat([mean.reshape(-1).double(), var.reshape(-1).double()])
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=process_group)
    stats = torch.stack(parts)  # (P, 2C)
    return F.combine_stats(stats[:, :c], stats[:, c:], table[:, 2])


class _Distributed:
    """The collective hook of :func:`batchnorm.functional.batch_norm_with_update` over a
    ``torch.distributed`` process group (:class:`batchnorm.ops.Collective`)."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group

    def gather_stats(self, mean: Tensor, var: Tensor, count: Tensor, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(gather_stats(mean, var, count, self.process_group, dtype))  # type: ignore[return-value]

    def sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, group=self.process_group)
        return t


class SyncBatchNorm(_NormBase):
    """Batch normalization synchronized across the ranks of a ``torch.distributed`` process group.

    Drop-in for ``torch.nn.SyncBatchNorm`` on any backend (gloo on the CPU included): input
    ``(N, C, *)`` (or features on ``axis``), statistics of the batch concatenated over the ranks
    of ``process_group`` (default: the whole world), exact for uneven per-rank batches and for
    ranks with zero samples. Masks (``forward(x, mask)``) are respected on every rank. Every rank
    must call forward (and backward) the same number of times, as for any collective.

    Ghost batches (``virtual_batch_size``) are not synchronized: they are per-rank by nature, so
    this layer rejects them (use :class:`BatchNorm1d` etc. with ``virtual_batch_size``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Any = None,
                 device: Any = None, dtype: Any = None, *, axis: int = 1, **kwargs: Any) -> None:
        if kwargs.get("virtual_batch_size"):
            raise ValueError("SyncBatchNorm does not support virtual_batch_size (ghost batches are per rank)")
        if not isinstance(axis, int) or axis == 0:
            raise ValueError(f"axis must be a non-zero int (axis 0 is the batch), got {axis!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group
        self._axis = axis

    @property
    def axis(self) -> int:
        return self._axis

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.process_group is None else ", process_group=<group>")

    def _normalize(self, x: Tensor, mask: Tensor | None, normalize_with_batch: bool, update: bool,
                   **path: Any) -> tuple[Tensor, Tensor | bool | None]:
        # as torch's: only training synchronizes (eval without running statistics uses each rank's batch)
        if self.training and _world(self.process_group) > 1:
            path["collective"] = _Distributed(self.process_group)
        return super()._normalize(x, mask, normalize_with_batch, update, **path)

    # -- torch.nn.SyncBatchNorm compatibility --------------------------------------------------

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: every BN layer of ``module``
        (ours or torch's) becomes a :class:`SyncBatchNorm`, in place, holding the *same*
        ``Parameter`` and buffer objects, so an optimizer built before the conversion keeps
        training the model. Returns the new root (``module`` unless it was a BN layer itself).
        A layer that cannot be synchronized (ghost batches, renormalization, a fused activation,
        a torch subclass with its own forward, an uninitialized lazy layer) raises ``ValueError``
        naming every such layer, before anything is changed. ``batchnorm.convert(model, "sync")``
        does the same on a copy."""
        return swap_sync(module, process_group)

    @classmethod
    def revert_sync_batchnorm(cls, module: nn.Module) -> nn.Module:
        """The inverse of :meth:`convert_sync_batchnorm`, in place and sharing the parameters: each
        :class:`SyncBatchNorm` back to the class it was converted from (ours or torch's; without
        a record, :class:`BatchNorm` on the same axis)."""
        return swap_sync(module, revert=True)


# ------------------------------------------------------------------ module swaps (in place)

_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def why_not_sync(bn: nn.Module) -> str | None:
    """Why the BN layer ``bn`` cannot become a :class:`SyncBatchNorm` (``None`` when it can)."""
    from .act import _BatchNormActBase
    from .modules import _LazyNormBase
    from .renorm import _BatchRenormBase

    lazy = (_LazyNormBase, nn.modules.batchnorm._LazyNormBase)
    if isinstance(bn, lazy) and bn.has_uninitialized_params():
        return "it is a lazy layer that has not seen an input yet (run one batch first)"
    if isinstance(bn, _BatchRenormBase):
        return "batch renormalization has no synchronized form"
    if isinstance(bn, _BatchNormActBase):
        return f"its fused activation ({bn.act!r}) has no place in SyncBatchNorm"
    if isinstance(bn, _NormBase) and bn.virtual_batch_size:
        return "ghost batches (virtual_batch_size) are per rank and cannot be synchronized"
    if has_tail(bn) or is_foreign(bn):
        return f"{type(bn).__name__} computes more than batch norm (its own forward), which SyncBatchNorm would drop"
    return None


def _converts(m: nn.Module, revert: bool) -> bool:
    if revert:
        return isinstance(m, SyncBatchNorm)
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncBatchNorm)


def share_state(src: nn.Module, dst: nn.Module) -> None:
    """``dst`` takes ``src``'s parameter and buffer objects themselves (not copies), its training
    flag and, between our layers, the freezing knobs and ``nonfinite``."""
    for k in _STATE:
        t = getattr(src, k, None)
        if t is not None and (k in dst._parameters or k in dst._buffers):
            setattr(dst, k, t)
    dst.train(src.training)
    if isinstance(src, _NormBase) and isinstance(dst, _NormBase):
        dst.use_running_stats, dst.update_running_stats = src.use_running_stats, src.update_running_stats
        dst._train_affine, dst.nonfinite = src._train_affine, src.nonfinite


def layer_kwargs(bn: nn.Module) -> dict[str, Any]:
    """Keyword arguments of our constructors that describe the BN layer ``bn`` (ours or torch's)."""
    kw: dict[str, Any] = dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                              track_running_stats=bn.track_running_stats)
    if bn.affine:
        kw["weight"] = bn.weight is not None
        kw["bias"] = bn.bias is not None
    if isinstance(bn, _NormBase):
        kw["nonfinite"] = bn.nonfinite
    return kw


def to_sync(bn: Any, process_group: Any = None) -> SyncBatchNorm:
    """A :class:`SyncBatchNorm` in the place of the BN layer ``bn``, sharing its tensors."""
    if isinstance(bn, nn.SyncBatchNorm) and process_group is None:
        process_group = bn.process_group
    new = SyncBatchNorm(bn.num_features, process_group=process_group, axis=getattr(bn, "_axis", 1),
                        device="meta", **layer_kwargs(bn))
    share_state(bn, new)
    new._converted_from = type(bn)  # type: ignore[assignment]
    return new


def from_sync(sync: SyncBatchNorm, torch_ok: bool = True) -> nn.Module:
    """The layer ``sync`` was converted from (torch's only with ``torch_ok``), sharing its tensors;
    without a record, :class:`BatchNorm` on ``sync``'s axis."""
    from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

    cls = getattr(sync, "_converted_from", None)
    ours_of_torch = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
    new: nn.Module
    if cls is not None and issubclass(cls, _NormBase) and cls is not SyncBatchNorm and cls is not BatchNorm:
        new = cls(sync.num_features, device="meta", **layer_kwargs(sync))
    elif cls is not None and not issubclass(cls, _NormBase) and torch_ok:
        new = cls(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats, device="meta")
    elif cls in ours_of_torch:
        new = ours_of_torch[cls](sync.num_features, device="meta", **layer_kwargs(sync))
    else:
        new = BatchNorm(sync.num_features, axis=sync._axis, device="meta", **layer_kwargs(sync))
    share_state(sync, new)
    return new


def swap_sync(module: nn.Module, process_group: Any = None, *, revert: bool = False,
              torch_ok: bool = True) -> nn.Module:
    """Replace, in place, every BN layer of ``module`` by a :class:`SyncBatchNorm` (or, with
    ``revert``, every :class:`SyncBatchNorm` by :func:`from_sync`), sharing parameters and
    buffers; a layer registered in several places stays one module. Checks every layer first
    (:func:`why_not_sync`) and raises ``ValueError`` listing the ones that cannot be converted,
    with nothing changed. Returns the new root."""
    if not revert:
        problems = [f"{name or '<root>'} ({type(m).__name__}): {why}" for name, m in module.named_modules()
                    if _converts(m, False) and (why := why_not_sync(m)) is not None]
        if problems:
            raise ValueError("cannot convert to SyncBatchNorm; nothing was changed:\n  " + "\n  ".join(problems))
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            if _converts(m, revert):
                memo[id(m)] = from_sync(m, torch_ok) if revert else to_sync(m, process_group)  # type: ignore[arg-type]
            else:
                memo[id(m)] = m
                for name, child in list(m._modules.items()):
                    if child is not None:
                        m._modules[name] = visit(child)
        return memo[id(m)]

    return visit(module)
