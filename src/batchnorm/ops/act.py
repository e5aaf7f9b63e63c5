"""Batch norm fused with an activation and an optional residual, as ``torch.library`` custom ops.

* ``batchnorm::act_train_forward(x, residual, eps, weight, bias, mask, vbs, act, slope)
  -> (y, mean, var, count)``: ``y = act(bn(x) + residual)`` with the batch's statistics;
* ``batchnorm::act_apply_forward(x, residual, mean, var, eps, weight, bias, act, slope) -> y``:
  with given statistics (inference, frozen statistics);
* ``batchnorm::act_inplace_train_forward(x, eps, weight, bias, mask, act, slope)``: the
  in-place activated mode (Rota Bulo et al. 2018): autograd saves only the output ``y``, not
  ``x``, and the backward recovers ``xhat`` from ``y`` (invertible activations only).

Their backward ops recompute the activation's derivative from the saved input instead of
storing the pre-activation. Each runs on the backend :func:`batchnorm.kernels.select` picks
when that backend implements the fused functions, else on
:mod:`batchnorm.kernels.reference_act`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..kernels import reference, reference_act
from ..kernels.reference import acc_dtype, inverse_std
from .base import (
    _empty_like,
    _grad_or_empty,
    backend_for,
    eager_entry,
    fake_backward_outputs,
    fake_forward_outputs,
    graph_backward,
    impl_or_op,
)
from .base import out as _out

# ----------------------------------------------------------------------------- training


@torch.library.custom_op("batchnorm::act_train_forward", mutates_args=())
def act_train_forward(
    x: Tensor,
    residual: Tensor | None,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    vbs: int,
    act: str,
    slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _train_forward_impl(x, residual, eps, weight, bias, mask, vbs, act, slope)


def _train_forward_impl(x, residual, eps, weight, bias, mask, vbs, act, slope, running=None):  # type: ignore[no-untyped-def]
    backend = backend_for("forward_train_act", x, mask, vbs)
    y, mean, var, count = backend.forward_train_act(x=x, residual=residual, eps=eps, weight=weight, bias=bias,
                                                    mask=mask, vbs=vbs, act=act, slope=slope, running=running)
    return _out(y, x), mean, var, count


@act_train_forward.register_fake
def _(x, residual, eps, weight, bias, mask, vbs, act, slope):
    return fake_forward_outputs(x, vbs)


@torch.library.custom_op("batchnorm::act_train_backward", mutates_args=())
def act_train_backward(
    dy: Tensor,
    x: Tensor,
    residual: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    count: Tensor,
    vbs: int,
    act: str,
    slope: float,
    need_input_grad: bool,
    need_residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _train_backward_impl(dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope,
                                need_input_grad, need_residual_grad)


def _train_backward_impl(dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope,  # type: ignore[no-untyped-def]
                         need_input_grad, need_residual_grad):
    backend = backend_for("backward_train_act", x, mask, vbs)
    dx, dw, db, dr = backend.backward_train_act(
        dy=dy, x=x, residual=residual, mean=mean, var=var, eps=eps, weight=weight, bias=bias, mask=mask,
        count=count, vbs=vbs, act=act, slope=slope, need_input_grad=need_input_grad,
        need_residual_grad=need_residual_grad,
    )
    return _out(dx, x), dw, db, _out(dr, x)


@act_train_backward.register_fake
def _(dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope, need_x, need_r):
    return (*fake_backward_outputs(x, need_x), _grad_or_empty(x, need_r))


def _train_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, residual, eps, weight, bias, mask, vbs, act, slope = inputs
    _, mean, var, count = output
    ctx.save_for_backward(x, weight, bias, residual, mask, mean, var, count)
    # no gradient flows through the statistics outputs, and none is made for them: autograd would
    # otherwise build a zero tensor for each in every backward (three small kernels on a GPU)
    ctx.mark_non_differentiable(mean, var, count)
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.vbs, ctx.act, ctx.slope = eps, vbs, act, slope
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.res_dtype = None if residual is None else residual.dtype


def _train_grad(ctx: Any, dy: Tensor | None, *_stat_grads: Tensor | None) -> tuple:
    if dy is None:  # the output was not used (grads are not materialised)
        return (None,) * 9
    x, weight, bias, residual, mask, mean, var, count = ctx.saved_tensors
    need_x, need_r, _, need_w, need_b = ctx.needs_input_grad[:5]
    if graph_backward(dy):  # differentiable: the closed form with the statistics recomputed from x
        mean, var, count = reference.stats(x, mask, ctx.vbs)
        backward = reference_act.backward_train_act
    else:
        backward = impl_or_op("act_train_backward", _train_backward_impl)
    dx, dw, db, dr = backward(dy, x, residual, mean, var, ctx.eps, weight, bias, mask, count, ctx.vbs, ctx.act,
                              ctx.slope, need_x, need_r)
    return (
        dx if need_x else None,
        dr.to(ctx.res_dtype) if need_r else None,
        None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None, None, None, None,
    )


torch.library.register_autograd("batchnorm::act_train_forward", _train_grad, setup_context=_train_setup)


# ---------------------------------------------------------------------- given statistics


@torch.library.custom_op("batchnorm::act_apply_forward", mutates_args=())
def act_apply_forward(
    x: Tensor,
    residual: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    act: str,
    slope: float,
) -> Tensor:
    return _apply_forward_impl(x, residual, mean, var, eps, weight, bias, act, slope)


def _apply_forward_impl(x, residual, mean, var, eps, weight, bias, act, slope):  # type: ignore[no-untyped-def]
    backend = backend_for("forward_apply_act", x)
    y = backend.forward_apply_act(x=x, residual=residual, mean=mean, var=var, eps=eps, weight=weight, bias=bias,
                                  act=act, slope=slope)
    return _out(y, x)


@act_apply_forward.register_fake
def _(x, residual, mean, var, eps, weight, bias, act, slope):
    return _empty_like(x)


@torch.library.custom_op("batchnorm::act_apply_backward", mutates_args=())
def act_apply_backward(
    dy: Tensor,
    x: Tensor,
    residual: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    act: str,
    slope: float,
    need_input_grad: bool,
    need_residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _apply_backward_impl(dy, x, residual, mean, var, eps, weight, bias, act, slope, need_input_grad,
                                need_residual_grad)


def _apply_backward_impl(dy, x, residual, mean, var, eps, weight, bias, act, slope, need_input_grad,  # type: ignore[no-untyped-def]
                         need_residual_grad):
    backend = backend_for("backward_apply_act", x)
    dx, dw, db, dr = backend.backward_apply_act(
        dy=dy, x=x, residual=residual, mean=mean, var=var, eps=eps, weight=weight, bias=bias, act=act, slope=slope,
        need_input_grad=need_input_grad, need_residual_grad=need_residual_grad,
    )
    return _out(dx, x), dw, db, _out(dr, x)


@act_apply_backward.register_fake
def _(dy, x, residual, mean, var, eps, weight, bias, act, slope, need_x, need_r):
    return (*fake_backward_outputs(x, need_x), _grad_or_empty(x, need_r))


def _apply_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, residual, mean, var, eps, weight, bias, act, slope = inputs
    ctx.save_for_backward(x, mean, var, weight, bias, residual)
    ctx.eps, ctx.act, ctx.slope = eps, act, slope
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.res_dtype = None if residual is None else residual.dtype


def _apply_grad(ctx: Any, dy: Tensor) -> tuple:
    x, mean, var, weight, bias, residual = ctx.saved_tensors
    need_x, need_r, _, _, _, need_w, need_b = ctx.needs_input_grad[:7]
    backward = reference_act.backward_apply_act if graph_backward(dy) else \
        impl_or_op("act_apply_backward", _apply_backward_impl)
    dx, dw, db, dr = backward(dy, x, residual, mean, var, ctx.eps, weight, bias, ctx.act, ctx.slope, need_x, need_r)
    return (
        dx if need_x else None,
        dr.to(ctx.res_dtype) if need_r else None,
        None,
        None,
        None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None,
        None,
    )


torch.library.register_autograd("batchnorm::act_apply_forward", _apply_grad, setup_context=_apply_setup)


# ------------------------------------------------------------------- in-place activated


@torch.library.custom_op("batchnorm::act_inplace_train_forward", mutates_args=())
def act_inplace_train_forward(
    x: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    act: str,
    slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _inplace_forward_impl(x, eps, weight, bias, mask, act, slope)


def _inplace_forward_impl(x, eps, weight, bias, mask, act, slope):  # type: ignore[no-untyped-def]
    reference_act.inverse(x.new_zeros(()), act, slope)  # raises for a non-invertible activation
    backend = backend_for("forward_train_act", x, mask, 0)
    y, mean, var, count = backend.forward_train_act(x=x, residual=None, eps=eps, weight=weight, bias=bias, mask=mask,
                                                    vbs=0, act=act, slope=slope)
    return _out(y, x), mean, var, count


@act_inplace_train_forward.register_fake
def _(x, eps, weight, bias, mask, act, slope):
    return fake_forward_outputs(x, 0)


@torch.library.custom_op("batchnorm::act_inplace_train_backward", mutates_args=())
def act_inplace_train_backward(
    dy: Tensor,
    y: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    count: Tensor,
    act: str,
    slope: float,
    need_input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _inplace_backward_impl(dy, y, var, eps, weight, bias, mask, count, act, slope, need_input_grad)


def _inplace_backward_impl(dy, y, var, eps, weight, bias, mask, count, act, slope, need_input_grad):  # type: ignore[no-untyped-def]
    acc = acc_dtype(y.dtype)
    invstd = inverse_std(var.to(acc), eps)  # (1, C)
    xhat, dact = reference_act.recover(y, weight, bias, act, slope)
    g = (dy.to(acc) * dact).to(y.dtype)
    xhat = xhat.to(y.dtype)
    scale = invstd[0] if weight is None else invstd[0] * weight.to(acc)
    backend = kernels.select("backward_train", xhat, mask, 0)
    # with xhat as the input, mean 0 and variance 1 (eps 0: invstd exactly 1), the plain backward
    # gives exactly the gradients of the layer when its weight is gamma * invstd
    dx, dw, db = backend.backward_train(
        dy=g, x=xhat, mean=torch.zeros_like(invstd), var=torch.ones_like(invstd), eps=0.0, weight=scale, mask=mask,
        count=count, vbs=0, need_input_grad=need_input_grad,
    )
    return _out(dx, y), dw, db


@act_inplace_train_backward.register_fake
def _(dy, y, var, eps, weight, bias, mask, count, act, slope, need_x):
    return fake_backward_outputs(y, need_x)


def _inplace_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, eps, weight, bias, mask, act, slope = inputs
    y, _, var, count = output
    ctx.save_for_backward(y, weight, bias, mask, var, count)  # not x: the point of the mode
    ctx.eps, ctx.act, ctx.slope = eps, act, slope
    ctx.bias_dtype = None if bias is None else bias.dtype


def _inplace_grad(ctx: Any, dy: Tensor, *_stat_grads: Tensor) -> tuple:
    y, weight, bias, mask, var, count = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    if graph_backward(dy):
        raise RuntimeError(
            "in-place activated batch norm (inplace_abn=True) keeps only its output, which has no "
            "differentiable backward: double backward (create_graph=True) and torch.func transforms "
            "need inplace_abn=False"
        )
    dx, dw, db = impl_or_op("act_inplace_train_backward", _inplace_backward_impl)(
        dy, y, var, ctx.eps, weight, bias, mask, count, ctx.act, ctx.slope, need_x
    )
    return (
        dx if need_x else None,
        None,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
        None, None, None,
    )


torch.library.register_autograd(
    "batchnorm::act_inplace_train_forward", _inplace_grad, setup_context=_inplace_setup
)


# ------------------------------------------------------------------ eager entry points (see base.eager_entry)

#: ``act_train(x, residual, eps, weight, bias, mask, vbs, act, slope, [running=]) -> (y, mean, var,
#: count)``; ``running`` as :data:`batchnorm.ops.plain.train`
act_train = eager_entry("act_train_forward", _train_forward_impl, _train_setup, _train_grad,
                        reference_act.forward_train_act)
#: ``act_apply(x, residual, mean, var, eps, weight, bias, act, slope) -> y``
act_apply = eager_entry("act_apply_forward", _apply_forward_impl, _apply_setup, _apply_grad,
                        reference_act.forward_apply_act)


def _inplace_composite(x, eps, weight, bias, mask, act, slope):  # type: ignore[no-untyped-def]
    """The in-place mode's math as torch ops (its memory saving does not apply under a transform)."""
    reference_act.inverse(x.new_zeros(()), act, slope)  # raises for a non-invertible activation
    return reference_act.forward_train_act(x=x, residual=None, eps=eps, weight=weight, bias=bias, mask=mask, vbs=0,
                                           act=act, slope=slope)


#: ``act_inplace_train(x, eps, weight, bias, mask, act, slope) -> (y, mean, var, count)``
act_inplace_train = eager_entry("act_inplace_train_forward", _inplace_forward_impl, _inplace_setup,
                                _inplace_grad, _inplace_composite)
