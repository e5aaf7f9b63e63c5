"""ATen backend: torch's own batch-norm kernel for small CPU inference calls.

Normalizing a small tensor with given statistics costs less in ATen's single C++ call than in
any of our backends, whose fixed cost (a numba call, or the reference path's ~5 torch calls) is
larger than the arithmetic below :data:`MAX_NUMEL` values. Measured on the 2-core EPYC, 2
threads, (256, 100) float32, median per call: ATen 13-15 us, the cpu backend 21-24 us, in the
same process (``python benchmarks/first_call_bench.py --only small``).

Only ``forward_apply`` (inference, frozen statistics) runs here; the dispatcher passes every
other op, and larger tensors, to the next backend. ``torch.batch_norm`` with ``training=False``
computes ``(x - mean) * (1 / sqrt(var + eps)) * weight + bias`` with the statistics as given,
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


def params_fit(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether ATen takes these per-channel tensors with ``x`` as they are: each ``None`` or a
    ``(C,)`` tensor of ``x``'s dtype."""
    c = x.shape[1]
    for t in tensors:
        if t is not None and (t.dtype != x.dtype or t.shape != (c,)):
            return False
    return True


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """Inference (``forward_apply``) on dense float32/float64 CPU tensors of at most :data:`MAX_NUMEL` values."""
    return (op == "forward_apply" and x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() >= 2
            and 0 < x.numel() <= MAX_NUMEL and mask is None)


register_backend(name, __import__(__name__, fromlist=["name"]), priority=40)
