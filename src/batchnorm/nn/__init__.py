"""Batch-normalization layers (``torch.nn`` drop-ins and extensions)."""

from .act import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormAddAct1d,
    BatchNormAddAct2d,
    BatchNormAddAct3d,
)
from .freeze import freeze, from_torch, is_batchnorm, unfreeze
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormAddAct1d",
    "BatchNormAddAct2d",
    "BatchNormAddAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "freeze",
    "from_torch",
    "is_batchnorm",
    "unfreeze",
]
