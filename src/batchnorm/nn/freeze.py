"""Freezing that sticks, and conversion of torch's BN layers to ours."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, _NormBase

_FROM_TORCH: dict[type, type[_NormBase]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def from_torch(bn: nn.Module) -> _NormBase:
    """Our equivalent of a ``torch.nn.BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``): same
    configuration, parameters, buffers, training flag and device."""
    if isinstance(bn, _NormBase):
        return bn
    if not isinstance(bn, _TorchBatchNorm):
        raise TypeError(f"expected a torch.nn batch-norm layer, got {type(bn).__name__}")
    cls = _FROM_TORCH.get(type(bn))
    ref = bn.weight if bn.weight is not None else bn.running_mean
    kwargs: dict[str, Any] = {"device": None if ref is None else ref.device,
                              "dtype": None if ref is None else ref.dtype,
                              "bias": bn.bias is not None or not bn.affine,
                              "weight": bn.weight is not None or not bn.affine}
    args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    ours = cls(*args, **kwargs) if cls is not None else BatchNorm(*args, axis=1, **kwargs)
    ours.load_state_dict(bn.state_dict())
    ours.train(bn.training)
    if bn.weight is not None:
        ours.train_affine = bn.weight.requires_grad
    return ours


def _replace_torch_bn(model: nn.Module) -> nn.Module:
    """Swap every torch BN in ``model`` for ours, in place (returns the new root if it was one)."""
    if isinstance(model, _TorchBatchNorm):
        return from_torch(model)
    for name, child in list(model.named_children()):
        setattr(model, name, _replace_torch_bn(child))
    return model


def freeze(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every BN layer of ``model``; the state survives ``model.train()``.

    * ``stats=True``: normalize with the running statistics in training too, and stop updating them;
    * ``affine=True``: stop training gamma and beta.

    ``torch.nn.BatchNorm*`` layers are replaced, in place, by ours (same state) since torch's
    cannot hold the knobs; the return value is ``model`` (or the replacement if ``model`` itself
    was a torch BN layer).
    """
    return _set_frozen(_replace_torch_bn(model), stats, affine, frozen=True)


def unfreeze(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Undo :func:`freeze` for the chosen knobs on every BN layer of ``model``."""
    return _set_frozen(model, stats, affine, frozen=False)


def _set_frozen(model: nn.Module, stats: bool, affine: bool, frozen: bool) -> nn.Module:
    """Set the knobs of every BN layer of ``model``: statistics (if ``stats``) and gamma/beta (if ``affine``)."""
    for m in model.modules():
        if isinstance(m, _NormBase):
            if stats:
                m.use_running_stats = frozen
                m.update_running_stats = not frozen
            if affine:
                m.train_affine = not frozen
    return model


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer: ours (any kind) or torch's."""
    from .frozen import _FrozenBatchNorm

    return isinstance(module, (_NormBase, _TorchBatchNorm, _FrozenBatchNorm))


