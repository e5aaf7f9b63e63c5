"""The operators' entry points under their earlier module name; they live in :mod:`batchnorm.ops`
(the one operator family, plain and fused)."""

from .ops import apply, graph_backward, owned, train, train_lean, transformed
from .ops.base import _tracing, eager_entry, impl_or_op
from .ops.plain import _train_backward_impl, _train_grad, _TrainLean

__all__ = ["_TrainLean", "_tracing", "_train_backward_impl", "_train_grad", "apply", "eager_entry", "graph_backward",
           "impl_or_op", "owned", "train", "train_lean", "transformed"]
