"""ATen backend: torch's own batch-norm kernel for small CPU inference calls.

Normalizing a small tensor with given statistics costs less in ATen's single C++ call than in
any of our backends, whose fixed cost (a numba call, or the reference path's ~5 torch calls) is
larger than the arithmetic below :data:`MAX_NUMEL` values. Measured on the 2-core EPYC (load
~4.5), (256, 100) float32, median per call of ``torch.batch_norm(..., training=False)`` against
the cpu backend's ``forward_apply`` in one process, interleaved: 14.4 vs 21.5 us (1 thread),
13.0 vs 23.7 us (2 threads).

Only ``forward_apply`` (inference, frozen statistics) runs here; the dispatcher passes every
other op, and larger tensors, to the next backend (the other entry points of the backend
contract, :class:`batchnorm.kernels.protocol.Backend`, are the reference backend's).
``torch.batch_norm`` with ``training=False`` computes
``(x - mean) * (1 / sqrt(var + eps)) * weight + bias`` with the statistics as given,
as :func:`batchnorm.kernels.reference.forward_apply` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference, register_backend

name = "aten"

#: Largest input (values) that runs here; larger ones go to the cpu backend, which is faster for
#: them (eval 1.07-1.14x ATen at (32, 64, 56, 56); docs/performance.md).
MAX_NUMEL = 1 << 17
_DTYPES = (torch.float32, torch.float64)


def forward_apply(x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None,
                  bias: Tensor | None) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` by ``torch.batch_norm`` (by the reference
    backend when a per-channel tensor is not ``(C,)`` in ``x``'s dtype, which ATen does not take)."""
    if not params_fit(x, mean, var, weight, bias):
        return reference.forward_apply(x, mean, var, eps, weight, bias)
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


forward_train = reference.forward_train
backward_train = reference.backward_train
backward_apply = reference.backward_apply


def params_fit(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether ATen takes these per-channel tensors with ``x`` as they are: each ``None`` or a
    tensor of ``C`` values in ``x``'s dtype (ATen checks the number of values, as ours)."""
    c, dt = x.shape[1], x.dtype
    for t in tensors:
        if t is not None and (t.dtype != dt or t.numel() != c):
            return False
    return True


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """Inference (``forward_apply``) on dense float32/float64 CPU tensors of at most :data:`MAX_NUMEL` values."""
    return (op == "forward_apply" and x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() >= 2
            and 0 < x.numel() <= MAX_NUMEL and mask is None)


register_backend(name, __import__(__name__, fromlist=["name"]), priority=40)
