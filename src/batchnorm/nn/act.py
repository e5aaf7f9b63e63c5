"""Batch norm fused with an activation (and a residual add): one kernel pass forward.

``BatchNormAct2d(64, act="relu")`` computes ``relu(bn(x))``; ``layer(x, residual)`` computes
``relu(bn(x) + residual)`` (the residual block's tail), and :class:`BatchNormAddAct2d` makes the
residual mandatory. The backward recomputes the activation's derivative from the saved input, so
no pre-activation tensor is stored.

``inplace_abn=True`` is the in-place activated mode of Rota Bulo et al. (2018), "In-Place
Activated BatchNorm for Memory-Optimized Training of DNNs": for an invertible activation
(``"leaky_relu"`` with a positive slope, or ``"identity"``) autograd keeps only the output and
the backward recovers ``xhat = (act^{-1}(y) - beta) / gamma`` from it, so the input of the layer
is not kept alive for the backward. Every ``gamma`` must be non-zero (checked); no residual, no
ghost batches in that mode.

Everything else (running statistics, freezing knobs, masks, ghost batches, ``nonfinite``) is the
:class:`~batchnorm.nn.modules._NormBase` behaviour: the layer calls the one functional path,
:func:`batchnorm.functional.batch_norm_with_update`, with its activation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import functional as F
from .modules import _NormBase


class _BatchNormActBase(_NormBase):
    """Batch norm + activation (+ residual) with the state and knobs of :class:`_NormBase`."""

    def __init__(self, num_features: int, act: str = "relu", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device: Any = None, dtype: Any = None, *, negative_slope: float = 0.01,
                 inplace_abn: bool = False, **kwargs: Any) -> None:
        F.check_activation(act)
        if inplace_abn:
            if act not in F.INVERTIBLE:
                raise ValueError(
                    f"inplace_abn=True needs an invertible activation {F.INVERTIBLE}, got act={act!r}; "
                    "use act='leaky_relu' (Rota Bulo et al. use slope 0.01) or inplace_abn=False"
                )
            if act == "leaky_relu" and not negative_slope > 0:
                raise ValueError(f"inplace_abn=True needs negative_slope > 0, got {negative_slope}")
            if kwargs.get("virtual_batch_size"):
                raise ValueError("inplace_abn=True does not support virtual_batch_size (ghost batches)")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.act = act
        self.negative_slope = float(negative_slope)
        self.inplace_abn = bool(inplace_abn)

    def extra_repr(self) -> str:
        extra = f", act={self.act!r}"
        if self.act == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        if self.inplace_abn:
            extra += ", inplace_abn=True"
        return super().extra_repr() + extra

    def forward(self, input: Tensor, residual: Tensor | None = None,  # type: ignore[override]
                mask: Tensor | None = None) -> Tensor:
        """``act(bn(input) + residual)``; ``mask`` marks valid positions as in :class:`BatchNorm1d`."""
        self._check_input_dim(input)
        normalize_with_batch, update = self._modes()
        y, accepted = self._normalize_act(input, residual, mask, normalize_with_batch, update)
        self._count_batch(accepted)
        return y

    def _normalize(self, x: Tensor, mask: Tensor | None, normalize_with_batch: bool, update: bool,
                   **path: Any) -> tuple[Tensor, Tensor | bool | None]:
        return super()._normalize(x, mask, normalize_with_batch, update, act=self.act,
                                  negative_slope=self.negative_slope, inplace_abn=self.inplace_abn, **path)

    def _normalize_act(self, x: Tensor, residual: Tensor | None, mask: Tensor | None,
                       normalize_with_batch: bool, update: bool) -> tuple[Tensor, Tensor | bool | None]:
        # an empty batch goes through the ops (empty output, zero gradients for gamma and beta),
        # leaves the running statistics alone and counts as a batch (F.empty_batch_update)
        return self._normalize(x, mask, normalize_with_batch, update, residual=residual)


class BatchNormAct1d(_BatchNormActBase):
    """``act(BatchNorm1d(x) [+ residual])`` on ``(N, C)`` or ``(N, C, L)``, fused."""

    _valid_dims = (2, 3)


class BatchNormAct2d(_BatchNormActBase):
    """``act(BatchNorm2d(x) [+ residual])`` on ``(N, C, H, W)``, fused (NCHW or channels_last)."""

    _valid_dims = (4,)


class BatchNormAct3d(_BatchNormActBase):
    """``act(BatchNorm3d(x) [+ residual])`` on ``(N, C, D, H, W)``, fused."""

    _valid_dims = (5,)


class _AddActMixin:
    def forward(self, input: Tensor, residual: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``act(bn(input) + residual)``: the tail of a residual block in one pass."""
        if residual is None:
            raise TypeError(f"{type(self).__name__} needs a residual: layer(x, residual)")
        return super().forward(input, residual, mask)  # type: ignore[misc]


class BatchNormAddAct1d(_AddActMixin, BatchNormAct1d):  # type: ignore[misc]
    """Residual variant of :class:`BatchNormAct1d`: ``act(bn(x) + residual)``."""


class BatchNormAddAct2d(_AddActMixin, BatchNormAct2d):  # type: ignore[misc]
    """Residual variant of :class:`BatchNormAct2d`: ``act(bn(x) + residual)``."""


class BatchNormAddAct3d(_AddActMixin, BatchNormAct3d):  # type: ignore[misc]
    """Residual variant of :class:`BatchNormAct3d`: ``act(bn(x) + residual)``."""


__all__ = [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormAddAct1d",
    "BatchNormAddAct2d",
    "BatchNormAddAct3d",
]
