"""Freezing that sticks, and conversion of torch's BN layers to ours."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, _NormBase

_FROM_TORCH: dict[type, type[_NormBase]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


# ------------------------------------------------------------- recognising other libraries' layers
#
# A BN layer from elsewhere is one of: torch's own classes; a subclass of torch's with a forward of
# its own that follows the convention of timm's ``BatchNormAct2d`` (BN, then its ``drop`` and
# ``act`` children: the whole "tail" is known); a frozen layer by duck type (torchvision's and
# timm's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``: the four buffers and ``eps``); or
# foreign (a forward we cannot see into), which the tools leave alone and name in their reports.

_TAIL_CHILDREN = {"drop", "act"}  # timm's BatchNormAct2d / FrozenBatchNormAct2d
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_TORCH_FORWARDS = (_TorchBatchNorm.forward, nn.SyncBatchNorm.forward)


def is_frozen_like(module: nn.Module) -> bool:
    """A frozen BN from another library (torchvision's or timm's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``): fixed statistics and affine parameters as buffers, and ``eps``."""
    from .frozen import FrozenBatchNorm

    if isinstance(module, (FrozenBatchNorm, _NormBase, _TorchBatchNorm)):
        return False
    return (type(module).__name__.startswith("FrozenBatchNorm") and hasattr(module, "eps")
            and all(k in module._buffers for k in _FROZEN_BUFFERS))


def has_tail(bn: nn.Module) -> bool:
    """Whether ``bn`` applies something after the normalization that tools must keep: our fused
    activation, or the ``drop``/``act`` children of timm's fused layers."""
    from .act import _BatchNormActBase

    if isinstance(bn, _BatchNormActBase):
        return bn.act != "identity"
    return not isinstance(bn, _NormBase) and set(bn._modules) == _TAIL_CHILDREN


def tail(bn: nn.Module) -> nn.Module | None:
    """A module computing what ``bn`` applies after its normalization (``None``: nothing). For our
    fused layers their activation (``nn.ReLU()``, ...); for timm's, a copy of ``drop`` then ``act``."""
    from .act import _BatchNormActBase

    if not has_tail(bn):
        return None
    if isinstance(bn, _BatchNormActBase):
        return {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(bn.negative_slope), "silu": nn.SiLU(),
                "gelu": nn.GELU()}[bn.act]
    return nn.Sequential(copy.deepcopy(bn.drop), copy.deepcopy(bn.act))  # type: ignore[arg-type]


def is_foreign(bn: nn.Module) -> bool:
    """A subclass of torch's BN whose forward is its own and not a known tail: what it computes
    cannot be reproduced, so tools leave it as it is."""
    return (isinstance(bn, _TorchBatchNorm) and not isinstance(bn, _NormBase)
            and type(bn).forward not in _TORCH_FORWARDS and not has_tail(bn))


def num_features(bn: nn.Module) -> int:
    """The channel count of any BN layer (torchvision's frozen layer does not store it)."""
    n = getattr(bn, "num_features", None)
    return int(n) if n is not None else int(bn.running_mean.numel())  # type: ignore[union-attr,operator]


_ACTS: dict[type, str] = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu", nn.Identity: "identity"}


def fused_activation(bn: nn.Module) -> tuple[str, float] | None:
    """``(act, negative_slope)`` of our :class:`~batchnorm.BatchNormAct2d` equal to the tail of a
    timm fused layer, or ``None`` when there is none (an activation we do not fuse, or a dropout)."""
    if not has_tail(bn) or isinstance(bn, _NormBase):
        return None
    drop, act = bn.drop, bn.act
    if type(drop) is not nn.Identity:
        return None
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu", 0.01
    name = _ACTS.get(type(act))
    if name is None:
        return None
    return name, float(getattr(act, "negative_slope", 0.01))


def from_torch(bn: nn.Module) -> _NormBase:
    """Our equivalent of a ``torch.nn.BatchNorm1d/2d/3d`` (or ``SyncBatchNorm``): same
    configuration, parameters, buffers, training flag and device. timm's fused ``BatchNormAct*d``
    becomes our :class:`~batchnorm.BatchNormAct2d` when its activation is one we fuse
    (:func:`fused_activation`); other subclasses with a forward of their own raise ``TypeError``."""
    if isinstance(bn, _NormBase):
        return bn
    if not isinstance(bn, _TorchBatchNorm):
        raise TypeError(f"expected a torch.nn batch-norm layer, got {type(bn).__name__}")
    if has_tail(bn) or is_foreign(bn):
        fused = fused_activation(bn)
        if fused is None:
            raise TypeError(f"{type(bn).__name__} computes more than batch norm (a forward or an activation "
                            "we cannot reproduce); it is left as it is")
        return _fused_from(bn, *fused)
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


def _fused_from(bn: Any, act: str, slope: float) -> _NormBase:
    """Our fused layer equal to timm's fused ``bn`` (ranks from the base class, e.g. ``nn.BatchNorm2d``)."""
    from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

    rank = next((r for cls, r in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3))
                 if isinstance(bn, cls)), 2)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    fused = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}[rank](
        bn.num_features, act, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
        device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype, negative_slope=slope)
    fused.load_state_dict({k: v for k, v in bn.state_dict().items() if k.split(".")[0] not in _TAIL_CHILDREN})
    fused.train(bn.training)
    if bn.weight is not None:
        fused.train_affine = bn.weight.requires_grad
    return fused


def _replace_torch_bn(model: nn.Module, skipped: list[str], prefix: str = "") -> nn.Module:
    """Swap every torch BN in ``model`` for ours, in place (returns the new root if it was one);
    the names of layers that cannot be swapped go to ``skipped``."""
    if isinstance(model, _TorchBatchNorm):
        try:
            return from_torch(model)
        except TypeError:
            skipped.append(prefix or "<root>")
            return model
    for name, child in list(model.named_children()):
        setattr(model, name, _replace_torch_bn(child, skipped, f"{prefix}.{name}" if prefix else name))
    return model


def freeze(model: nn.Module, stats: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every BN layer of ``model``; the state survives ``model.train()``.

    * ``stats=True``: normalize with the running statistics in training too, and stop updating them;
    * ``affine=True``: stop training gamma and beta.

    ``torch.nn.BatchNorm*`` layers are replaced, in place, by ours (same state) since torch's
    cannot hold the knobs; the return value is ``model`` (or the replacement if ``model`` itself
    was a torch BN layer).
    """
    skipped: list[str] = []
    model = _replace_torch_bn(model, skipped)
    skipped += [name or "<root>" for name, m in model.named_modules() if is_frozen_like(m)]
    if skipped:
        warnings.warn(
            f"freeze: {len(skipped)} layer(s) left as they are: {', '.join(skipped[:5])} (frozen already, or "
            "a batch norm from another library that computes more than ours can: call .eval() on them instead)",
            UserWarning, stacklevel=2,
        )
    return _set_frozen(model, stats, affine, frozen=True)


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
    """Whether ``module`` is a batch-norm layer: ours (any kind), torch's (and its subclasses,
    such as timm's fused layers) or another library's frozen one (:func:`is_frozen_like`)."""
    from .frozen import FrozenBatchNorm

    return isinstance(module, (_NormBase, _TorchBatchNorm, FrozenBatchNorm)) or is_frozen_like(module)


