r"""Diagnose the most common batch-norm bug: a gap between training-mode and eval-mode behaviour.

``diagnose(model, data)`` runs the model over a few batches and reports, per BN layer:

* ``gap``: relative difference between the layer's output with the batch's statistics (what
  training mode computes) and with its running statistics (eval mode), on the same inputs:
  ``||y_batch - y_running|| / ||y_batch||`` over all batches;
* ``mean_shift``: how far the running mean is from the data's mean, in the data's standard
  deviations, worst channel: ``max_c |running_mean - mu| / sqrt(var + eps)``;
* ``var_ratio``: worst channel of ``max(r, 1/r)`` with ``r = (running_var + eps) / (var + eps)``;
* ``updates`` (``num_batches_tracked``) against the momentum's horizon: after ``t`` updates a
  fraction ``(1 - momentum)^t`` of the running statistics is still the initialization (0 and 1);
* warnings: BN in training mode (during evaluation this normalizes with batch statistics and
  changes the running statistics), frozen layers, tiny batches (noisy batch statistics),
  non-finite buffers, statistics that were never updated or are far from the data's.

The layers see their inputs as in eval mode; the model's state (training flags, buffers) is left
exactly as it was. Returns a :class:`Diagnosis` and prints it as a table (``show=False`` not to).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from ..nn.frozen import FrozenBatchNorm
from ._common import bn_layers, channel_first, has_running_stats, is_frozen, preserved_state, run_batch, take

TINY_BATCH = 16  # values per channel below which batch statistics are noisy
STATS_FAR = 0.5  # mean shift (in standard deviations) that gets a warning
VAR_FAR = 2.0  # variance ratio that gets a warning


@dataclass
class LayerDiagnosis:
    """One BN layer's row of the report (see the module docstring for the quantities)."""

    name: str
    kind: str
    training: bool
    frozen: bool
    values_per_batch: int = 0
    gap: float = math.nan
    mean_shift: float = math.nan
    var_ratio: float = math.nan
    updates: int | None = None
    momentum: float | None = None
    init_weight: float = math.nan
    warnings: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    """The report: per-layer rows, the model-level output gap (train-mode BN vs eval-mode BN,
    when the model returns a tensor) and warnings about the model as a whole."""

    layers: list[LayerDiagnosis]
    output_gap: float | None
    warnings: list[str]
    batches: int

    def table(self) -> Any:
        """The per-layer table as a ``rich.table.Table``."""
        from rich.table import Table

        t = Table(title=f"batch-norm diagnosis ({self.batches} batches)")
        for col in ("layer", "kind", "mode", "values/batch", "gap", "mean shift", "var ratio", "updates", "init left"):
            left = col in ("layer", "kind", "mode")
            t.add_column(col, justify="left" if left else "right", no_wrap=col in ("layer", "kind"))
        for r in self.layers:
            mode = "train" if r.training else "eval"
            if r.frozen:
                mode += ", frozen"
            t.add_row(r.name, r.kind, mode, str(r.values_per_batch), _fmt(r.gap), _fmt(r.mean_shift),
                      _fmt(r.var_ratio), "-" if r.updates is None else str(r.updates), _fmt(r.init_weight, pct=True))
        return t

    def all_warnings(self) -> list[str]:
        return [*self.warnings, *(f"{r.name}: {w}" for r in self.layers for w in r.warnings)]

    def print(self, console: Any = None) -> None:
        from rich.console import Console

        console = console or Console()
        console.print(self.table())
        if self.output_gap is not None:
            console.print(f"model output, train-mode BN vs eval-mode BN: relative gap {self.output_gap:.3g}")
        for w in self.all_warnings():
            console.print(f"[yellow]warning[/yellow] {w}")

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=io.StringIO())
        self.print(console)
        return console.export_text()


def _fmt(v: float, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3g}"


class _Probe:
    def __init__(self, bn: nn.Module) -> None:
        self.bn: Any = bn
        self.diff2 = 0.0
        self.ref2 = 0.0
        self.min_values: int | None = None
        self.stats: list[tuple[Tensor, Tensor, Tensor]] = []

    def add(self, x: Tensor, mask: Tensor | None) -> None:
        x = channel_first(self.bn, x.detach())
        if x.numel() == 0:
            return
        s = F.batch_stats(x.double(), mask)
        self.stats.append((s.mean, s.var, s.count))
        n = int(s.count)
        self.min_values = n if self.min_values is None else min(self.min_values, n)
        if not has_running_stats(self.bn) or n < 2:
            return
        bn = self.bn
        w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
        xd = x.double()
        wd = None if w is None else w.detach().double()
        bd = None if b is None else b.detach().double()
        y_batch = F.apply_stats(xd, s.mean, s.var, wd, bd, bn.eps)
        y_run = F.apply_stats(xd, bn.running_mean.double(), bn.running_var.double(), wd, bd, bn.eps)
        self.diff2 += float((y_batch - y_run).square().sum())
        self.ref2 += float(y_batch.square().sum())


