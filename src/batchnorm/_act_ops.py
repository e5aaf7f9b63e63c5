"""The fused operators' entry points under their earlier module name; they live in
:mod:`batchnorm.ops.act` (the one operator family :mod:`batchnorm.ops`)."""

from .ops.act import act_apply, act_inplace_train, act_train

__all__ = ["act_apply", "act_inplace_train", "act_train"]
