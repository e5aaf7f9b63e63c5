"""The batch-norm math registered as ``torch.library`` custom operators.

Two forward ops and their closed-form backward ops:

* ``batchnorm::train_forward(x, weight, bias, mask, eps, vbs) -> (y, mean, var, count)``
  normalizes with the batch's own statistics (per ghost group), Algorithm 1.
* ``batchnorm::apply_forward(x, mean, var, eps, weight, bias) -> y`` normalizes with given
  per-channel statistics (running statistics at inference, Algorithm 2; frozen layers).

Each op runs on the backend that :func:`batchnorm.kernels.select` picks, has a fake (meta)
implementation for ``torch.compile``/``torch.export``, and an autograd formula that calls the
matching backward op, so no autograd graph is ever built through the forward's arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor
from torch._C import _are_functorch_transforms_active as _functorch_active
from torch._C._functorch import is_functorch_wrapped_tensor, is_legacy_batchedtensor

from . import kernels
from .kernels import reference
from .kernels.reference import acc_dtype, num_groups


def _layout(x: Tensor) -> torch.memory_format:
    """Memory format of every output of these ops: channels_last for channels_last input."""
    if x.dim() in (4, 5) and not _functorch_active() and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


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


# ----------------------------------------------------------------------------- training


@torch.library.custom_op("batchnorm::train_forward", mutates_args=())
def train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    eps: float,
    vbs: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _train_forward_impl(x, weight, bias, mask, eps, vbs)


def _train_forward_impl(x, weight, bias, mask, eps, vbs, running=None):  # type: ignore[no-untyped-def]
    backend = kernels.select("forward_train", x, mask, vbs)
    y, mean, var, count = backend.forward_train(x, weight, bias, mask, eps, vbs, running)
    return owned(y.contiguous(memory_format=_layout(x))), mean, var, count


@train_forward.register_fake
def _(x, weight, bias, mask, eps, vbs):
    return fake_forward_outputs(x, vbs)


@torch.library.custom_op("batchnorm::train_backward", mutates_args=())
def train_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    mask: Tensor | None,
    count: Tensor,
    eps: float,
    vbs: int,
    need_input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _train_backward_impl(dy, x, mean, var, weight, mask, count, eps, vbs, need_input_grad)


def _train_backward_impl(dy, x, mean, var, weight, mask, count, eps, vbs, need_input_grad):  # type: ignore[no-untyped-def]
    backend = kernels.select("backward_train", x, mask, vbs)
    dx, dw, db = backend.backward_train(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad)
    dx = dx.contiguous(memory_format=_layout(x)) if dx is not None else x.new_empty(0)
    return dx, dw, db


@train_backward.register_fake
def _(dy, x, mean, var, weight, mask, count, eps, vbs, need_input_grad):
    return fake_backward_outputs(x, need_input_grad)


def _train_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, mask, eps, vbs = inputs
    _, mean, var, count = output
    ctx.save_for_backward(x, weight, mask, mean, var, count)
    ctx.mark_non_differentiable(mean, var, count)
    ctx.eps, ctx.vbs = eps, vbs
    ctx.bias_dtype = None if bias is None else bias.dtype


def _train_grad(ctx: Any, dy: Tensor, *_stat_grads: Tensor) -> tuple:
    x, weight, mask, mean, var, count = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if graph_backward(dy):
        dx, dw, db = reference.backward_train_graph(dy, x, ctx.eps, weight, mask, ctx.vbs, need_x)
    else:
        backward = impl_or_op("train_backward", _train_backward_impl)
        dx, dw, db = backward(dy, x, mean, var, weight, mask, count, ctx.eps, ctx.vbs, need_x)
    return (
        dx if need_x else None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None,
        None,
        None,
    )


torch.library.register_autograd("batchnorm::train_forward", _train_grad, setup_context=_train_setup)


# ---------------------------------------------------------------------- given statistics


@torch.library.custom_op("batchnorm::apply_forward", mutates_args=())
def apply_forward(
    x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    return _apply_forward_impl(x, mean, var, eps, weight, bias)


def _apply_forward_impl(x, mean, var, eps, weight, bias):  # type: ignore[no-untyped-def]
    backend = kernels.select("forward_apply", x)
    return owned(backend.forward_apply(x, mean, var, eps, weight, bias).contiguous(memory_format=_layout(x)))


@apply_forward.register_fake
def _(x, mean, var, eps, weight, bias):
    return _empty_like(x)


@torch.library.custom_op("batchnorm::apply_backward", mutates_args=())
def apply_backward(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, need_input_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _apply_backward_impl(dy, x, mean, var, eps, weight, need_input_grad)


def _apply_backward_impl(dy, x, mean, var, eps, weight, need_input_grad):  # type: ignore[no-untyped-def]
    backend = kernels.select("backward_apply", x)
    dx, dw, db = backend.backward_apply(dy, x, mean, var, eps, weight, need_input_grad)
    dx = dx.contiguous(memory_format=_layout(x)) if dx is not None else x.new_empty(0)
    return dx, dw, db


@apply_backward.register_fake
def _(dy, x, mean, var, eps, weight, need_input_grad):
    return fake_backward_outputs(x, need_input_grad)


def _apply_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, mean, var, eps, weight, bias = inputs
    ctx.save_for_backward(x, mean, var, weight)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _apply_grad(ctx: Any, dy: Tensor) -> tuple:
    x, mean, var, weight = ctx.saved_tensors
    need_x, _, _, _, need_w, need_b = ctx.needs_input_grad[:6]
    if graph_backward(dy):  # the closed form is already differentiable: torch ops, statistics constant
        dx, dw, db = reference.backward_apply(dy, x, mean, var, ctx.eps, weight, need_x)
    else:
        dx, dw, db = impl_or_op("apply_backward", _apply_backward_impl)(dy, x, mean, var, ctx.eps, weight, need_x)
    return (
        dx if need_x else None,
        None,
        None,
        None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
    )


torch.library.register_autograd("batchnorm::apply_forward", _apply_grad, setup_context=_apply_setup)


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

    Keyword arguments go to ``impl`` only, in eager mode (the training ops' ``running``: the
    running statistics moved by the same kernel call); the registered op has no such argument,
    so a caller passes them only when not tracing."""

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

    def entry(*args: Any, **extra: Any) -> Any:
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


