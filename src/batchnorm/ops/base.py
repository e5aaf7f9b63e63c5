"""What every operator of :mod:`batchnorm.ops` shares: the tracing and transform tests, the
output layout, the fake outputs, and the eager entry points (:func:`eager_entry`)."""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor
from torch._C import _are_functorch_transforms_active as _functorch_active
from torch._C._functorch import is_functorch_wrapped_tensor, is_legacy_batchedtensor

from .. import kernels
from ..kernels import reference_act
from ..kernels.common import channels_last_format
from ..kernels.reference import acc_dtype, num_groups


def _layout(x: Tensor) -> torch.memory_format:
    """Memory format of every output of these ops: channels_last for (non-contiguous) channels_last
    input outside ``torch.func`` transforms, else contiguous."""
    if _functorch_active() or x.is_contiguous():
        return torch.contiguous_format
    return channels_last_format(x) or torch.contiguous_format


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch < 2.5 lacks it


def _tracing() -> bool:
    """Whether torch.compile, torch.export or torch.jit.trace is tracing (then the registered ops
    must be used: they are what the graph records)."""
    return torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing()


def transformed() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, jvp, batched gradients) or
    forward-mode AD (``torch.autograd.forward_ad.dual_level``) is active. Those need the math as
    differentiable torch ops: the ops then run their composite form (the reference backend's
    functions, plain torch operations), which every transform and every order of
    differentiation goes through."""
    return _functorch_active() or _fwad._current_level >= 0


def graph_backward(dy: Tensor) -> bool:
    """Inside a backward formula, given the incoming gradient ``dy``: whether the gradient itself
    must be differentiable (a backward with ``create_graph=True``, where autograd leaves grad mode
    on) or transformable (``torch.func``; batched gradients, ``is_grads_batched=True``, whose ``dy``
    is a batched tensor with no storage). Eager mode only; the registered formulas are traced as they
    are."""
    return not _tracing() and (torch.is_grad_enabled() or _functorch_active() or is_functorch_wrapped_tensor(dy)
                               or is_legacy_batchedtensor(dy))


def owned(t: Tensor) -> Tensor:
    """``t``, copied if it is a view: an autograd function's output that is a view cannot be
    modified in place (``ReLU(inplace=True)`` or ``out += identity`` after the layer)."""
    return t.clone() if t._base is not None else t


def _empty_like(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))


def _grad_or_empty(x: Tensor, needed: bool) -> Tensor:
    """Fake of an input gradient: like ``x`` when needed, else the empty placeholder the ops return."""
    return _empty_like(x) if needed else x.new_empty(0)


def fake_forward_outputs(x: Tensor, vbs: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake ``(y, mean, var, count)`` of a training forward op: statistics per ghost group."""
    g = num_groups(x.shape[0], vbs)
    stat = x.new_empty((g, x.shape[1]), dtype=acc_dtype(x.dtype))
    return _empty_like(x), stat, torch.empty_like(stat), x.new_empty((g,), dtype=stat.dtype)


def fake_backward_outputs(x: Tensor, need_input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Fake ``(dx, dweight, dbias)`` of a backward op; the parameter gradients in the statistics' dtype."""
    param = x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))
    return _grad_or_empty(x, need_input_grad), param, torch.empty_like(param)


def out(t: Tensor | None, x: Tensor) -> Tensor:
    """An op's tensor output in ``x``'s layout, a tensor of its own (``x.new_empty(0)`` for none)."""
    return owned(t.contiguous(memory_format=_layout(x))) if t is not None else x.new_empty(0)


def backend_for(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> ModuleType:
    """The backend that runs ``op``: the selected one if it has it (every backend has the plain
    ops; the fused ones are optional), else ``reference_act``."""
    module = kernels.select(op, x, mask, vbs)
    return module if hasattr(module, op) else reference_act


# ------------------------------------------------------------------ eager entry points
#
# The registered ops are what torch.compile and torch.export see. In eager mode the same
# implementations and autograd formulas run through a plain autograd.Function (or, when nothing
# needs a gradient, directly), which skips the Python dispatch of torch.library: a large share of
# the cost for small tensors, and tens of microseconds per call after a large kernel.


def _needs_grad(args: tuple) -> bool:
    """Whether autograd must record a call with these arguments."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def impl_or_op(name: str, impl: Any) -> Any:
    """``impl`` in eager mode; the registered op ``batchnorm::name`` while tracing (for backward formulas)."""
    return getattr(torch.ops.batchnorm, name) if _tracing() else impl


def eager_entry(name: str, impl: Any, setup: Any, grad: Any, composite: Any) -> Any:
    """The entry point of the registered op ``batchnorm::name``: the op itself while tracing;
    ``composite`` (the same math as differentiable torch ops, same arguments and outputs) under a
    ``torch.func`` transform or forward-mode AD (:func:`transformed`); else ``impl`` under an
    autograd.Function with the op's ``setup``/``grad``, or bare ``impl`` when no argument needs
    a gradient.

    The op's own arguments may be passed by name too (in the op's order, that of
    :mod:`batchnorm.kernels.protocol`); they are bound to their positions first. The other keyword
    arguments go to ``impl`` only, in eager mode (the training ops' ``running``: the running
    statistics moved by the same kernel call); the registered op has no such argument, so a caller
    passes them only when not tracing."""
    params = inspect.signature(impl).parameters.values()
    op_args = tuple(p.name for p in params if p.default is inspect.Parameter.empty)

    # forward(ctx, ...) style: a separate setup_context makes autograd bind arguments with inspect
    def forward(ctx, *inputs_extra):  # type: ignore[no-untyped-def]
        inputs, extra = inputs_extra[:-1], inputs_extra[-1]
        output = impl(*inputs, **extra)
        setup(ctx, inputs, output)
        return output

    def backward(ctx, *grads):  # type: ignore[no-untyped-def]
        return (*grad(ctx, *grads), None)  # no gradient for the keyword arguments

    function: Any = type(f"_{name}", (torch.autograd.Function,),
                         {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def bind(args: tuple, extra: dict[str, Any]) -> tuple:
        """``args`` completed by the op's arguments passed by name (removed from ``extra``)."""
        given = [n for n in op_args[:len(args)] if n in extra]
        missing = [n for n in op_args[len(args):] if n not in extra]
        if given or missing:
            raise TypeError(f"{name}() takes ({', '.join(op_args)}): "
                            + (f"{given} given twice" if given else f"{missing} missing"))
        return (*args, *(extra.pop(n) for n in op_args[len(args):]))

    def entry(*args: Any, **extra: Any) -> Any:
        if extra and (len(args) < len(op_args) or not extra.keys().isdisjoint(op_args)):
            args = bind(args, extra)
        if _tracing():
            if extra:
                raise RuntimeError(f"batchnorm::{name} takes {sorted(extra)} in eager mode only")
            return getattr(torch.ops.batchnorm, name)(*args)
        if transformed():
            return composite(*args, **extra)
        if not _needs_grad(args):
            return impl(*args, **extra)
        return function.apply(*args, extra)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"Eager entry point of ``batchnorm::{name}`` (see the module docstring)."
    return entry
