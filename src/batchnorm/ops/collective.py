"""Training-mode batch norm over several processes: the statistics of the whole distributed batch,
reduced by a :class:`Collective` hook (``SyncBatchNorm`` passes one over ``torch.distributed``).

Each process computes the count, mean and biased variance of its part; the hook merges them
exactly into the global statistics; every process normalizes its part with those. The backward
sums ``sum(dy)`` and ``sum(dy * xhat)`` over the processes with the hook and applies the
closed-form input gradient with the global count; the parameter gradients are each process's own
share (their sum over processes is the full-batch gradient, as with ``torch.nn.SyncBatchNorm``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from ..kernels import reference as _ref


class Collective(Protocol):
    """The cross-process reduction that :func:`collective_train` calls."""

    def gather_stats(self, mean: Tensor, var: Tensor, count: Tensor, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The global ``(mean, var, count)`` (float64, identical in every process) from this
        process's ``(C,)`` mean and biased variance and its 0-d count; ``dtype`` is the input's
        (processes that disagree on it or on ``C`` must all raise)."""

    def sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the processes (may be computed in place)."""


class _CollectiveTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None,
                mask: Tensor | None, collective: Collective) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        acc = _ref.acc_dtype(x.dtype)
        mean, var, count = _ref.stats(x, mask, 0)  # (1, C), (1, C), (1,)
        has = count > 0  # an empty process contributes count 0 (its mean/var are NaN: drop them)
        mean = torch.where(has.unsqueeze(1), mean, torch.zeros_like(mean))
        var = torch.where(has.unsqueeze(1), var, torch.zeros_like(var))
        g_mean, g_var, g_count = collective.gather_stats(mean[0], var[0], count[0], x.dtype)
        gmean = g_mean.to(acc).unsqueeze(0)
        invstd = _ref.inverse_std(g_var.to(acc), eps).unsqueeze(0)
        y = _ref.normalize(x, gmean, invstd, weight, bias, 0)
        ctx.save_for_backward(x, weight, gmean, invstd, g_count, mask)
        ctx.collective = collective
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(g_mean, g_var, g_count)
        return y, g_mean, g_var, g_count

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_stat_grads: Tensor) -> tuple:
        x, weight, mean, invstd, count, mask = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        sum_dy, sum_dy_xhat = _ref.backward_reduce(dy, x, mean, invstd, 0)  # (1, C) each, local
        c = sum_dy.shape[1]
        packed = ctx.collective.sum(torch.cat([sum_dy.reshape(-1), sum_dy_xhat.reshape(-1)]).double())
        g_dy, g_dy_xhat = packed[:c].unsqueeze(0), packed[c:].unsqueeze(0)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _ref.backward_elemt(dy, x, mean, invstd, weight, g_dy, g_dy_xhat, count.reshape(1), mask, 0)
        dweight = sum_dy_xhat[0].to(weight.dtype) if ctx.has_weight and ctx.needs_input_grad[2] else None
        dbias = sum_dy[0].to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, dweight, dbias, None, None


def collective_train(x: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None,
                     collective: Collective) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, count)``: ``x`` normalized with the statistics of the batch of every
    process (``mean``/``var`` ``(C,)`` float64, ``count`` 0-d); ``mask`` in the kernels' form."""
    return _CollectiveTrain.apply(x, eps, weight, bias, mask, collective)  # type: ignore[no-any-return]