class _TrainLean(torch.autograd.Function):
    """:data:`train` for the layers' common eager call (one group, no mask) on a backend with
    ``train_lean``/``backward_lean`` (the cpu one), returning ``y`` only (see :func:`train_lean`):
    the same kernels and gradients with fewer Python steps around them. The backward runs that
    backend's ``backward_lean`` when the dispatcher still picks it, else the general formula
    (:func:`_train_grad`, differentiable when the gradient must be) with the statistics as
    tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend, running):  # type: ignore[no-untyped-def]
        y, stats = backend.train_lean(x, weight, bias, eps, running)
        ctx.save_for_backward(x, weight)
        ctx.stats, ctx.backend, ctx.eps, ctx.vbs = stats, backend, eps, 0
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[no-untyped-def]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        backend = ctx.backend
        forced = kernels.get_backend()  # in "auto" mode the forward's backend is still the one picked
        if (graph_backward(dy) or backend.name in kernels._disabled
                or (forced != "auto" and kernels.select("backward_train", x) is not backend)):
            mean, var, count = backend.lean_stats(ctx.stats)
            return (*_train_grad(_Saved(ctx, (x, weight, None, mean, var, count)), dy)[:3], None, None, None)
        dx, dw, db = backend.backward_lean(dy, x, ctx.stats, ctx.eps, weight, need_x)
        if need_w and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        if need_b and db.dtype != ctx.bias_dtype:
            db = db.to(ctx.bias_dtype)
        return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None


class _Saved:
    """A context for :func:`_train_grad` with the given saved tensors."""

    def __init__(self, ctx: Any, saved: tuple) -> None:
        self.saved_tensors, self.needs_input_grad = saved, ctx.needs_input_grad
        self.eps, self.vbs, self.bias_dtype = ctx.eps, ctx.vbs, ctx.bias_dtype


def train_lean(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: Any,
               running: reference.Running | None) -> Tensor:
    """The normalized output of :data:`train` (no mask, one group) computed by ``backend`` (the
    module the dispatcher selected for ``forward_train`` on ``x``; it has ``train_lean``), in
    eager mode with no transform active: the caller checks both. ``running`` is moved by the same
    call (``running.accepted`` tells). The output is a tensor of its own in ``x``'s memory layout."""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _TrainLean.apply(x, weight, bias, eps, backend, running)
    return backend.train_lean(x, weight, bias, eps, running)[0]


#: ``train(x, weight, bias, mask, eps, vbs, [running=]) -> (y, mean, var, count)``: training-mode
#: normalization; with ``running`` (:class:`~batchnorm.kernels.reference.Running`, eager mode, one
#: group, no mask) the backend moves the running statistics in the same call.
train = eager_entry("train_forward", _train_forward_impl, _train_setup, _train_grad, reference.forward_train)
#: ``apply(x, mean, var, eps, weight, bias) -> y``: normalization with given statistics.
apply = eager_entry("apply_forward", _apply_forward_impl, _apply_setup, _apply_grad, reference.forward_apply)
