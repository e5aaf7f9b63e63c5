"""The layers' lean eager paths: a layer's common call with the fewest Python steps.

:func:`layer_call_lean` (training and inference) and :func:`eval_lean` (inference) return ``None`` where they
do not apply, and the layer then runs :func:`batchnorm.functional.batch_norm_with_update`, which computes the
same; ``tests/core/test_lean_paths.py`` checks both against torch's layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels, ops
from .functional import _report_nonfinite
from .kernels import aten as _aten
from .kernels import reference as _ref

__all__ = ["eval_lean", "layer_call_lean"]

_LEAN_DTYPES = (torch.float32, torch.float64)


def _sizes_fit(c: int, *tensors: Tensor | None) -> bool:
    return all(t is None or t.numel() == c for t in tensors)


def layer_call_lean(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                    bias: Tensor | None, *, normalize_with_batch: bool, update: bool, momentum: float | Tensor,
                    eps: float, nonfinite: str) -> tuple[Tensor, bool | None] | None:
    """A layer's common call with the fewest Python steps, or ``None`` where it does not apply (the
    caller then runs :func:`batch_norm_with_update`, which computes the same).

    It applies in eager mode with no transform, on dense float32/float64 CPU input (features on
    axis 1, no mask, no ghost batches: the caller checks those and the input's rank and channel
    count) whose checks pass (otherwise the general path raises its errors):

    * training, when the dispatcher picks a backend with ``train_lean`` (the cpu one) for
      ``forward_train``: its kernel computes the output and moves the running statistics in one
      call (:func:`batchnorm.ops.train_lean`; the same gradients as :data:`batchnorm.ops.train`'s),
      with a number for momentum;
    * inference without an update, when the dispatcher picks the ``aten`` backend (small tensors,
      see :mod:`batchnorm.kernels.aten`): ``torch.batch_norm`` with its own autograd, the running
      statistics as constants.

    Returns ``(y, accepted)`` as :func:`batch_norm_with_update` with ``accepted_tensor=False``."""
    if (x.device.type != "cpu" or x.dtype not in _LEAN_DTYPES or ops.tracing() or ops.transformed()
            or x.numel() == 0 or eps < 0):
        return None
    c = x.shape[1]
    if normalize_with_batch:
        if (eps == 0 or x.numel() // c < 2 or isinstance(momentum, (Tensor, bool))
                or not _sizes_fit(c, weight, bias, running_mean, running_var)):
            return None
        backend = kernels.select("forward_train", x)
        if not hasattr(backend, "train_lean"):
            return None
        if not update:
            return ops.train_lean(x=x, eps=eps, weight=weight, bias=bias, backend=backend, running=None), None
        running = _ref.Running(running_mean, running_var, momentum,  # type: ignore[arg-type]
                               skip_nonfinite=nonfinite != "propagate")
        y = ops.train_lean(x=x, eps=eps, weight=weight, bias=bias, backend=backend, running=running)
        if not running.accepted:
            _report_nonfinite(nonfinite, stacklevel=3)  # the layer's forward, as the general path
        return y, running.accepted
    if update or running_mean is None or running_var is None:
        return None
    out = eval_lean(x, running_mean, running_var, weight, bias, eps)
    return None if out is None else (out, None)


def eval_lean(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
              eps: float) -> Tensor | None:
    """Inference with the running statistics by ``torch.batch_norm`` (its own autograd, the
    statistics as constants) when the dispatcher would pick the ``aten`` backend for it, in eager
    mode with no transform and no forced backend; else ``None`` (the caller takes the general
    path). The caller has checked the input's rank and channel count; the per-channel tensors are
    checked here (:func:`batchnorm.kernels.aten.params_fit`)."""
    if (not _aten.supports("forward_apply", x) or eps < 0 or kernels.get_backend() != "auto"
            or "aten" in kernels._disabled or ops.tracing() or ops.transformed()
            or running_mean.requires_grad or running_var.requires_grad
            or not _aten.params_fit(x, running_mean, running_var, weight, bias)):
        return None
    return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)
