"""An independent float64 statement of batch normalization, for the tests.

Written differently from the library (channel-major matrices and ``torch.var``) so that a
shared mistake is unlikely.
"""

from __future__ import annotations

import torch


def channel_matrix(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """(N, C, *) -> (C, N * prod(*)) in float64."""
    return x.double().movedim(axis, 0).reshape(x.shape[axis], -1)


def bn_train(x, weight=None, bias=None, eps=1e-5, axis=1):
    """Algorithm 1 in float64; returns (y, mean, biased var, unbiased var)."""
    xm = channel_matrix(x, axis)
    mean = xm.mean(1)
    var = xm.var(1, unbiased=False)
    var_u = xm.var(1, unbiased=True) if xm.shape[1] > 1 else torch.full_like(var, float("nan"))
    shape = [1] * x.dim()
    shape[axis] = -1
    y = (x.double() - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y, mean, var, var_u


def bn_eval(x, rm, rv, weight=None, bias=None, eps=1e-5, axis=1):
    shape = [1] * x.dim()
    shape[axis] = -1
    y = (x.double() - rm.double().view(shape)) / torch.sqrt(rv.double().view(shape) + eps)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny): a relative error bound for whole tensors."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
