"""What the fast backends share: the ops they implement, the activation codes their fused kernels
take, and how a tensor's memory format is recognised.

Activation codes (the fused kernels' ``act`` argument as an int; the math is
:mod:`batchnorm.kernels.reference_act`'s): 0 identity, 1 relu, 2 leaky_relu, 3 silu, 4 gelu (erf
form). Plain batch norm is code 0 of the fused kernels.

Memory format means torch's: contiguous, ``channels_last`` (4-D) or ``channels_last_3d`` (5-D).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import protocol

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}

#: The ops a backend's ``supports`` is asked about (:data:`batchnorm.kernels.protocol.OPS`), as a set.
OPS = frozenset(protocol.OPS)


def channels_last_format(x: Tensor) -> torch.memory_format | None:
    """``torch.channels_last`` / ``torch.channels_last_3d`` when ``x`` is dense in it (4-D / 5-D),
    else ``None``."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def dense(x: Tensor) -> Tensor:
    """``x`` itself when contiguous or channels_last (one stride per channel step), else a
    contiguous copy."""
    if x.is_contiguous() or channels_last_format(x) is not None:
        return x
    return x.contiguous()


def strided_like(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (shaped like ``x``) with ``x``'s strides: itself when they match, else a copy."""
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)
