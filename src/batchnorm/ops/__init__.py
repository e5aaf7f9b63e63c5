"""The batch-norm operators: one family of ``torch.library`` custom ops, plain and fused.

* :mod:`.plain`: ``batchnorm::train_forward`` / ``apply_forward`` (and their backward ops):
  normalization with the batch's statistics (Algorithm 1, per ghost group) or with given ones
  (Algorithm 2, frozen statistics); the layers' lean eager route (:func:`train_lean`).
* :mod:`.act`: the same two forms fused with an activation and an optional residual add
  (``batchnorm::act_train_forward`` / ``act_apply_forward``), and the in-place activated training
  form (``batchnorm::act_inplace_train_forward``). Plain batch norm is their identity case;
  :func:`batchnorm.functional.batch_norm_with_update` routes that case to the plain ops, whose
  kernels are the fastest.
* :mod:`.collective`: training across processes, the statistics reduced by a hook
  (:class:`Collective`; ``SyncBatchNorm`` passes ``torch.distributed``'s).

Every op runs on the backend that :func:`batchnorm.kernels.select` picks (the fused ones on
:mod:`batchnorm.kernels.reference_act` when that backend lacks them), has a fake (meta)
implementation for ``torch.compile``/``torch.export``, and an autograd formula that calls the
matching backward op. In eager mode each enters through :func:`.base.eager_entry`.
"""

from __future__ import annotations

from .act import act_apply, act_inplace_train, act_train
from .base import _tracing as tracing
from .base import graph_backward, owned, transformed
from .collective import Collective, collective_train
from .plain import apply, train, train_lean

__all__ = [
    "Collective",
    "act_apply",
    "act_inplace_train",
    "act_train",
    "apply",
    "collective_train",
    "graph_backward",
    "owned",
    "tracing",
    "train",
    "train_lean",
    "transformed",
]
