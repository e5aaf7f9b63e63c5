r"""Exact population statistics for every BN layer (precise BN).

After SWA/EMA weight averaging, pruning, or training with frozen or stale statistics, the
running statistics no longer describe the data the layers see. ``recalibrate`` runs the model
over data and replaces them by the statistics of all the samples seen:

.. math::

    \mu = \frac1n \sum_i x_i, \qquad \sigma^2 = \frac{1}{n-1} \sum_i (x_i - \mu)^2

per channel over every batch and position (masked positions excluded), accumulated in float64
by merging per-batch (count, mean, M2) exactly (Chan et al.), then all-reduced across the ranks
of ``torch.distributed`` when a process group is initialized. This is the *population*
variance, unlike ``torch.optim.swa_utils.update_bn`` which averages per-batch variances.

During the pass each BN layer normalizes with its batch statistics (as in training, so every
layer sees the inputs it saw in training) and nothing else changes: the training flags of all
modules, momentum, the freezing knobs and ``num_batches_tracked`` are restored afterwards, also
when an exception interrupts the pass (the running statistics are then left as they were).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as F
from ..nn.frozen import FrozenBatchNorm
from ..nn.modules import _NormBase
from ._common import bn_layers, channel_first, has_running_stats, is_frozen, preserved_state, run_batch, take


@dataclass
class Recalibration:
    """What :func:`recalibrate` did: ``batches`` run, per layer the number of values per
    channel its statistics come from (``counts``), and the layers it left alone (``skipped``)."""

    batches: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)  # per layer, batches left out for NaN/inf


class _Accumulator:
    """Running (count, mean, biased variance) of one layer's inputs, merged exactly in float64."""

    def __init__(self, name: str, nonfinite: str) -> None:
        self.name = name
        self.nonfinite = nonfinite
        self.count: Tensor | None = None
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.calls = 0
        self.skipped = 0  # batches with non-finite statistics left out ("skip")

    def add(self, x: Tensor, mask: Tensor | None) -> None:
        s = F.batch_stats(x.detach().double(), mask)
        if self.nonfinite != "propagate" and not bool(torch.isfinite(s.mean).all() & torch.isfinite(s.var).all()):
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"BN layer {self.name!r} received a batch with NaN or inf (non-finite statistics); nothing "
                    "was changed. Pass nonfinite='skip' to leave such batches out."
                )
            self.skipped += 1
            return
        if self.count is None:
            self.count, self.mean, self.var = s.count, s.mean, s.var
            return
        assert self.mean is not None and self.var is not None
        m = F.combine_stats(torch.stack([self.mean, s.mean]), torch.stack([self.var, s.var]),
                            torch.stack([self.count, s.count.to(self.count)]))
        self.count, self.mean, self.var = m.count, m.mean, m.var


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    *,
    reused: str = "error",
    process_group: Any = None,
    nonfinite: str = "skip",
) -> Recalibration:
    """Replace the running statistics of every BN layer by the exact population statistics of
    its inputs over ``data`` (see the module docstring). The model is changed in place.

    * ``data``: an iterable of tensors (``model(x)``), tuples/lists such as a DataLoader's
      ``(inputs, targets)`` (``model(batch[0])``) or dicts (``model(**batch)``);
      ``forward_fn(model, batch)`` for anything else (several inputs, masks).
    * ``num_batches``: stop after that many batches (default: all of ``data``).
    * ``reused``: a BN called more than once per forward sees several distributions; ``"error"``
      (default) raises, ``"pool"`` gives it the statistics of all its inputs together.
    * Frozen layers (frozen statistics knobs, ``Frozen*`` layers, torchvision's and timm's
      included) and layers without running statistics are left alone and listed in the result's
      ``skipped``.
    * ``nonfinite``: a batch whose statistics at a layer are NaN/inf is left out of that layer's
      statistics with a warning (``"skip"``, the layers' default too), raises
      ``FloatingPointError`` with nothing changed (``"raise"``), or is merged in (``"propagate"``).

    Each recalibrated layer gets the attribute ``recalibrated_values`` (the number of values per
    channel its statistics come from), which :func:`batchnorm.diagnose` reads: such statistics
    owe nothing to the initialization, whatever ``num_batches_tracked`` says.
    """
    if reused not in ("error", "pool"):
        raise ValueError(f"reused must be 'error' or 'pool', got {reused!r}")
    F.check_nonfinite_mode(nonfinite)
    layers = bn_layers(model)
    targets: list[tuple[str, Any]] = []
    result = Recalibration()
    for name, bn in layers:
        if isinstance(bn, FrozenBatchNorm) or is_frozen(bn):
            result.skipped[name] = "frozen"
        elif not has_running_stats(bn):
            result.skipped[name] = "no running statistics (track_running_stats=False)"
        else:
            targets.append((name, bn))
    acc = {name: _Accumulator(name, nonfinite) for name, _ in targets}
    model_calls = [0]
    handles = []

    def model_hook(module: nn.Module, args: Any) -> None:
        model_calls[0] += 1

    def make_hook(name: str, bn: nn.Module) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            acc[name].add(channel_first(bn, x), None if mask is None else mask)
            acc[name].calls += 1
        return hook

    with preserved_state(model):
        try:
            handles.append(model.register_forward_pre_hook(model_hook))
            for name, bn in targets:
                handles.append(bn.register_forward_pre_hook(make_hook(name, bn), with_kwargs=True))
            for _, bn in layers:
                bn.train(True)
                if isinstance(bn, _NormBase):
                    bn.update_running_stats = False
            with torch.no_grad():
                for batch in take(data, num_batches):
                    model_calls[0] = 0
                    before = {name: a.calls for name, a in acc.items()}
                    run_batch(model, batch, forward_fn)
                    result.batches += 1
                    if reused == "error" and model_calls[0] > 0:
                        for name, a in acc.items():
                            if a.calls - before[name] > model_calls[0]:
                                raise ValueError(
                                    f"BN layer {name!r} is called {a.calls - before[name]} times per forward "
                                    "(a reused module); its inputs come from different places, so one set of "
                                    "running statistics is a compromise. Pass reused='pool' to give it the "
                                    "statistics of all its inputs together. Nothing was changed."
                                )
        finally:
            for h in handles:
                h.remove()
    if result.batches == 0:
        raise ValueError("recalibrate() got no batches from data; nothing was changed")
    world = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
    with torch.no_grad():
        for name, bn in targets:
            a = acc[name]
            c = bn.num_features
            if a.count is None or a.mean is None or a.var is None:
                mean = var = torch.zeros(c, dtype=torch.float64)
                count = torch.zeros((), dtype=torch.float64)
            else:
                mean, var, count = a.mean, a.var, a.count.double()
            if world > 1:
                from ..nn.sync import gather_stats

                mean, var, count = gather_stats(mean, var, count, process_group)
            n = int(count)
            if n < 2:
                result.skipped[name] = "not called" if n == 0 else "only one value per channel"
                continue
            bn.running_mean.copy_(mean.to(bn.running_mean))
            bn.running_var.copy_(F.unbiased(var, count).to(bn.running_var))
            bn.recalibrated_values = n
            result.counts[name] = n
    result.nonfinite = {name: a.skipped for name, a in acc.items() if a.skipped}
    if result.nonfinite:
        worst = max(result.nonfinite.values())
        warnings.warn(
            f"recalibrate: batches with NaN or inf were left out of the statistics of {len(result.nonfinite)} "
            f"layer(s) (up to {worst} of {result.batches} batches; Recalibration.nonfinite has them per layer)",
            RuntimeWarning, stacklevel=2,
        )
    return result


__all__ = ["Recalibration", "recalibrate"]
