"""Reference backend for batch norm fused with an activation (and a residual add).

``z = bn(x) + residual`` (the residual is optional), ``y = act(z)`` with ``act`` one of
:data:`ACTIVATIONS`. The backward recomputes ``z`` from the saved input (and residual) instead
of storing it: ``g = dy * act'(z)`` is the gradient of the residual, and the batch-norm
backward of :mod:`batchnorm.kernels.reference` runs on ``g``.

Fast backends implement the same functions (``forward_train_act``, ``forward_apply_act``,
``backward_train_act``, ``backward_apply_act``) and say so through ``supports(op, ...)``; this
module is the fallback and the ground truth they are tested against. It supports every
dtype, layout, mask and ghost batch size that :mod:`~batchnorm.kernels.reference` does.

The in-place activated mode (Rota Bulo et al. 2018) saves only the output ``y``: for an
invertible activation, ``z = act^{-1}(y)`` and ``xhat = (z - beta) / gamma`` give back all
the backward needs (:func:`backward_inplace`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor

from . import reference as ref

name = "reference_act"

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "gelu")
INVERTIBLE = ("identity", "leaky_relu")


def check_activation(act: str, slope: float = 0.01) -> str:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return act


def activation(z: Tensor, act: str, slope: float) -> Tensor:
    """``act(z)``; gelu is the exact (erf) form, as ``torch.nn.GELU()``."""
    if act == "relu":
        return torch.relu(z)
    if act == "leaky_relu":
        return TF.leaky_relu(z, slope)
    if act == "silu":
        return TF.silu(z)
    if act == "gelu":
        return TF.gelu(z)
    return z


def activation_grad(z: Tensor, act: str, slope: float) -> Tensor:
    """``d act / d z`` at ``z`` (relu/leaky_relu: the right derivative at 0 is not used, 0/slope)."""
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "gelu":
        return 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(
            2 * math.pi
        )
    return torch.ones_like(z)


def inverse(y: Tensor, act: str, slope: float) -> Tensor:
    """``act^{-1}(y)`` for the invertible activations (leaky_relu needs ``slope > 0``)."""
    if act == "leaky_relu":
        return torch.where(y >= 0, y, y / slope)
    if act == "identity":
        return y
    raise ValueError(f"in-place activated batch norm needs an invertible activation {INVERTIBLE}, got {act!r}")


def _pre_activation(x, mean, invstd, weight, bias, residual, vbs):
    """``z = bn(x) [+ residual]`` in the accumulation dtype, computed on ``x`` itself (no view)."""
    acc = ref.acc_dtype(x.dtype)
    n, nd = x.shape[0], x.dim()
    scale = invstd.to(acc) if weight is None else invstd.to(acc) * weight.to(acc)
    z = (x.to(acc) - ref.per_sample(mean.to(acc), n, vbs, nd)) * ref.per_sample(scale, n, vbs, nd)
    if bias is not None:
        z = z + ref.per_feature(bias.to(acc), nd)
    if residual is not None:
        z = z + residual.to(acc)
    return z


def forward_train_act(x, residual, eps, weight, bias, mask, vbs, act, slope, running=None):
    """Training forward: ``(act(bn(x) + residual), mean, var, count)`` (statistics as the
    reference); ``running`` as :func:`batchnorm.kernels.reference.forward_train`."""
    mean, var, count = ref.stats(x, mask, vbs)
    z = _pre_activation(x, mean, ref.inverse_std(var, eps), weight, bias, residual, vbs)
    y = ref._match_layout(activation(z, act, slope).to(x.dtype), x)
    if running is not None:
        ref.update_running(running, mean, var, x.numel() // x.shape[1])
    return y, mean, var, count


def forward_apply_act(x, residual, mean, var, eps, weight, bias, act, slope):
    """With given ``(C,)`` statistics: ``act(bn(x) + residual)``."""
    z = _pre_activation(x, mean.unsqueeze(0), ref.inverse_std(var, eps).unsqueeze(0), weight, bias, residual, 0)
    return ref._match_layout(activation(z, act, slope).to(x.dtype), x)


def backward_train_act(dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    """``(dx, dweight, dbias, dresidual)`` from the training statistics ``(mean, var)`` and
    ``eps``; ``dresidual = dy * act'(z)`` (or ``None``)."""
    z = _pre_activation(x, mean, ref.inverse_std(var, eps), weight, bias, residual, vbs)
    g = dy.to(z.dtype) * activation_grad(z, act, slope)
    dx, dw, db = ref.backward_train(g, x, mean, var, eps, weight, mask, count, vbs, need_input_grad)
    dr = ref._match_layout(g.to(x.dtype), x) if need_residual_grad else None
    return dx, dw, db, dr


def backward_apply_act(dy, x, residual, mean, var, eps, weight, bias, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    """Backward with constant statistics: ``(dx, dweight, dbias, dresidual)``."""
    z = _pre_activation(x, mean.unsqueeze(0), ref.inverse_std(var, eps).unsqueeze(0), weight, bias, residual, 0)
    g = dy.to(z.dtype) * activation_grad(z, act, slope)
    dx, dw, db = ref.backward_apply(g, x, mean, var, eps, weight, need_input_grad)
    dr = ref._match_layout(g.to(x.dtype), x) if need_residual_grad else None
    return dx, dw, db, dr


def recover(y: Tensor, weight: Tensor | None, bias: Tensor | None, act: str, slope: float
            ) -> tuple[Tensor, Tensor]:
    """From the output of the in-place mode: ``(xhat, act'(z))`` in the accumulation dtype."""
    acc = ref.acc_dtype(y.dtype)
    z = inverse(y.to(acc), act, slope)
    shape = (1, -1, *([1] * (y.dim() - 2)))
    xhat = z
    if bias is not None:
        xhat = xhat - bias.to(acc).reshape(shape)
    if weight is not None:
        xhat = xhat / weight.to(acc).reshape(shape)
    return xhat, activation_grad(z, act, slope)


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    return True
