"""Helpers shared by the model tools: finding BN layers, swapping modules, running data."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as TorchBatchNorm

from ..nn.freeze import is_batchnorm, is_frozen_like
from ..nn.frozen import FrozenBatchNorm
from ..nn.modules import _NormBase


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every distinct BN layer of ``model`` (ours, torch's, frozen)."""
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


def bn_axis(bn: nn.Module) -> int:
    """The features axis of a BN layer's input (1 for torch's and the rank-specific layers)."""
    return getattr(bn, "_axis", 1)


def has_running_stats(bn: nn.Module) -> bool:
    return getattr(bn, "running_mean", None) is not None and getattr(bn, "running_var", None) is not None


def is_frozen(bn: nn.Module) -> bool:
    """Frozen statistics: a Frozen* layer, or one of ours with the statistics knobs set."""
    if isinstance(bn, FrozenBatchNorm) or is_frozen_like(bn):
        return True
    return isinstance(bn, _NormBase) and (bn.use_running_stats or not bn.update_running_stats)


def replace_modules(model: nn.Module, fn: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every module ``m`` for which ``fn(m)`` returns a module.

    A module registered in several places (shared) is replaced by one and the same new module
    everywhere. Returns the new root (``model`` unless ``fn`` replaced the root itself).
    """
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = fn(m)
        if new is not None:
            memo[id(m)] = new
            return new
        memo[id(m)] = m
        for name, child in list(m._modules.items()):
            if child is not None:
                nc = visit(child)
                if nc is not child:
                    m._modules[name] = nc
        return m

    return visit(model)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[attr] = new


def run_batch(model: nn.Module, batch: Any, forward_fn: Callable[[nn.Module, Any], Any] | None) -> Any:
    """Call ``model`` on one element of a data iterable: a tensor (``model(x)``), a tuple/list
    such as ``(inputs, targets)`` from a DataLoader (``model(batch[0])``, as
    ``torch.optim.swa_utils.update_bn`` does) or a dict (``model(**batch)``);
    ``forward_fn(model, batch)`` for anything else (several inputs, masks)."""
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise TypeError(
        f"don't know how to feed a batch of type {type(batch).__name__} to the model; "
        "pass forward_fn=lambda model, batch: model(...)"
    )


def take(data: Iterable[Any], num_batches: int | None) -> Iterator[Any]:
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


def channel_first(bn: nn.Module, x: Tensor) -> Tensor:
    axis = bn_axis(bn) % x.dim()
    return x if axis == 1 else x.movedim(axis, 1)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag, BN momentum/knobs and BN buffers on exit
    (also on an exception)."""
    flags = [(m, m.training) for m in model.modules()]
    saved = []
    for _, bn in bn_layers(model):
        bufs = {k: v.detach().clone() for k, v in bn._buffers.items() if v is not None}
        knobs = {k: getattr(bn, k) for k in ("momentum", "use_running_stats", "update_running_stats")
                 if hasattr(bn, k)}
        saved.append((bn, bufs, knobs))
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for bn, bufs, knobs in saved:
                for k, v in bufs.items():
                    bn._buffers[k].copy_(v)  # type: ignore[union-attr]
                for k, v in knobs.items():
                    setattr(bn, k, v)


__all__ = ["TorchBatchNorm", "bn_layers", "has_running_stats", "is_frozen", "replace_modules", "run_batch"]
