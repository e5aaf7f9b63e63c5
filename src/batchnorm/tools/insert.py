"""Insert a BN layer after every linear/convolution layer (the seeds' step 3).

``insert(model)`` returns a new model; the original is unchanged. ``nn.Sequential`` models
(nested ones included) stay ``nn.Sequential``; any other model is traced with ``torch.fx`` and
comes back as a ``torch.fx.GraphModule`` with the BN layers as submodules named
``<layer>_bn``. The BN follows the producing layer: ``Linear``/``Conv1d`` get a
``BatchNorm1d`` over its outputs, ``Conv2d`` a ``BatchNorm2d``, ``Conv3d`` a ``BatchNorm3d``
(transposed convolutions likewise); a layer called several times gets one BN per call.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as TF
from torch import nn

from ..nn.freeze import is_batchnorm
from ..nn.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

DEFAULT_AFTER = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
WHERE = ("before_activation", "after_activation")
LAYERS = ("auto", "batchnorm", "torch")

ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LogSigmoid, nn.Tanhshrink,
)
ACTIVATION_FUNCTIONS = {
    TF.relu, TF.relu6, TF.leaky_relu, TF.elu, TF.selu, TF.celu, TF.gelu, TF.silu, TF.mish, TF.sigmoid,
    TF.tanh, TF.softplus, TF.hardtanh, TF.hardswish, TF.hardsigmoid, torch.relu, torch.sigmoid, torch.tanh,
    TF.logsigmoid,
}
ACTIVATION_METHODS = {"relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_"}

_OURS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_TORCH_OPTIONS = {"eps", "momentum", "affine", "track_running_stats", "device", "dtype"}


def _features_and_rank(layer: Any) -> tuple[int, int]:
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():  # type: ignore[misc]
        raise ValueError(
            f"{type(layer).__name__} is lazy and not initialized yet; run one batch through the model first"
        )
    if hasattr(layer, "out_channels"):
        ks = getattr(layer, "kernel_size", (1,))
        return int(layer.out_channels), len(ks) if isinstance(ks, tuple) else 1
    if hasattr(layer, "out_features"):
        return int(layer.out_features), 1
    raise ValueError(f"cannot tell how many outputs {type(layer).__name__} has (no out_features/out_channels)")


Factory = Callable[[int, nn.Module], nn.Module]


def fastest_layer(producer: nn.Module) -> str:
    """``"torch"`` or ``"batchnorm"``: the BN implementation that trains fastest after ``producer``
    on the CPU, as measured by ``batchnorm bench`` and ``benchmarks/core_bench.py`` (docs/performance.md).

    A layer without spatial output (``nn.Linear``: BN over ``(N, features)``) gets torch's: there the
    tensors are small and the cost is the call path; ours runs ATen's kernel there with its non-finite
    guard around it and is 0.81-0.87x torch's per training call at (256, 100), an MLP step 0.95-0.96x.
    A convolution gets ours: its training forward is 2-4x torch's from 4x4 planes up and
    forward+backward 1.3-1.7x at (64, 64, 8, 8).
    """
    return "batchnorm" if hasattr(producer, "out_channels") else "torch"


def _make_bn(layer: nn.Module, kind: str | Factory, bn_kwargs: dict[str, Any]) -> nn.Module:
    features, rank = _features_and_rank(layer)
    if callable(kind):
        bn = kind(features, layer)
    else:
        if kind == "auto":  # options only ours takes (virtual_batch_size, ...) ask for ours
            kind = fastest_layer(layer) if set(bn_kwargs) <= _TORCH_OPTIONS else "batchnorm"
        table = _OURS if kind == "batchnorm" else _TORCH
        bn = table[min(rank, 3)](features, **bn_kwargs)
    ref = getattr(layer, "weight", None)
    if isinstance(ref, torch.Tensor):
        bn = bn.to(device=ref.device, dtype=ref.dtype)
    bn.train(layer.training)
    return bn


def _is_activation_module(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATION_MODULES)


def _contains_producer(m: nn.Module, after: tuple[type, ...]) -> bool:
    return any(isinstance(x, after) for x in m.modules())


def _sequential_only(m: nn.Module, after: tuple[type, ...]) -> bool:
    """A tree of ``nn.Sequential`` whose other children hold no producing layer inside them."""
    if not isinstance(m, nn.Sequential):
        return False
    for child in m.children():
        if isinstance(child, nn.Sequential):
            if not _sequential_only(child, after):
                return False
        elif not isinstance(child, after) and _contains_producer(child, after):
            return False
    return True


def _drop_bias(layer: nn.Module) -> None:
    if getattr(layer, "bias", None) is not None:
        layer.register_parameter("bias", None)


def _insert_sequential(model: nn.Sequential, after, where, skip_last, bias, kind, bn_kwargs) -> nn.Module:
    order: list[tuple[nn.Sequential, int]] = []

    def collect(seq: nn.Sequential) -> None:
        for i, child in enumerate(seq):
            if isinstance(child, after):
                order.append((seq, i))
            elif isinstance(child, nn.Sequential):
                collect(child)

    collect(model)
    chosen = set((id(s), i) for s, i in (order[:-1] if skip_last else order))
    # bias drop only where every occurrence of a layer gets a BN right after it
    direct: dict[int, list[bool]] = {}
    for s, i in order:
        layer = s[i]
        nxt = s[i + 1] if i + 1 < len(s) else None
        moves = where == "after_activation" and nxt is not None and _is_activation_module(nxt)
        right_after = (id(s), i) in chosen and not moves
        direct.setdefault(id(layer), []).append(right_after)

    def rebuild(seq: nn.Sequential) -> nn.Sequential:
        names = list(seq._modules)
        numeric = all(n.isdigit() for n in names)
        items: list[tuple[str, nn.Module]] = []
        children = list(seq)
        i = 0
        while i < len(children):
            child, name = children[i], names[i]
            if isinstance(child, nn.Sequential) and not isinstance(child, after):
                items.append((name, rebuild(child)))
                i += 1
                continue
            items.append((name, child))
            if (id(seq), i) in chosen:
                bn = _make_bn(child, kind, bn_kwargs)
                nxt = children[i + 1] if i + 1 < len(children) else None
                if where == "after_activation" and nxt is not None and _is_activation_module(nxt):
                    items.append((names[i + 1], nxt))
                    i += 1
                items.append((f"{name}_bn", bn))
            i += 1
        for child in children:
            if isinstance(child, after) and not bias and all(direct.get(id(child), [False])):
                _drop_bias(child)
        if numeric:
            new = nn.Sequential(*[m for _, m in items])
        else:
            new = nn.Sequential(OrderedDict(items))
        new.train(seq.training)
        return new

    return rebuild(model)


def _is_activation_node(node: torch.fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return _is_activation_module(root.get_submodule(node.target))  # type: ignore[arg-type]
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    return False


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


def _insert_fx(model: nn.Module, after, where, skip_last, bias, kind, bn_kwargs) -> nn.Module:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise ValueError(
            f"insert() works on nn.Sequential models and on models torch.fx can trace; tracing "
            f"{type(model).__name__} failed ({type(e).__name__}: {e}). Insert BN layers by hand, or make "
            "the data-dependent control flow a leaf module."
        ) from e
    producers = [n for n in graph.nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), after)]
    chosen = producers[:-1] if skip_last else producers
    chosen_ids = {id(n) for n in chosen}
    used_names = {name for name, _ in model.named_modules()}
    direct: dict[str, list[bool]] = {}
    plans = []
    for n in producers:
        anchor = n
        users = list(n.users)
        if (id(n) in chosen_ids and where == "after_activation" and len(users) == 1
                and _is_activation_node(users[0], model)):
            anchor = users[0]
        direct.setdefault(n.target, []).append(id(n) in chosen_ids and anchor is n)  # type: ignore[arg-type]
        if id(n) in chosen_ids:
            plans.append((n, anchor))
    for n, anchor in plans:
        layer = model.get_submodule(n.target)  # type: ignore[arg-type]
        base = str(n.target).replace(".", "_") + "_bn"
        name, k = base, 1
        while name in used_names:
            name, k = f"{base}_{k}", k + 1
        used_names.add(name)
        model.add_module(name, _make_bn(layer, kind, bn_kwargs))
        with graph.inserting_after(anchor):
            new = graph.call_module(name, (anchor,))
        anchor.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    if not bias:
        for target, flags in direct.items():
            if all(flags):
                _drop_bias(model.get_submodule(target))
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__ + "WithBN")
    gm.train(model.training)
    return gm


def insert(
    model: nn.Module,
    after: tuple[type, ...] = DEFAULT_AFTER,
    where: str = "before_activation",
    *,
    skip_last: bool = True,
    bias: bool = True,
    layer: str | Callable[[int, nn.Module], nn.Module] = "auto",
    **bn_kwargs: Any,
) -> nn.Module:
    """A copy of ``model`` with a BN layer after each layer of the types in ``after``.

    * ``where``: ``"before_activation"`` puts the BN right after the layer (Ioffe & Szegedy's
      ``g(BN(Wu))``); ``"after_activation"`` puts it after the activation that directly follows
      the layer (where there is none, right after the layer).
    * ``skip_last`` (default ``True``): the last such layer (the output layer, in execution
      order) gets no BN.
    * ``bias=False``: remove the producing layer's bias where a BN directly follows every use of
      it; BN subtracts the mean, so that bias is redundant (beta takes its role).
    * ``layer``: which BN to insert. ``"auto"`` (default) picks, per producing layer, the one that
      trains fastest on the CPU for its kind of output (:func:`fastest_layer`): torch's
      ``nn.BatchNorm1d`` after an ``nn.Linear`` (small ``(N, features)`` tensors, where the Python
      call path dominates and ours measures 0.81-0.87x torch's), ours after a convolution (training
      forward 2-4x, forward+backward 1.3-1.7x torch's at late-stage plane sizes). ``"batchnorm"``
      (ours everywhere: masks, ghost batches, the non-finite guard, fused variants), ``"torch"``
      (``torch.nn.BatchNorm*`` everywhere) or a callable ``(num_features, producing_layer) ->
      module``; ``bn_kwargs`` go to the BN constructor (``momentum=...``, ``eps=...``; with
      ``"auto"``, an option only ours takes, such as ``virtual_batch_size``, selects ours).

    New BN layers take the device, dtype and training flag of their producing layer.
    """
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    if not callable(layer) and layer not in LAYERS:
        raise ValueError(f"layer must be one of {', '.join(map(repr, LAYERS))} or a callable, got {layer!r}")
    after = tuple(after) if isinstance(after, (tuple, list)) else (after,)
    if not after or not all(isinstance(t, type) for t in after):
        raise TypeError(f"after must be a tuple of module classes, got {after!r}")
    for m in model.modules():  # fail before copying anything
        if isinstance(m, after):
            _features_and_rank(m)
    out = copy.deepcopy(model)
    if _sequential_only(out, after):
        return _insert_sequential(out, after, where, skip_last, bias, layer, bn_kwargs)  # type: ignore[arg-type]
    return _insert_fx(out, after, where, skip_last, bias, layer, bn_kwargs)


__all__ = ["DEFAULT_AFTER", "LAYERS", "fastest_layer", "insert"]