def diagnose(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int | None = 16,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    *,
    show: bool = True,
) -> Diagnosis:
    """Report train/eval mismatch per BN layer over the first ``num_batches`` batches of ``data``
    (see the module docstring); ``data`` and ``forward_fn`` as in :func:`batchnorm.recalibrate`."""
    batches = list(take(data, num_batches))
    if not batches:
        raise ValueError("diagnose() got no batches from data")
    layers = bn_layers(model)
    warnings: list[str] = []
    in_train = [name for name, bn in layers if bn.training]
    if in_train:
        more = ", ..." if len(in_train) > 3 else ""
        warnings.append(
            f"{len(in_train)} BN layer(s) in training mode ({', '.join(in_train[:3])}{more}): "
            "evaluating like this normalizes with batch statistics and changes the running statistics; "
            "call model.eval() before evaluation"
        )
    probes = {name: _Probe(bn) for name, bn in layers}
    handles = []

    def make_hook(probe: _Probe) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            mask = args[1] if len(args) > 1 else kwargs.get("mask")
            probe.add(x, mask)
        return hook

    output_gap: float | None = None
    with preserved_state(model), torch.no_grad():
        try:
            for name, bn in layers:
                bn.eval()
                handles.append(bn.register_forward_pre_hook(make_hook(probes[name]), with_kwargs=True))
            eval_out = [run_batch(model, b, forward_fn) for b in batches]
        finally:
            for h in handles:
                h.remove()
        # the same batches with the BN layers normalizing with batch statistics (buffers restored on exit)
        try:
            for _, bn in layers:
                if has_running_stats(bn) and not isinstance(bn, FrozenBatchNorm):
                    bn.train()
            train_out = [run_batch(model, b, forward_fn) for b in batches]
            if all(isinstance(o, Tensor) for o in (*eval_out, *train_out)):
                d = sum(float((t.double() - e.double()).square().sum()) for t, e in zip(train_out, eval_out))
                r = sum(float(t.double().square().sum()) for t in train_out)
                output_gap = math.sqrt(d / r) if r > 0 else math.nan
        except Exception as e:  # any failure is reported, e.g. a batch of one in training mode
            warnings.append(f"could not run the model with batch statistics ({type(e).__name__}: {e})")
    rows = [_row(name, bn, probes[name]) for name, bn in layers]
    never = [r.name for r in rows if r.values_per_batch == 0]
    if never:
        warnings.append(f"{len(never)} BN layer(s) never called on this data: {', '.join(never[:5])}")
    diagnosis = Diagnosis(rows, output_gap, warnings, len(batches))
    if show:
        diagnosis.print()
    return diagnosis


def _row(name: str, bn: Any, probe: _Probe) -> LayerDiagnosis:
    row = LayerDiagnosis(name, type(bn).__name__, training=bn.training, frozen=is_frozen(bn))
    row.values_per_batch = probe.min_values or 0
    momentum = getattr(bn, "momentum", None)
    row.momentum = momentum
    nbt = getattr(bn, "num_batches_tracked", None)
    row.updates = None if nbt is None else int(nbt)
    if row.training:
        row.warnings.append("in training mode")
    if row.frozen:
        row.warnings.append("frozen: its running statistics do not update in training")
    if not has_running_stats(bn):
        row.warnings.append("no running statistics: normalizes with batch statistics in eval mode too")
        return row
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    if not (torch.isfinite(rm).all() and torch.isfinite(rv).all()):
        row.warnings.append("non-finite running statistics (NaN/inf): eval outputs are garbage; recalibrate")
    if probe.stats:
        means, vars_, counts = zip(*probe.stats)
        pop = F.combine_stats(torch.stack(means), torch.stack(vars_), torch.stack([c.double() for c in counts]))
        if float(pop.count) >= 2:
            var = F.unbiased(pop.var, pop.count)
            row.mean_shift = float(((rm - pop.mean).abs() / torch.sqrt(var + bn.eps)).max())
            ratio = (rv + bn.eps) / (var + bn.eps)
            row.var_ratio = float(torch.maximum(ratio, 1 / ratio).max())
            if row.mean_shift > STATS_FAR or row.var_ratio > VAR_FAR:
                row.warnings.append(
                    f"running statistics far from the data's (mean shift {row.mean_shift:.2g} sd, variance ratio "
                    f"{row.var_ratio:.2g}): eval differs from train; "
                    "recalibrate(model, data) if the data is representative"
                )
        if probe.ref2 > 0:
            row.gap = math.sqrt(probe.diff2 / probe.ref2)
    # the initialization's share only matters when the statistics are not already right, and only
    # for statistics that come from moving averages: not after recalibrate, nor for values set
    # another way (loaded, assigned) with no update counted
    far = math.isnan(row.mean_shift) or row.mean_shift > STATS_FAR or row.var_ratio > VAR_FAR
    recalibrated = getattr(bn, "recalibrated_values", None) is not None
    set_otherwise = row.updates == 0 and not (bool((rm == 0).all()) and bool((rv == 1).all()))
    if row.updates is not None and not row.frozen and not recalibrated and not set_otherwise:
        if momentum is not None and momentum > 0:
            row.init_weight = (1.0 - momentum) ** row.updates
            if row.init_weight > 0.05 and far:
                needed = math.ceil(math.log(0.05) / math.log(1 - momentum)) if momentum < 1 else 1
                row.warnings.append(
                    f"only {row.updates} update(s) with momentum {momentum}: {row.init_weight:.0%} of the running "
                    f"statistics is still the initialization (needs ~{needed} "
                    "updates); recalibrate(model, data)"
                )
        elif row.updates == 0:
            row.init_weight = 1.0
            if far:
                row.warnings.append("never updated: running statistics are the initialization")
    if 0 < row.values_per_batch < TINY_BATCH:
        row.warnings.append(
            f"tiny batches ({row.values_per_batch} values per channel): batch statistics are noisy, so train and eval "
            "differ; use larger batches, ghost/renorm BN, or freeze the statistics"
        )
    return row


__all__ = ["Diagnosis", "LayerDiagnosis", "diagnose"]
