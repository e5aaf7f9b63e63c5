r"""Fold batch normalization into the neighbouring linear or convolution layer, for inference.

In eval mode a BN layer is a per-channel affine map ``y = a * x + c`` with
``a = gamma / sqrt(running_var + eps)`` and ``c = beta - running_mean * a``, so it can be merged
into the layer next to it:

* **after** a linear, conv or transposed conv (``layer -> BN``):
  ``w' = w * a`` per output channel (per input-channel slot of the weight for transposed convs),
  ``b' = (b - running_mean) * a + beta``;
* **before** a linear or conv (``BN -> layer``), where that is exact: ``w' = w * a`` per input
  channel, ``b' = b + w @ c``. For a convolution this needs no zero padding (zeros would be
  padded after BN, not before); ``padding_mode`` reflect/replicate/circular pads with input
  values and is exact.

The weights are recomputed in float64 and cast back. The folded BN becomes ``nn.Identity``, or
what it applied after normalizing (the activation of our fused layers and of timm's
``BatchNormAct2d``); the model keeps its classes and structure. A BN folded into a ``Linear``
without an ``example`` to show that its input is 2D becomes :class:`Folded2D`, which refuses
other ranks at run time. Connectivity comes from ``torch.fx`` (BN and conv/linear
layers are leaves); a model that fx cannot trace is folded only inside ``nn.Sequential``
containers. A BN is left in place, and the report says why, when folding would not be exact or
would change something else: the neighbouring layer is called more than once (shared) or its
parameters are tied to another module, the BN is called more than once, its output also goes
elsewhere, it has no running statistics, or it receives a mask.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from .. import functional as F
from ..nn.freeze import is_batchnorm, is_foreign, num_features, tail
from ._common import bn_axis, has_running_stats, replace_modules, run_batch

_AFTER = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BEFORE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FoldReport:
    """What :func:`fold` did: ``folded`` is ``[(bn, layer, "after"|"before")]`` (BN after/before
    the layer it went into), ``unfolded`` is ``[(bn, reason)]``; ``traced`` tells whether the
    connectivity came from ``torch.fx`` (else only ``nn.Sequential`` neighbours were considered);
    ``max_rel_error``: largest relative output difference on ``fold(..., example=x)``."""

    folded: list[tuple[str, str, str]] = field(default_factory=list)
    unfolded: list[tuple[str, str]] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None
    max_rel_error: float | None = None

    def __str__(self) -> str:
        lines = [f"fold: {len(self.folded)} BN layer(s) folded, {len(self.unfolded)} left"]
        for bn, layer, side in self.folded:
            where = "BN after the layer" if side == "after" else "BN before it"
            lines.append(f"  folded   {bn} into {layer} ({where})")
        for bn, why in self.unfolded:
            lines.append(f"  kept     {bn}: {why}")
        if self.max_rel_error is not None:
            lines.append(f"  largest relative output difference on the example: {self.max_rel_error:.2e}")
        if not self.traced:
            lines.append(f"  (not fx-traceable: {self.trace_error}; only nn.Sequential neighbours were folded)")
        return "\n".join(lines)


class _Tracer(torch.fx.Tracer):
    """Keeps every BN layer (ours included) a leaf so it shows up as one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


def _bn_affine(bn: Any) -> tuple[Tensor, Tensor]:
    """``(a, c)`` in float64 with ``BN(x) = a * x + c`` per channel in eval mode."""
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    a = F.inverse_std(rv, bn.eps)
    w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
    if w is not None:
        a = a * w.detach().double()
    c = -rm * a
    if b is not None:
        c = c + b.detach().double()
    return a, c


def _set_weight_bias(layer: Any, w: Tensor, b: Tensor) -> None:
    ref = layer.weight
    with torch.no_grad():
        layer.weight.copy_(w.to(ref.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(b.to(device=ref.device, dtype=ref.dtype), requires_grad=ref.requires_grad)
        else:
            layer.bias.copy_(b.to(layer.bias.dtype))


def _fold_after(layer: Any, bn: Any) -> None:
    a, c = _bn_affine(bn)
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(a)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        wg = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])  # (G, in/G, out/G, *k)
        scale = a.reshape(g, 1, -1, *([1] * (w.dim() - 2)))
        w = (wg * scale).reshape(w.shape)
    else:
        w = w * a.reshape(-1, *([1] * (w.dim() - 1)))
    _set_weight_bias(layer, w, b * a + c)


