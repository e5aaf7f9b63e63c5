"""The argument checks of every batch-norm call: they run before anything is computed or updated,
so a rejected call changes nothing, and each message names what is wrong and the remedy."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .kernels.reference_act import ACTIVATIONS, INVERTIBLE, check_activation

NONFINITE_MODES = ("skip", "raise", "propagate")

SMALL_BATCH_REMEDIES = (
    "Remedies: use drop_last=True in the DataLoader so no batch has a single sample; "
    "freeze the statistics (batchnorm.freeze(model) or layer.use_running_stats = True); "
    "or use a normalization that does not need a batch (GroupNorm/LayerNorm)."
)


class InputError(ValueError, RuntimeError):
    """A batch-norm call got input it cannot normalize (rank, channel count, parameter sizes,
    mask shape, eps, too few values per channel); the message names what and the remedy.

    Both a ``ValueError`` (this library's convention) and a ``RuntimeError`` (what torch raises
    for several of these, e.g. a size mismatch), so code written against either catches it."""


def check_input(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = False,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
) -> None:
    """Raise ``TypeError``/:class:`InputError` naming what is wrong with a batch-norm call.

    Called before anything is computed or updated, so a rejected call changes nothing.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(input).__name__}")
    if not input.dtype.is_floating_point:
        raise TypeError(
            f"expected a floating-point input, got {input.dtype}; convert it with .float() "
            "(batch normalization of integer or bool tensors is not defined)"
        )
    if input.dim() < 2:
        raise InputError(
            f"expected at least 2D input (got {input.dim()}D input) of shape (N, C, *); "
            "for a single sample add a batch dimension with x.unsqueeze(0)"
        )
    channels = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise InputError(
                f"{name} should contain {channels} elements not {t.numel()}: the input has "
                f"{channels} channels on its channel axis (shape {tuple(input.shape)}); "
                "check num_features or which axis holds the features"
            )
    if training and eps <= 0:
        raise InputError(
            f"batch_norm eps must be positive during training, but got {eps}; use e.g. eps=1e-5"
        )
    if eps < 0:
        raise InputError(f"batch_norm eps must be >= 0, but got {eps}")
    if virtual_batch_size is not None and (
        not isinstance(virtual_batch_size, int) or virtual_batch_size < 1
    ):
        raise InputError(f"virtual_batch_size must be a positive integer or None, got {virtual_batch_size!r}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        target = (input.shape[0], *input.shape[2:])
        try:
            torch.broadcast_shapes(tuple(mask.shape), target)
            ok = len(mask.shape) <= len(target) and torch.broadcast_shapes(tuple(mask.shape), target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise InputError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the input without its "
                f"channel axis {tuple(target)} (input shape {tuple(input.shape)}); "
                "the mask marks valid positions, e.g. shape (N, L) for input (N, C, L)"
            )
    if training and input.numel() > 0 and input.numel() // channels == 1:
        raise InputError(
            f"Expected more than 1 value per channel when training, got input size {input.shape}. "
            + SMALL_BATCH_REMEDIES
        )


def check_nonfinite_mode(nonfinite: str) -> str:
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    return nonfinite


def mask_for_kernels(mask: Tensor | None, input: Tensor) -> Tensor | None:
    """``mask`` broadcast to ``(N, 1, *S)`` as bool (the kernels' convention)."""
    if mask is None:
        return None
    target = (input.shape[0], *input.shape[2:])
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.to(input.device).expand(target).unsqueeze(1)


def check_fused(input: Tensor, weight: Tensor | None, residual: Tensor | None, act: str, slope: float,
                 inplace_abn: bool, virtual_batch_size: int | None) -> None:
    """Raise for a fused call that cannot run (see :func:`batch_norm_with_update`)."""
    check_activation(act)
    if residual is not None and residual.shape != input.shape:
        raise InputError(
            f"residual of shape {tuple(residual.shape)} must have the input's shape {tuple(input.shape)}"
        )
    if inplace_abn:
        if act not in INVERTIBLE or (act == "leaky_relu" and not slope > 0):
            raise ValueError(f"inplace_abn=True needs an invertible activation {INVERTIBLE} (leaky_relu with a "
                             f"positive slope), got act={act!r}, negative_slope={slope}")
        if virtual_batch_size:
            raise ValueError("inplace_abn=True does not support virtual_batch_size (ghost batches)")
        if residual is not None:
            raise ValueError("inplace_abn=True takes no residual (the output alone must give x back)")
        if weight is not None and not ops.tracing() and weight.device.type != "meta" and bool((weight == 0).any()):
            raise ValueError("inplace_abn=True needs every weight (gamma) non-zero to recover x from y")


__all__ = ["ACTIVATIONS", "INVERTIBLE", "NONFINITE_MODES", "SMALL_BATCH_REMEDIES", "InputError", "check_activation",
           "check_fused", "check_input", "check_nonfinite_mode", "mask_for_kernels"]
