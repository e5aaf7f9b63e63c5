"""batchnorm: batch normalization from first principles on PyTorch.

* layers: :class:`BatchNorm1d`/``2d``/``3d`` (drop-in for ``torch.nn``), :class:`BatchNorm`
  (features on any axis), lazy, renormalization, frozen, with masks, ghost batches, freezing
  knobs and protection against non-finite batches;
* :mod:`batchnorm.functional`: the math (``batch_norm`` with torch's signature, statistics);
* :mod:`batchnorm.kernels`: the backends that compute it (``set_backend``/``use_backend``).
"""

from . import functional, kernels
from .functional import InputError
from .kernels import available_backends, set_backend, use_backend
from .nn import *  # noqa: F403  (every layer and the freezing helpers: batchnorm.nn.__all__)
from .nn import __all__ as _layer_names
from .tools import convert, diagnose, fold, insert, recalibrate

__version__ = "0.1.0"

__all__ = [
    *_layer_names,
    "InputError",
    "available_backends",
    "convert",
    "diagnose",
    "fold",
    "functional",
    "insert",
    "kernels",
    "recalibrate",
    "set_backend",
    "use_backend",
]
