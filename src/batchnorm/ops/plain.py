"""Plain batch norm as ``torch.library`` custom operators: two forward ops and their closed-form backward ops:

* ``batchnorm::train_forward(x, eps, weight, bias, mask, vbs) -> (y, mean, var, count)``
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
from torch import Tensor

from .. import kernels
from ..kernels import reference
from .base import (
    _empty_like,
    _layout,
    eager_entry,
    fake_backward_outputs,
    fake_forward_outputs,
    graph_backward,
    impl_or_op,
    owned,
)

# ----------------------------------------------------------------------------- training


@torch.library.custom_op("batchnorm::train_forward", mutates_args=())
def train_forward(
    x: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    vbs: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _train_forward_impl(x, eps, weight, bias, mask, vbs)


def _train_forward_impl(x, eps, weight, bias, mask, vbs, running=None):  # type: ignore[no-untyped-def]
    backend = kernels.select("forward_train", x, mask, vbs)
    y, mean, var, count = backend.forward_train(x=x, eps=eps, weight=weight, bias=bias, mask=mask, vbs=vbs,
                                                running=running)
    return owned(y.contiguous(memory_format=_layout(x))), mean, var, count


@train_forward.register_fake
def _(x, eps, weight, bias, mask, vbs):
    return fake_forward_outputs(x, vbs)


@torch.library.custom_op("batchnorm::train_backward", mutates_args=())
def train_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    mask: Tensor | None,
    count: Tensor,
    vbs: int,
    need_input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _train_backward_impl(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad)


def _train_backward_impl(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad):  # type: ignore[no-untyped-def]
    backend = kernels.select("backward_train", x, mask, vbs)
    dx, dw, db = backend.backward_train(dy=dy, x=x, mean=mean, var=var, eps=eps, weight=weight, mask=mask,
                                        count=count, vbs=vbs, need_input_grad=need_input_grad)
    dx = dx.contiguous(memory_format=_layout(x)) if dx is not None else x.new_empty(0)
    return dx, dw, db


@train_backward.register_fake
def _(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad):
    return fake_backward_outputs(x, need_input_grad)


def _train_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, eps, weight, bias, mask, vbs = inputs
    _, mean, var, count = output
    ctx.save_for_backward(x, weight, mask, mean, var, count)
    # no gradient flows through the statistics outputs, and none is made for them: autograd would
    # otherwise build a zero tensor for each in every backward (three small kernels on a GPU)
    ctx.mark_non_differentiable(mean, var, count)
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.vbs = eps, vbs
    ctx.bias_dtype = None if bias is None else bias.dtype


def _train_grad(ctx: Any, dy: Tensor | None, *_stat_grads: Tensor | None) -> tuple:
    if dy is None:  # the output was not used (grads are not materialised)
        return (None,) * 6
    x, weight, mask, mean, var, count = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    if graph_backward(dy):
        dx, dw, db = reference.backward_train_graph(dy, x, ctx.eps, weight, mask, ctx.vbs, need_x)
    else:
        backward = impl_or_op("train_backward", _train_backward_impl)
        dx, dw, db = backward(dy, x, mean, var, ctx.eps, weight, mask, count, ctx.vbs, need_x)
    return (
        dx if need_x else None,
        None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
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
    y = backend.forward_apply(x=x, mean=mean, var=var, eps=eps, weight=weight, bias=bias)
    return owned(y.contiguous(memory_format=_layout(x)))


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
    dx, dw, db = backend.backward_apply(dy=dy, x=x, mean=mean, var=var, eps=eps, weight=weight,
                                        need_input_grad=need_input_grad)
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


class _TrainLean(torch.autograd.Function):
    """:data:`train` for the layers' common eager call (one group, no mask) on a backend with
    ``train_lean``/``backward_lean`` (the cpu one), returning ``y`` only (see :func:`train_lean`):
    the same kernels and gradients with fewer Python steps around them. The backward runs that
    backend's ``backward_lean`` when the dispatcher still picks it, else the general formula
    (:func:`_train_grad`, differentiable when the gradient must be) with the statistics as
    tensors."""

    @staticmethod
    def forward(ctx, x, eps, weight, bias, backend, running):  # type: ignore[no-untyped-def]
        y, stats = backend.train_lean(x=x, eps=eps, weight=weight, bias=bias, running=running)
        ctx.save_for_backward(x, weight)
        ctx.stats, ctx.backend, ctx.eps, ctx.vbs = stats, backend, eps, 0
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[no-untyped-def]
        x, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        backend = ctx.backend
        forced = kernels.get_backend()  # in "auto" mode the forward's backend is still the one picked
        if (graph_backward(dy) or backend.name in kernels._disabled
                or (forced != "auto" and kernels.select("backward_train", x) is not backend)):
            mean, var, count = backend.lean_stats(ctx.stats)
            return (*_train_grad(_Saved(ctx, (x, weight, None, mean, var, count)), dy)[:4], None, None)
        dx, dw, db = backend.backward_lean(dy=dy, x=x, stats=ctx.stats, eps=ctx.eps, weight=weight,
                                           need_input_grad=need_x)
        if need_w and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        if need_b and db.dtype != ctx.bias_dtype:
            db = db.to(ctx.bias_dtype)
        return dx if need_x else None, None, dw if need_w else None, db if need_b else None, None, None


class _Saved:
    """A context for :func:`_train_grad` with the given saved tensors."""

    def __init__(self, ctx: Any, saved: tuple) -> None:
        self.saved_tensors, self.needs_input_grad = saved, ctx.needs_input_grad
        self.eps, self.vbs, self.bias_dtype = ctx.eps, ctx.vbs, ctx.bias_dtype


def train_lean(x: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None, backend: Any,
               running: reference.Running | None) -> Tensor:
    """The normalized output of :data:`train` (no mask, one group) computed by ``backend`` (the
    module the dispatcher selected for ``forward_train`` on ``x``; it has ``train_lean``), in
    eager mode with no transform active: the caller checks both. ``running`` is moved by the same
    call (``running.accepted`` tells). The output is a tensor of its own in ``x``'s memory layout."""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return _TrainLean.apply(x, eps, weight, bias, backend, running)
    return backend.train_lean(x=x, eps=eps, weight=weight, bias=bias, running=running)[0]


#: ``train(x, eps, weight, bias, mask, vbs, [running=]) -> (y, mean, var, count)``: training-mode
#: normalization; with ``running`` (:class:`~batchnorm.kernels.reference.Running`, eager mode, one
#: group, no mask) the backend moves the running statistics in the same call.
train = eager_entry("train_forward", _train_forward_impl, _train_setup, _train_grad, reference.forward_train)
#: ``apply(x, mean, var, eps, weight, bias) -> y``: normalization with given statistics.
apply = eager_entry("apply_forward", _apply_forward_impl, _apply_setup, _apply_grad, reference.forward_apply)
