"""ATen backend: torch's own batch-norm kernel for small CPU inference calls, and for small
``(N, C)`` training calls of the layers' lean path.

Normalizing a small tensor with given statistics costs less in ATen's single C++ call than in
any of our backends, whose fixed cost (a numba call, or the reference path's ~5 torch calls) is
larger than the arithmetic below :data:`MAX_NUMEL` values. Measured on the 2-core EPYC (load
~4.5), (256, 100) float32, median per call of ``torch.batch_norm(..., training=False)`` against
the cpu backend's ``forward_apply`` in one process, interleaved: 14.4 vs 21.5 us (1 thread),
13.0 vs 23.7 us (2 threads).

Training: for a 2-D ``(N, C)`` input of at most :data:`TRAIN_MAX_NUMEL` values (the common
``Linear -> BatchNorm1d`` of an MLP) a layer's eager call costs more in the Python around our
kernels (an ``autograd.Function``, a numba call of ~20 arguments, ~100 us at (256, 100)) than in
the arithmetic; there the layers call :func:`train` (ATen's kernel with its own autograd,
the running statistics moved in the same call) from :func:`batchnorm._lean.layer_call_aten`,
with our non-finite guard around it. The operators and every other path are unchanged.

Only ``forward_apply`` (inference, frozen statistics) runs here as an operator; the dispatcher passes every
other op, and larger tensors, to the next backend (the other entry points of the backend
contract, :class:`batchnorm.kernels.protocol.Backend`, are the reference backend's).
ATen's kernel (``torch.native_batch_norm``: what ``torch.batch_norm`` runs on the CPU, without
its dispatch through ``_batch_norm_impl_index``, 0.3-0.5 us a call) with ``training=False`` computes
``(x - mean) * (1 / sqrt(var + eps)) * weight + bias`` with the statistics as given,
as :func:`batchnorm.kernels.reference.forward_apply` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import native, reference, register_backend

name = "aten"

#: Largest input (values) that runs here; larger ones go to the cpu backend, which is faster for
#: them (eval 1.07-1.14x ATen at (32, 64, 56, 56); docs/performance.md).
MAX_NUMEL = 1 << 17
_DTYPES = (torch.float32, torch.float64)


def forward_apply(x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None,
                  bias: Tensor | None) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` by ATen's kernel (by the reference
    backend when a per-channel tensor is not ``(C,)`` in ``x``'s dtype, which ATen does not take)."""
    if not params_fit(x, mean, var, weight, bias):
        return reference.forward_apply(x, mean, var, eps, weight, bias)
    return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]


forward_train = reference.forward_train
backward_train = reference.backward_train
backward_apply = reference.backward_apply


#: Largest 2-D ``(N, C)`` training input that the layers' lean path gives ATen (see :func:`trains`).
#: Layer forward+backward, torch's time / ours, ATen route vs our numba route, EPYC-2 idle,
#: 2026-12-04 (``python benchmarks/first_call_bench.py --only rows``): 2 threads (512, 256) 0.87x
#: vs 0.59x, (1024, 256) 0.90x vs 0.77x, (2048, 256) 0.90x vs 0.80x, (8192, 512) 0.86x vs 1.15x;
#: 1 thread (2048, 256) 1.12x vs 1.26x: ATen's route wins below ~2^18-2^21 values depending on
#: the threads, ours above.
TRAIN_MAX_NUMEL = 1 << 18


def trains(x: Tensor) -> bool:
    """Whether the layers' lean path trains on ``x`` with :func:`train`: a 2-D ``(N, C)``
    float32/float64 CPU tensor of at least 2 rows and at most :data:`TRAIN_MAX_NUMEL` values."""
    return (x.dim() == 2 and x.device.type == "cpu" and x.dtype in _DTYPES and x.shape[0] >= 2
            and x.numel() <= TRAIN_MAX_NUMEL)


class Guard:
    """What :func:`train`'s non-finite guard keeps between one layer's calls: numpy views of its
    running statistics, made again when a buffer is replaced or moved (another tensor, address or
    dtype). At (256, 100) the guard is most of what the layer's call adds to torch's; views made
    once, and a dot product with zeros (NaN whenever a value is NaN or infinite, and no overflow)
    instead of ``isfinite(...).all()``, make it cheaper (docs/performance.md). Copying or pickling
    a layer gives its copy an empty guard (the views belong to the original's buffers)."""

    __slots__ = ("_mean", "_var", "_ptrs", "_dtype", "_views", "_zeros")

    def __init__(self) -> None:
        self._mean: Tensor | None = None
        self._var: Tensor | None = None
        self._ptrs: tuple[int, int] = (0, 0)
        self._dtype: torch.dtype | None = None
        self._views: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))
        self._zeros: np.ndarray = np.zeros(0)

    def __reduce__(self) -> tuple:
        return (Guard, ())

    def views(self, mean: Tensor, var: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Numpy views of ``mean`` and ``var`` (buffers: no grad to detach from)."""
        if not (self._mean is mean and self._var is var and self._dtype is mean.dtype
                and self._ptrs == (mean.data_ptr(), var.data_ptr())):
            self._mean, self._var, self._dtype = mean, var, mean.dtype
            self._ptrs = (mean.data_ptr(), var.data_ptr())
            self._views = (mean.numpy(), var.numpy())
            self._zeros = np.zeros_like(self._views[1])
        return self._views

    def finite(self, var_view: np.ndarray) -> bool:
        """Whether every value of ``var_view`` (one of :meth:`views`) is finite."""
        return math.isfinite(var_view.dot(self._zeros))


def train(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
          running_var: Tensor | None, momentum: float, eps: float, guard: Guard | None,
          num_batches_tracked: Tensor | None = None) -> tuple[Tensor, bool]:
    """Training-mode batch norm by ATen's kernel and autograd (``torch.native_batch_norm``, what
    ``torch.batch_norm`` calls on the CPU after checks that :func:`params_fit` has made): ``(y, accepted)``.

    The running statistics (both or neither; ``x``'s dtype, ``C`` values: :func:`params_fit`; not
    requiring grad) move in the same call, ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    batch variance, as :func:`batchnorm.kernels.reference.update_running`, and ``num_batches_tracked`` (if given)
    counts the accepted batches. With a ``guard``, a batch whose statistics are not finite leaves them as they were
    (``accepted`` False): ATen's variance is NaN or inf whenever its mean is (an inf value gives ``inf - inf``), so
    the updated running statistics tell, and the values kept before the call are put back. The guarded call is
    :mod:`batchnorm.kernels.native`'s single C++ call once it is built and loaded, else the same steps here
    (numpy views kept in ``guard``)."""
    if running_mean is None or running_var is None or guard is None:
        y = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)[0]
        accepted = True
    else:
        call = native.NATIVE.request()
        if call is not None:
            return call(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
        mean_now, var_now = guard.views(running_mean, running_var)
        kept = mean_now.copy(), var_now.copy()
        y = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)[0]
        accepted = guard.finite(var_now)
        if not accepted:
            mean_now[:] = kept[0]
            var_now[:] = kept[1]
    if accepted and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y, accepted


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
