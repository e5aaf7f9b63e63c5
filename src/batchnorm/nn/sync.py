r"""Synchronized batch normalization over ``torch.distributed`` (any backend: gloo, nccl, ...).

In training, every rank computes the count, mean and biased variance of its own part of the
batch; the parts are all-gathered and merged exactly with Chan's parallel algorithm
(:func:`batchnorm.functional.combine_stats`), so uneven per-rank batch sizes and ranks with no
samples at all give the statistics of the concatenated batch. The backward all-reduces
``sum(dy)`` and ``sum(dy * xhat)`` and applies the closed-form input gradient with the global
count; the gradients of gamma and beta are each rank's own share, so their sum over ranks (what
DDP's gradient all-reduce computes, up to its averaging) is the full-batch gradient, as with
``torch.nn.SyncBatchNorm``.

Without an initialized process group (or with one process) the layer is plain BN; in eval
mode (or with frozen statistics) it never communicates.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as F
from ..kernels import reference as _ref
from .modules import _NormBase


def _world(process_group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def gather_stats(mean: Tensor, var: Tensor, count: Tensor, process_group: Any = None) -> F.Stats:
    """All-gather per-rank ``(C,)`` mean, biased variance and scalar count; merge them exactly.

    Returns the global :class:`~batchnorm.functional.Stats` in float64 (identical on every rank).
    """
    c = mean.numel()
    packed = torch.cat([count.reshape(1).double(), mean.reshape(-1).double(), var.reshape(-1).double()])
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, packed, group=process_group)
    table = torch.stack(parts)  # (P, 1 + 2C)
    return F.combine_stats(table[:, 1:1 + c], table[:, 1 + c:], table[:, 0])


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN across ranks, from the reference primitives and two collectives."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, eps, process_group):  # type: ignore[override]
        acc = _ref.acc_dtype(x.dtype)
        mean, var, count = _ref.stats(x, mask, 0)  # (1, C), (1, C), (1,)
        has = count > 0  # an empty rank contributes count 0 (its mean/var are NaN: drop them)
        mean = torch.where(has.unsqueeze(1), mean, torch.zeros_like(mean))
        var = torch.where(has.unsqueeze(1), var, torch.zeros_like(var))
        g = gather_stats(mean[0], var[0], count[0], process_group)
        if float(g.count) <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {int(g.count)} over all "
                f"ranks (local input size {tuple(x.shape)}). " + F.SMALL_BATCH_REMEDIES
            )
        gmean = g.mean.to(acc).unsqueeze(0)
        invstd = _ref.inverse_std(g.var.to(acc), eps).unsqueeze(0)
        y = _ref.normalize(x, gmean, invstd, weight, bias, 0)
        ctx.save_for_backward(x, weight, gmean, invstd, g.count, mask)
        ctx.process_group = process_group
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(g.mean, g.var, g.count)
        return y, g.mean, g.var, g.count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):  # type: ignore[override]
        x, weight, mean, invstd, count, mask = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        sum_dy, sum_dy_xhat = _ref.backward_reduce(dy, x, mean, invstd, 0)  # (1, C) each, local
        c = sum_dy.shape[1]
        packed = torch.cat([sum_dy.reshape(-1), sum_dy_xhat.reshape(-1)]).double()
        dist.all_reduce(packed, group=ctx.process_group)
        g_dy, g_dy_xhat = packed[:c].unsqueeze(0), packed[c:].unsqueeze(0)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _ref.backward_elemt(dy, x, mean, invstd, weight, g_dy, g_dy_xhat, count.reshape(1), mask, 0)
        dweight = sum_dy_xhat[0].to(weight.dtype) if ctx.has_weight and ctx.needs_input_grad[1] else None
        dbias = sum_dy[0].to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None


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

    def _normalize(self, x: Tensor, mask: Tensor | None, normalize_with_batch: bool,
                   update: bool) -> tuple[Tensor, Tensor | bool | None]:
        if not normalize_with_batch or _world(self.process_group) == 1:
            return super()._normalize(x, mask, normalize_with_batch, update)
        weight, bias = self._affine()
        # rank-local checks only; "more than one value" is checked on the global count
        F.check_input(x, self.running_mean, self.running_var, weight, bias, eps=self.eps, mask=mask)
        if self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}; use e.g. eps=1e-5")
        kmask = F._mask_for_kernels(mask, x)
        y, mean, var, count = _SyncBatchNormFunction.apply(x, weight, bias, kmask, self.eps, self.process_group)
        accepted = None
        if update:
            assert self.running_mean is not None and self.running_var is not None
            accepted = F.update_running_stats(
                self.running_mean, self.running_var, F.Stats(mean, var, count),
                self._momentum_factor(), self.nonfinite,
            )
        return y, accepted

    # -- torch.nn.SyncBatchNorm compatibility --------------------------------------------------

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, without mutating ``module``:
        returns a copy whose BN layers (ours or torch's) are :class:`SyncBatchNorm`."""
        from ..tools.convert import convert

        return convert(module, "sync", process_group=process_group)

    @classmethod
    def revert_sync_batchnorm(cls, module: nn.Module) -> nn.Module:
        """The inverse of :meth:`convert_sync_batchnorm`: each :class:`SyncBatchNorm` back to the
        class it was converted from (default: our :class:`BatchNorm1d`/``2d``/``3d`` by no rank ->
        :class:`BatchNorm` with ``axis=1``)."""
        from ..tools.convert import convert

        return convert(module, "revert")
