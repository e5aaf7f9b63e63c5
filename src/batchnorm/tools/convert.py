"""Swap batch-norm layers between implementations, keeping parameters, buffers and configuration.

``convert(model, to)`` with ``to`` one of

* ``"batchnorm"``: ours (:class:`batchnorm.BatchNorm1d`/``2d``/``3d``); a :class:`batchnorm.SyncBatchNorm`
  goes back to the class it was converted from (or :class:`batchnorm.BatchNorm` on its axis);
  a frozen layer becomes ours with frozen knobs (statistics fixed, gamma/beta not trained);
* ``"torch"``: ``torch.nn.BatchNorm1d``/``2d``/``3d`` (``torch.nn.SyncBatchNorm`` for ours);
* ``"sync"``: :class:`batchnorm.SyncBatchNorm` (replaces ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
  which is GPU-only in torch and has no revert);
* ``"frozen"``: :class:`batchnorm.FrozenBatchNorm1d`/``2d``/``3d`` (statistics and affine as buffers);
* ``"revert"``: each :class:`batchnorm.SyncBatchNorm` back to the class it was converted from.

The model is copied; the original is never changed, also when a layer cannot be converted
(``ValueError`` naming it and why). A BN shared between several places stays shared.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from ..nn.act import _BatchNormActBase
from ..nn.freeze import from_torch, fused_activation, has_tail, is_batchnorm, is_foreign, is_frozen_like, num_features
from ..nn.frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from ..nn.modules import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _LazyNormBase,
    _NormBase,
)
from ..nn.renorm import _BatchRenormBase
from ..nn.sync import SyncBatchNorm, from_sync, layer_kwargs, swap_sync, why_not_sync
from ._common import TorchBatchNorm, replace_modules

TARGETS = ("batchnorm", "torch", "sync", "frozen")

_RANK_OF: dict[type, int] = {
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
    BatchNorm1d: 1, BatchNorm2d: 2, BatchNorm3d: 3,
    FrozenBatchNorm1d: 1, FrozenBatchNorm2d: 2, FrozenBatchNorm3d: 3,
}
_OURS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _rank(bn: nn.Module) -> int | None:
    for cls in type(bn).__mro__:
        if cls in _RANK_OF:
            return _RANK_OF[cls]
    if is_frozen_like(bn):  # torchvision's / timm's FrozenBatchNorm2d
        return {"1d": 1, "2d": 2, "3d": 3}.get(type(bn).__name__[-2:])
    return None


def _left_alone(bn: nn.Module, to: str) -> str | None:
    """Why ``convert`` keeps the BN layer ``bn`` from another library as it is (with a warning):
    what it computes has no equivalent of kind ``to``. ``None``: it is converted."""
    if is_foreign(bn):
        return "computes more than batch norm (a forward of its own)"
    if isinstance(bn, _NormBase) or not has_tail(bn):
        return None
    if to == "batchnorm" and not is_frozen_like(bn) and fused_activation(bn) is not None:
        return None  # timm's BatchNormAct*d -> our BatchNormAct*d
    return f"applies {type(bn.drop).__name__} and {type(bn.act).__name__} after normalizing, which {to!r} layers do not"


def _factory(bn: nn.Module) -> dict[str, Any]:
    ref = next((t for t in (getattr(bn, k, None) for k in ("weight", "running_mean")) if t is not None), None)
    return {"device": None if ref is None else ref.device, "dtype": None if ref is None else ref.dtype}


def _copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy weight, bias, buffers, requires_grad, training flag and our freezing knobs."""
    with torch.no_grad():
        for k in _STATE:
            s, d = getattr(src, k, None), getattr(dst, k, None)
            if s is not None and d is not None:
                d.copy_(s)
                if isinstance(s, nn.Parameter) and isinstance(d, nn.Parameter):
                    d.requires_grad_(s.requires_grad)
    dst.train(src.training)
    if isinstance(src, _NormBase) and isinstance(dst, _NormBase):
        dst.use_running_stats = src.use_running_stats
        dst.update_running_stats = src.update_running_stats
        dst.train_affine = src.train_affine
        dst.nonfinite = src.nonfinite


def _ours_kwargs(bn: nn.Module) -> dict[str, Any]:
    """Constructor arguments of ours describing a torch or our BN (not frozen), on its device."""
    return {**layer_kwargs(bn), **_factory(bn)}