def _fold_before(bn: Any, layer: Any) -> None:
    a, c = _bn_affine(bn)
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
    if isinstance(layer, nn.Linear):
        _set_weight_bias(layer, w * a, b + w @ c)
        return
    g, out = layer.groups, w.shape[0]
    icg = w.shape[1]
    a_full = a.reshape(g, icg).repeat_interleave(out // g, dim=0)  # (out, in/G)
    c_full = c.reshape(g, icg).repeat_interleave(out // g, dim=0)
    extra = [1] * (w.dim() - 2)
    b_new = b + (w * c_full.reshape(out, icg, *extra)).sum(dim=tuple(range(1, w.dim())))
    _set_weight_bias(layer, w * a_full.reshape(out, icg, *extra), b_new)


def _pads_with_zeros(conv: Any) -> bool:
    if isinstance(conv, nn.Linear) or conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding != "valid" and any(k > 1 for k in conv.kernel_size)
    return any(p != 0 for p in conv.padding)


def _channels(layer: Any, side: str) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features if side == "out" else layer.in_features
    return layer.out_channels if side == "out" else layer.in_channels


def _bn_problem(bn: Any) -> str | None:
    if is_foreign(bn):
        return f"{type(bn).__name__} computes more than batch norm (a forward of its own); left as it is"
    if not has_running_stats(bn):
        return "no running statistics (track_running_stats=False): it normalizes with batch statistics"
    if getattr(bn, "training", False):
        return "in training mode"
    return None


class _Planner:
    def __init__(self, model: nn.Module, bn_ndim: dict[int, int] | None = None, clone_shared: bool = False) -> None:
        self.model = model
        self.clone_shared = clone_shared
        self.graph_changed = False
        self.bn_ndim = bn_ndim or {}
        owners: Counter[int] = Counter()
        for m in {id(m): m for m in model.modules()}.values():
            for p in m.parameters(recurse=False):
                owners[id(p)] += 1
        self.param_owners = owners
        self.report = FoldReport()
        self.done_bn: set[int] = set()
        self.need_2d: set[int] = set()  # BN folded with a Linear for an input rank not seen
        self.actions: list[tuple[str, nn.Module, nn.Module, str]] = []

    def tied(self, layer: nn.Module) -> bool:
        return any(self.param_owners[id(p)] > 1 for p in layer.parameters(recurse=False))

    def linear_axis(self, bn: Any) -> str | None:
        """A Linear's features are on the last axis: a BN on axis 1 matches them only for 2D input.
        Without an example the rank is unknown: the fold goes ahead and the BN's place checks, at
        run time, that its input is 2D (:class:`Folded2D`)."""
        ndim = self.bn_ndim.get(id(bn))
        if ndim is None:
            if bn_axis(bn) == 1:  # matches a Linear's features only for 2D input
                self.need_2d.add(id(bn))
            return None
        if ndim == 2 or bn_axis(bn) % ndim == ndim - 1:
            return None
        return f"the BN normalizes axis {bn_axis(bn)} of a {ndim}D input, not the linear layer's features"

    def check_after(self, layer: Any, bn: Any) -> str | None:
        return self._check(bn, layer, "after")

    def check_before(self, bn: Any, layer: Any) -> str | None:
        return self._check(bn, layer, "before")

    def _check(self, bn: Any, layer: Any, side: str) -> str | None:
        """Why ``bn`` cannot fold into ``layer`` (which it follows when ``side == "after"``), or None."""
        after = side == "after"
        which = "previous" if after else "next"
        if not isinstance(layer, _AFTER if after else _BEFORE):
            return f"not {'preceded' if after else 'followed'} by a linear/conv layer"
        channels = _channels(layer, "out" if after else "in")
        if channels != num_features(bn):
            verb = "has" if after else "takes"
            return f"{num_features(bn)} features but the {which} layer {verb} {channels}{' outputs' if after else ''}"
        if not isinstance(layer, nn.Linear) and bn_axis(bn) != 1:
            return f"features on axis {bn_axis(bn)}, not the conv's channel axis"
        if isinstance(layer, nn.Linear) and self.linear_axis(bn):
            return self.linear_axis(bn)
        if not after and _pads_with_zeros(layer):
            return "the next conv pads with zeros, which BN would not have seen (folding would not be exact)"
        if self.tied(layer):
            return f"the {which} layer's parameters are shared with another module"
        return None

    def plan_fx(self, graph: torch.fx.Graph) -> None:
        calls: Counter[str] = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        seen_bn: set[str] = set()
        get = self.model.get_submodule
        for n in graph.nodes:
            if n.op == "call_function" and getattr(n.target, "__name__", "") in ("batch_norm",):
                self.report.unfolded.append((n.name, "functional batch_norm call (not a module); not folded"))
            if n.op != "call_module" or not is_batchnorm(get(str(n.target))):
                continue
            name = str(n.target)
            bn: Any = get(name)
            if name in seen_bn:
                continue
            seen_bn.add(name)
            why = _bn_problem(bn)
            if why is None and calls[name] > 1:
                why = f"the BN is called {calls[name]} times"
            if why is None and (len(n.args) != 1 or any(v is not None for v in n.kwargs.values())):
                why = "called with a mask or extra arguments"
            if why is not None:
                self.report.unfolded.append((name, why))
                continue
            reasons = []
            prev = n.args[0]
            if (isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                    and isinstance(get(str(prev.target)), _AFTER)):
                layer = get(str(prev.target))
                r = self.check_after(layer, bn)
                if r is None and len(prev.users) > 1:
                    r = f"the output of {prev.target} also goes elsewhere"
                into = str(prev.target)
                if r is None and calls[str(prev.target)] > 1:
                    if self.clone_shared:  # this call gets its own copy of the layer, folded
                        layer = copy.deepcopy(layer)
                        clone, k = into.replace(".", "_") + "_folded", 1
                        while hasattr(self.model, clone):
                            clone, k = f"{into.replace('.', '_')}_folded_{k}", k + 1
                        self.model.add_module(clone, layer)
                        prev.target = clone
                        self.graph_changed = True
                        into = f"{into} (cloned as {clone})"
                    else:
                        r = (f"the previous layer {prev.target} is called {calls[str(prev.target)]} times (shared; "
                             "clone_shared=True folds into a copy for this call)")
                if r is None:
                    self.actions.append((name, bn, layer, "after"))
                    self.report.folded.append((name, into, "after"))
                    continue
                reasons.append(r)
            users = list(n.users)
            if len(users) == 1 and users[0].op == "call_module" and isinstance(get(str(users[0].target)), _BEFORE):
                nxt = users[0]
                layer = get(str(nxt.target))
                r = self.check_before(bn, layer)
                if r is None and calls[str(nxt.target)] > 1:
                    r = f"the next layer {nxt.target} is called {calls[str(nxt.target)]} times (shared)"
                if r is None and (len(nxt.args) != 1 or nxt.kwargs):
                    r = f"{nxt.target} is called with extra arguments"
                if r is None:
                    self.actions.append((name, bn, layer, "before"))
                    self.report.folded.append((name, str(nxt.target), "before"))
                    continue
                reasons.append(r)
            elif len(users) > 1:
                reasons.append("its output goes to several places")
            self.report.unfolded.append((name, "; ".join(reasons) or "no linear/conv layer next to it"))
        for name, m in self.model.named_modules():
            if is_batchnorm(m) and name not in seen_bn:
                self.report.unfolded.append((name, "not called in the traced forward"))

    def plan_sequential(self) -> None:
        occurrences = Counter(id(m) for _, m in self.model.named_modules(remove_duplicate=False))
        used: set[int] = set()
        handled: set[int] = set()
        for _, seq in self.model.named_modules():
            if not isinstance(seq, nn.Sequential):
                continue
            names = list(seq._modules)
            mods = list(seq)
            prefix = "" if seq is self.model else next(k for k, v in self.model.named_modules() if v is seq) + "."
            for i, bn in enumerate(mods):
                if not is_batchnorm(bn) or id(bn) in handled:
                    continue
                handled.add(id(bn))
                name = prefix + names[i]
                why = _bn_problem(bn)
                if why is None and occurrences[id(bn)] > 1:
                    why = f"registered {occurrences[id(bn)]} times"
                if why is None:
                    prev = mods[i - 1] if i > 0 else None
                    nxt = mods[i + 1] if i + 1 < len(mods) else None
                    for layer, side in ((prev, "after"), (nxt, "before")):
                        if layer is None or id(layer) in used:
                            continue
                        r = self.check_after(layer, bn) if side == "after" else self.check_before(bn, layer)
                        if r is None and occurrences[id(layer)] > 1:
                            r = "the layer is registered more than once (shared)"
                        if r is None:
                            used.add(id(layer))
                            self.actions.append((name, bn, layer, side))
                            self.report.folded.append((name, prefix + names[i + (-1 if side == "after" else 1)], side))
                            break
                    else:
                        why = "no foldable linear/conv neighbour in its nn.Sequential"
                if why is not None:
                    self.report.unfolded.append((name, why))
        for name, m in self.model.named_modules():
            if is_batchnorm(m) and id(m) not in handled:
                self.report.unfolded.append((name, "not inside an nn.Sequential and the model is not fx-traceable"))


class Folded2D(nn.Module):
    """The place of a BN folded into a ``Linear`` without an example to show its input's rank:
    the fold is exact for 2D ``(N, C)`` input only (for ``(N, L, C)`` a ``BatchNorm1d`` normalizes
    ``L``, not the linear layer's features), so any other rank raises instead of computing a
    wrong result. Then ``inner`` (what the BN applied after normalizing, or ``nn.Identity``)."""

    def __init__(self, name: str, inner: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise RuntimeError(
                f"the batch norm {self.name!r} was folded into a Linear layer for 2D (N, C) input, but got "
                f"{x.dim()}D input of shape {tuple(x.shape)}; fold the original model with "
                "fold(model, example=<a batch>) so the folding follows the real input"
            )
        return self.inner(x)

    def extra_repr(self) -> str:
        return repr(self.name)


def _replacement(name: str, bn: nn.Module, need_2d: bool) -> nn.Module:
    """What takes a folded BN's place: what it applied after normalizing (a fused layer's
    activation, see :func:`batchnorm.nn.freeze.tail`) or ``nn.Identity``, checked for 2D input
    when ``need_2d``."""
    inner = tail(bn) or nn.Identity()
    return Folded2D(name, inner) if need_2d else inner


def _input_ranks(model: nn.Module, example: Any) -> dict[int, int]:
    """Rank of the input each BN layer receives when ``model`` runs on ``example``."""
    ranks: dict[int, int] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:  # must return None (not to replace args)
        ranks.setdefault(id(mod), args[0].dim())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if is_batchnorm(m)]
    try:
        with torch.no_grad():
            run_batch(model, example, None)
    finally:
        for h in handles:
            h.remove()
    return ranks


def _max_rel_error(a: Any, b: Any) -> float:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if a.numel() else 0.0
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return max((_max_rel_error(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return max((_max_rel_error(a[k], b[k]) for k in a), default=0.0)
    return 0.0


def fold(model: nn.Module, report: bool = False, example: Any = None, *,
         clone_shared: bool = False) -> nn.Module | tuple[nn.Module, FoldReport]:
    """A copy of ``model`` (in eval mode) with every foldable BN merged into its neighbour.

    Returns the new model, or ``(model, FoldReport)`` with ``report=True``. The outputs equal the
    original's up to rounding (relative error ~1e-6 in float32). BN layers that cannot be folded
    exactly are kept (with a warning when ``report=False``); see :class:`FoldReport`.
    Raises ``ValueError`` for a model in training mode (fold is for inference: call
    ``model.eval()``); the original model is never changed.

    ``example`` (optional, a batch as for :func:`batchnorm.recalibrate`): an input to run once.
    It tells the rank of each BN's input (a ``BatchNorm1d`` after a ``Linear`` matches the linear's
    features only for 2D input; without an example that is assumed), and the folded model is
    checked against the original on it (``FoldReport.max_rel_error``).

    ``clone_shared=True``: a BN after a layer that is also called elsewhere is folded into a copy
    of that layer used for this call only (the other calls keep the original); the result is
    then a ``torch.fx.GraphModule``.
    """
    training = [name or "<root>" for name, m in model.named_modules() if m.training and (is_batchnorm(m) or m is model)]
    if training:
        raise ValueError(
            f"fold() needs a model in eval mode (folding uses the running statistics), but "
            f"{', '.join(training[:5])} {'is' if len(training) == 1 else 'are'} in training mode; "
            "call model.eval() first"
        )
    out = copy.deepcopy(model)
    reference = _input_ranks(out, example) if example is not None else None
    planner = _Planner(out, reference, clone_shared)
    try:
        graph = _Tracer().trace(out)
    except Exception as e:  # any tracing failure means "use the fallback"
        planner.report.traced = False
        planner.report.trace_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        planner.plan_sequential()
    else:
        planner.plan_fx(graph)
    for _, bn, layer, side in planner.actions:
        if side == "after":
            _fold_after(layer, bn)
        else:
            _fold_before(bn, layer)
    replacements = {id(bn): _replacement(name, bn, id(bn) in planner.need_2d) for name, bn, _, _ in planner.actions}
    out = replace_modules(out, lambda m: replacements.get(id(m)))
    if planner.graph_changed:
        graph.lint()
        out = torch.fx.GraphModule(out, graph, class_name=type(model).__name__ + "Folded")
    rep = planner.report
    if example is not None:
        with torch.no_grad():
            rep.max_rel_error = _max_rel_error(run_batch(out, example, None), run_batch(model, example, None))
    if report:
        return out, rep
    if rep.unfolded:
        warnings.warn(
            f"fold: {len(rep.unfolded)} BN layer(s) left unfolded: "
            + "; ".join(f"{n} ({why})" for n, why in rep.unfolded[:5])
            + ". Use fold(model, report=True) for the full report.",
            UserWarning,
            stacklevel=2,
        )
    return out


__all__ = ["Folded2D", "FoldReport", "fold"]
