"""Frozen batch normalization: buffers only, for inference and fine-tuning backbones."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .freeze import num_features


class FrozenBatchNorm(nn.Module):
    """BN with fixed statistics and affine parameters, all stored as buffers; the base of
    :class:`FrozenBatchNorm1d`/``2d``/``3d`` (which check the input's rank), any rank itself.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``. Loads the state dict of
    a ``torch.nn.BatchNorm*``, a torchvision ``FrozenBatchNorm2d`` or one of ours exactly
    (``num_batches_tracked`` is ignored); ``eps`` is whatever you pass, never adjusted.
    """

    _valid_dims: tuple[int, ...] = ()
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_module(cls, bn: Any) -> FrozenBatchNorm:
        """A frozen copy of any batch-norm layer (ours, torch's, torchvision's frozen one) with running
        statistics; what a fused layer applies after normalizing is not part of it."""
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False) to freeze")
        rm: Tensor = bn.running_mean  # type: ignore[assignment]
        frozen = cls(num_features(bn), eps=bn.eps, device=rm.device, dtype=rm.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(rm)
            frozen.running_var.copy_(bn.running_var)
            if getattr(bn, "weight", None) is not None:
                frozen.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, input: Tensor) -> Tensor:
        if self._valid_dims and input.dim() not in self._valid_dims:
            wanted = " or ".join(f"{d}D" for d in self._valid_dims)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input) in {type(self).__name__}")
        F.check_input(input, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps)
        return F.apply_stats(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


class FrozenBatchNorm1d(FrozenBatchNorm):
    """Frozen BN over 2D or 3D input."""

    _valid_dims = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Frozen BN over 4D input (torchvision's ``FrozenBatchNorm2d`` checkpoints load exactly)."""

    _valid_dims = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """Frozen BN over 5D input."""

    _valid_dims = (5,)