def _why_not(bn: nn.Module, to: str) -> str | None:
    """Why ``bn`` cannot become ``to`` (None when it can)."""
    if isinstance(bn, _BatchNormActBase) and to in ("torch", "frozen") and bn.act != "identity":
        return (f"its fused activation ({bn.act!r}) has no place in {to}'s layers "
                "(use bn.freeze(model) to freeze it in place)")
    if to == "sync" and not isinstance(bn, (SyncBatchNorm, FrozenBatchNorm)):
        return why_not_sync(bn)
    if isinstance(bn, (_LazyNormBase, nn.modules.batchnorm._LazyNormBase)) and bn.has_uninitialized_params():
        return "it is a lazy layer that has not seen an input yet (run one batch first)"
    if isinstance(bn, _BatchRenormBase) and to == "torch":
        return "batch renormalization has no equivalent there (convert to 'frozen' for inference)"
    if isinstance(bn, _NormBase):
        if to == "torch":
            if bn._axis != 1:
                return f"features on axis {bn._axis}; torch's layers need them on axis 1"
            if isinstance(bn, BatchNorm) and not isinstance(bn, SyncBatchNorm):
                return "the input rank of BatchNorm(axis=1) is unknown; use BatchNorm1d/2d/3d"
            if bn.affine and (bn.weight is None) != (bn.bias is None):
                return "torch has no BN with only one of gamma/beta"
            if bn.virtual_batch_size:
                return "torch has no ghost batch normalization (virtual_batch_size)"
            if bn.use_running_stats or not bn.update_running_stats:
                return "torch's layers cannot hold frozen statistics (unfreeze it, or convert to 'frozen')"
    if (isinstance(bn, FrozenBatchNorm) or is_frozen_like(bn)) and to == "torch":
        return "torch has no frozen BN layer (keep ours, or torchvision's FrozenBatchNorm2d loads its state_dict)"
    if to == "frozen" and not isinstance(bn, FrozenBatchNorm) and not is_frozen_like(bn):
        if getattr(bn, "running_mean", None) is None:
            return "it has no running statistics (track_running_stats=False) to freeze"
        if getattr(bn, "_axis", 1) != 1:
            return f"features on axis {bn._axis}; frozen layers take them on axis 1"
    return None


def _to_batchnorm(bn: Any) -> nn.Module | None:
    if isinstance(bn, SyncBatchNorm):
        return from_sync(bn, torch_ok=False)
    if isinstance(bn, _NormBase):
        return None
    if isinstance(bn, FrozenBatchNorm) or is_frozen_like(bn):
        rank = _rank(bn)
        kw = _factory(bn)
        c = num_features(bn)
        new: _NormBase = _OURS[rank](c, bn.eps, **kw) if rank else BatchNorm(c, bn.eps, axis=1, **kw)
        _copy_state(bn, new)
        new.use_running_stats, new.update_running_stats, new.train_affine = True, False, False
        return new
    if isinstance(bn, TorchBatchNorm) and has_tail(bn):
        return from_torch(bn)  # timm's fused layer -> ours (see _left_alone for the others)
    if isinstance(bn, TorchBatchNorm):
        rank = _rank(bn)
        new = _OURS[rank](bn.num_features, **_ours_kwargs(bn)) if rank else \
            BatchNorm(bn.num_features, axis=1, **_ours_kwargs(bn))
        _copy_state(bn, new)
        return new
    return None


def _to_torch(bn: nn.Module) -> nn.Module | None:
    if isinstance(bn, SyncBatchNorm):
        new: nn.Module = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                          process_group=bn.process_group, **_factory(bn))
    elif isinstance(bn, _NormBase):
        rank = _rank(bn)
        assert rank is not None
        new = _TORCH[rank](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **_factory(bn))
    else:
        return None
    _copy_state(bn, new)
    return new


def _rank_cls(cls: type) -> int | None:
    return next((_RANK_OF[c] for c in cls.__mro__ if c in _RANK_OF), None)


def _to_frozen(bn: nn.Module) -> nn.Module | None:
    if isinstance(bn, FrozenBatchNorm) or not (isinstance(bn, (_NormBase, TorchBatchNorm)) or is_frozen_like(bn)):
        return None
    rank = _rank(bn)
    if rank is None and isinstance(bn, SyncBatchNorm) and getattr(bn, "_converted_from", None) is not None:
        rank = _rank_cls(bn._converted_from)  # type: ignore[arg-type]
    cls = _FROZEN[rank] if rank else FrozenBatchNorm
    new = cls.from_module(bn)
    new.train(bn.training)
    return new


def convert(model: nn.Module, to: str = "batchnorm", *, process_group: Any = None) -> nn.Module:
    """A copy of ``model`` whose BN layers are of kind ``to`` (see the module docstring).

    Parameters, buffers (running statistics, ``num_batches_tracked``), ``eps``, ``momentum``,
    ``affine``/``track_running_stats``, ``requires_grad``, training flags and our freezing knobs
    are preserved; ``process_group`` applies to ``to="sync"``. Layers that already are of the
    target kind are kept as they are. ``model`` may itself be a BN layer.
    """
    if to not in (*TARGETS, "revert"):
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    problems, kept = [], []
    for name, m in model.named_modules():
        if is_batchnorm(m):
            label = f"{name or '<root>'} ({type(m).__name__})"
            left = None if to in ("sync", "revert") else _left_alone(m, to)  # SyncBatchNorm refuses them
            if left is not None:
                kept.append(f"{label}: {left}")
                continue
            why = _why_not(m, to)
            if why is not None:
                problems.append(f"{label}: {why}")
    if problems:
        raise ValueError(f"cannot convert to {to!r}; nothing was changed:\n  " + "\n  ".join(problems))
    if kept:
        warnings.warn(f"convert: {len(kept)} batch-norm layer(s) from another library kept as they are:\n  "
                      + "\n  ".join(kept), UserWarning, stacklevel=2)
    out = copy.deepcopy(model)
    if to in ("sync", "revert"):  # the in-place swap of SyncBatchNorm's classmethods, on the copy
        return swap_sync(out, process_group, revert=to == "revert")
    fn = {"batchnorm": _to_batchnorm, "torch": _to_torch, "frozen": _to_frozen}[to]
    return replace_modules(out, lambda m: None if is_batchnorm(m) and _left_alone(m, to) else fn(m))


__all__ = ["TARGETS", "convert"]
