"""The layers' lean eager paths: a layer's common call with the fewest Python steps.

:func:`layer_call_aten` (small inputs on ATen's kernel, read straight from the layer's state),
:func:`layer_call_lean` (training and inference) and :func:`eval_lean` (inference) return ``None`` where they
do not apply, and the layer then runs :func:`batchnorm.functional.batch_norm_with_update`, which computes the
same; ``tests/core/test_lean_paths.py`` checks them against torch's layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import kernels, ops
from .functional import _report_nonfinite
from .kernels import aten as _aten
from .kernels import reference as _ref

__all__ = ["eval_lean", "layer_call_aten", "layer_call_lean"]

_LEAN_DTYPES = (torch.float32, torch.float64)


def _sizes_fit(c: int, *tensors: Tensor | None) -> bool:
    return all(t is None or t.numel() == c for t in tensors)


def layer_call_aten(layer: Any, x: Tensor) -> Tensor | None:
    """A layer's call on a small CPU input by ATen's kernel, or ``None`` (the layer then takes its
    other paths, which compute the same and raise the errors).

    The caller (``_NormBase.forward``) has checked that the layer is plain batch norm on axis 1
    with no mask; its parameters and buffers are read from their dictionaries, not through
    ``nn.Module``'s attribute lookup, because at these sizes every microsecond of Python counts (torch's own
    layer spends ~10 us around a ~45 us kernel at (256, 100)). It applies in eager mode with no
    transform and no forced backend, to a ``torch.Tensor`` of a rank the layer takes with
    ``num_features`` channels, whose per-channel tensors are in its dtype, with ``eps > 0``:

    * training (batch statistics; no ghost batches, no frozen statistics, gamma/beta trained, a
      number for momentum) when :func:`batchnorm.kernels.aten.trains` says so: a 2-D ``(N, C)``
      input up to ``TRAIN_MAX_NUMEL`` values. The running statistics move in the same call, a
      non-finite batch leaves them unchanged unless ``nonfinite="propagate"``
      (:func:`batchnorm.kernels.aten.train`), and ``num_batches_tracked`` counts accepted batches;
    * inference with the running statistics (no update) when the dispatcher would pick the ``aten``
      backend for ``forward_apply``.
    """
    if type(x) is not Tensor or x.device.type != "cpu" or x.dtype not in _LEAN_DTYPES:
        return None
    params, buffers = layer._parameters, layer._buffers
    dims, rank = layer._valid_dims, x.dim()
    eps = layer.eps
    if ((dims and rank not in dims) or rank < 2 or x.shape[1] != layer.num_features or not layer._train_affine
            or not eps > 0 or "aten" in kernels._disabled):
        return None
    weight, bias = params["weight"], params["bias"]
    rm, rv = buffers["running_mean"], buffers["running_var"]
    if layer.training:
        # _aten.trains(x), of which the checks above made the rest
        if (layer.virtual_batch_size or layer.use_running_stats or rank != 2 or x.shape[0] < 2
                or x.numel() > _aten.TRAIN_MAX_NUMEL):
            return None
        update = rm is not None and rv is not None and layer.track_running_stats and layer.update_running_stats
        momentum = layer.momentum if update else 0.0
        if (momentum is None or not _aten.params_fit(x, weight, bias, *((rm, rv) if update else ()))
                or (update and (rm.requires_grad or rv.requires_grad))
                or kernels.get_backend() != "auto" or ops.tracing() or ops.transformed()):
            return None
        nonfinite = layer.nonfinite
        guard = None
        if update and nonfinite != "propagate":
            guard = layer.__dict__.get("_aten_guard")
            if guard is None:
                guard = layer.__dict__["_aten_guard"] = _aten.Guard()
        y, accepted = _aten.train(x, weight, bias, rm if update else None, rv if update else None, momentum, eps,
                                  guard, buffers.get("num_batches_tracked") if update else None)
        if not accepted:
            _report_nonfinite(nonfinite, stacklevel=3)  # the layer's forward, as the general path
        return y
    if rm is None or rv is None:
        return None
    return eval_lean(x, rm, rv, weight, bias, eps)


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
    return torch.native_batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
