"""batchnorm: batch normalization from first principles on PyTorch.

* layers: :class:`BatchNorm1d`/``2d``/``3d`` (drop-in for ``torch.nn``), :class:`BatchNorm`
  (features on any axis), lazy, renormalization, frozen, with masks, ghost batches, freezing
  knobs and protection against non-finite batches;
* :mod:`batchnorm.functional`: the math (``batch_norm`` with torch's signature, statistics);
* :mod:`batchnorm.kernels`: the backends that compute it (``set_backend``/``use_backend``).
"""

from . import functional, kernels
from .kernels import available_backends, set_backend, use_backend
from .nn import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormAddAct1d,
    BatchNormAddAct2d,
    BatchNormAddAct3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    SyncBatchNorm,
    freeze,
    from_torch,
    is_batchnorm,
    unfreeze,
)
from .tools import convert, diagnose, fold, insert, recalibrate

__version__ = "0.1.0"

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
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "available_backends",
    "convert",
    "diagnose",
    "fold",
    "freeze",
    "from_torch",
    "functional",
    "insert",
    "is_batchnorm",
    "kernels",
    "recalibrate",
    "set_backend",
    "unfreeze",
    "use_backend",
]
