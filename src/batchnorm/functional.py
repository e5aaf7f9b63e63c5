r"""Batch normalization, the math: one place, used by every layer, tool and experiment.

Training (Ioffe & Szegedy 2015, Algorithm 1), per channel over the batch and spatial positions:

.. math::

    \mu_B = \frac1m \sum_i x_i,\quad \sigma_B^2 = \frac1m \sum_i (x_i-\mu_B)^2,\quad
    \hat x_i = \frac{x_i-\mu_B}{\sqrt{\sigma_B^2+\epsilon}},\quad y_i = \gamma \hat x_i + \beta

and the running estimates, PyTorch convention:
``running = (1 - f) * running + f * batch_stat`` with ``f = momentum`` (or ``1 / t`` for the
t-th update when the layer's momentum is ``None``); ``running_var`` receives the unbiased
variance ``m / (m - 1) * sigma_B^2``.
Inference (Algorithm 2): ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta``.

The arithmetic runs in the custom operators of :mod:`batchnorm.ops` on a backend from
:mod:`batchnorm.kernels`; this module owns every decision around them, for plain batch norm and
its fused forms alike (:func:`batch_norm_with_update`): which statistics normalize, whether and
how the running buffers move, masks, ghost batches, the non-finite guard; it validates the
arguments (:mod:`batchnorm._checks`) and merges statistics.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import ops
from ._checks import (
    ACTIVATIONS,
    INVERTIBLE,
    NONFINITE_MODES,
    SMALL_BATCH_REMEDIES,
    InputError,
    check_activation,
    check_fused,
    check_input,
    check_nonfinite_mode,
    mask_for_kernels,
)
from .kernels import reference as _ref


class Stats(NamedTuple):
    """Per-channel statistics of a batch: mean, biased variance and the number of values."""

    mean: Tensor
    var: Tensor
    count: Tensor  # type: ignore[assignment]  # (shadows tuple.count on purpose)


def _compiling() -> bool:
    """Whether a graph is being traced (torch.compile, torch.export, torch.jit.trace): then no
    value is read in Python and the registered operators are called (see :func:`batchnorm.ops.tracing`)."""
    return ops.tracing()


def _concrete(t: Tensor) -> bool:
    """Whether ``t``'s values may be read in Python (``bool(t)``): not while tracing, not on meta."""
    return not _compiling() and t.device.type != "meta"


# --------------------------------------------------------------------------- statistics


def batch_stats(input: Tensor, mask: Tensor | None = None, virtual_batch_size: int | None = None) -> Stats:
    """Statistics of ``input`` (N, C, *): per group when ghost batches are used.

    Returns :class:`Stats` with ``mean`` and biased ``var`` of shape ``(C,)`` (``(G, C)`` with
    ``virtual_batch_size``) and the valid ``count`` (shape ``()`` or ``(G,)``), accumulated in
    float32, or float64 for float64 input. ``mask`` (broadcastable to ``input`` without the
    channel axis) marks which positions count.
    """
    check_input(input, mask=mask, virtual_batch_size=virtual_batch_size)
    mean, var, count = _ref.stats(input, mask_for_kernels(mask, input), virtual_batch_size or 0)
    if not virtual_batch_size:
        return Stats(mean[0], var[0], count[0])
    return Stats(mean, var, count)


def combine_stats(mean: Tensor, var: Tensor, count: Tensor) -> Stats:
    """Merge per-part statistics along dim 0 exactly (Chan et al.'s parallel algorithm).

    ``mean``/``var`` have shape ``(P, C)`` (biased variances), ``count`` shape ``(P,)``. The result
    is the mean, biased variance and count of the union of the parts, as if computed in one
    pass; parts with count 0 contribute nothing. Computed in float64.
    """
    m = mean.double()
    n = count.double().reshape(-1, 1)
    total = n.sum(0)
    safe = total.clamp_min(1)
    mu = (n * m).sum(0) / safe
    m2 = (n * var.double()).sum(0) + (n * (m - mu).square()).sum(0)
    return Stats(mu, m2 / safe, total.reshape(()))


def inverse_std(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``, computed as every backend computes it."""
    return _ref.inverse_std(var, eps)


def unbiased(var: Tensor, count: Tensor) -> Tensor:
    """``var * n / (n - 1)``: the unbiased variance from a biased one over ``n`` values."""
    n = count.to(var.dtype)
    return var * n / (n - 1)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    stats: Stats,
    momentum: float | Tensor,
    nonfinite: str = "propagate",
) -> Tensor:
    """Move the running buffers towards the batch statistics, in place.

    ``running = running + f * (batch - running)`` with ``f = momentum`` (a float or a 0-d tensor);
    ``running_var`` receives the unbiased variance. Returns a 0-d bool tensor: whether the
    update was applied. It is not applied when the batch has fewer than two valid values per
    channel, nor, with ``nonfinite="skip"``, when a statistic is NaN/inf (a warning says so);
    ``"raise"`` raises ``FloatingPointError`` instead and ``"propagate"`` writes them like torch.
    """
    with torch.no_grad():
        return _update_running_stats(running_mean, running_var, stats, momentum, nonfinite)


def _report_nonfinite(nonfinite: str, stacklevel: int = 6) -> None:
    """Raise (``"raise"``) or warn (``"skip"``) about a batch whose statistics are not finite."""
    if nonfinite == "raise":
        raise FloatingPointError(
            "batch statistics are not finite (NaN or inf in the batch); running statistics "
            "were left unchanged. Use nonfinite='skip' to skip such batches with a warning."
        )
    warnings.warn(
        "batch statistics are not finite (NaN or inf in the batch): running statistics keep "
        "their last good values (nonfinite='skip')",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _update_dtype(buffers: torch.dtype, stats: torch.dtype) -> torch.dtype:
    """The dtype the running-statistics update computes in: the wider of the buffers' and the
    statistics' dtypes, float32 at least."""
    return torch.promote_types(torch.promote_types(buffers, stats), torch.float32)


def _update_running_stats(running_mean: Tensor, running_var: Tensor, stats: Stats,
                          momentum: float | Tensor, nonfinite: str) -> Tensor:
    mean, var_b, count = stats
    dt = _update_dtype(running_mean.dtype, mean.dtype)
    if (not isinstance(momentum, Tensor) and count.device.type == "cpu" and running_mean.dtype == dt
            and running_var.dtype == dt and not _compiling()):
        # eager, CPU count: the same update with its branches taken in Python (a handful of torch
        # calls instead of twenty; each costs tens of microseconds after a large kernel)
        n = float(count)
        ok = n > 1
        if ok:
            running = _ref.Running(running_mean, running_var, momentum, skip_nonfinite=nonfinite != "propagate")
            _ref.update_running(running, mean, var_b, n)
            ok = running.accepted
            if not ok:
                _report_nonfinite(nonfinite)
        return torch.tensor(ok, device=running_mean.device)
    var_u = unbiased(var_b.to(dt), count)
    accept = count.to(running_mean.device) > 1
    if nonfinite != "propagate":
        finite = _ref.all_finite(mean, var_u).to(running_mean.device)
        accept = accept & finite
        if _concrete(finite) and not bool(finite) and bool(count > 1):
            _report_nonfinite(nonfinite)
    f = momentum.to(device=running_mean.device, dtype=dt) if isinstance(momentum, Tensor) else momentum
    rm, rv = running_mean.to(dt), running_var.to(dt)
    running_mean.copy_(torch.where(accept, rm + f * (mean.to(rm) - rm), rm))
    running_var.copy_(torch.where(accept, rv + f * (var_u.to(rv) - rv), rv))
    return accept


def _fuse_update(x: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float | Tensor) -> bool:
    """Whether a training op may move the running statistics itself (``running=``): in eager
    mode, with a number for momentum and buffers in the dtype the update computes in (what
    :func:`_update_running_stats`' eager branch would do; ``nonfinite`` "skip" and "raise" leave
    them alone for a non-finite batch, see :class:`~batchnorm.kernels.reference.Running`)."""
    if _compiling() or isinstance(momentum, (Tensor, bool)) or x.device.type == "meta":
        return False
    dt = _update_dtype(running_mean.dtype, _ref.acc_dtype(x.dtype))
    return running_mean.dtype == dt and running_var.dtype == dt


def train_with_update(op, args: tuple, running_mean: Tensor | None, running_var: Tensor | None, *,  # type: ignore[no-untyped-def]
                      update: bool, momentum: float | Tensor, nonfinite: str, fusable: bool
                      ) -> tuple[Tensor, Tensor | bool | None]:
    """Run a training op ``op(*args) -> (y, mean, var, count)`` (``args[0]`` the input) and, with
    ``update``, move the running statistics: by the op's own kernel call when it can
    (``fusable``: one group and no mask; see :func:`_fuse_update`), else with
    :func:`update_running_stats`. Returns ``(y, accepted)``: a plain bool when the op did it
    (``False``: a non-finite batch left alone, after the warning or error ``nonfinite`` asks for),
    else the 0-d bool tensor (``None`` without ``update``). Every layer's training path goes here."""
    if update and fusable and _fuse_update(args[0], running_mean, running_var, momentum):  # type: ignore[arg-type]
        running = _ref.Running(running_mean, running_var, momentum,  # type: ignore[arg-type]
                               skip_nonfinite=nonfinite != "propagate")
        y = op(*args, running=running)[0]
        if not running.accepted:
            _report_nonfinite(nonfinite, stacklevel=5)
        return y, running.accepted
    y, mean, var, count = op(*args)
    if not update:
        return y, None
    stats = _whole_batch(mean.detach(), var.detach(), count)
    return y, update_running_stats(running_mean, running_var, stats, momentum, nonfinite)  # type: ignore[arg-type]


def _whole_batch(mean: Tensor, var: Tensor, count: Tensor) -> Stats:
    """Statistics of the whole batch from per-group ones (exact when there are several)."""
    if mean.shape[0] == 1:
        return Stats(mean[0], var[0], count[0])
    return combine_stats(mean, var, count)


# ------------------------------------------------------------------------------ forward


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
    nonfinite: str = "propagate",
) -> Tensor:
    """Batch normalization with the signature and semantics of ``torch.nn.functional.batch_norm``.

    In training, normalizes with the batch's statistics and updates ``running_mean`` and
    ``running_var`` in place (when given); otherwise normalizes with the running statistics
    (or the batch's when both are ``None``). Extra keyword-only options:

    * ``mask``: bool tensor broadcastable to ``input`` without its channel axis; statistics use
      only the valid (True) positions, weighted by their counts. Every position is normalized.
    * ``virtual_batch_size``: ghost batch normalization; in training each chunk of that many
      samples is normalized with its own statistics; running statistics use the whole batch.
    * ``nonfinite``: what a non-finite batch does to the running statistics (``"propagate"``
      like torch, ``"skip"`` with a warning, or ``"raise"``).
    """
    y, _ = batch_norm_with_update(
        input, running_mean, running_var, weight, bias,
        normalize_with_batch=training or (running_mean is None and running_var is None),
        update=training and running_mean is not None and running_var is not None,
        momentum=momentum, eps=eps, mask=mask, virtual_batch_size=virtual_batch_size,
        nonfinite=nonfinite, accepted_tensor=False,
    )
    return y


def empty_batch_update(as_tensor: bool = True) -> Tensor | bool:
    """The outcome of an update with an empty batch: the running statistics stay as they are, and
    the batch counts (as in torch, whose layers add it to ``num_batches_tracked``).

    Empty batches still go through the ops (an empty output), so gamma and beta receive zero
    gradients, as torch's do."""
    return torch.ones((), dtype=torch.bool) if as_tensor else True


def batch_norm_with_update(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    normalize_with_batch: bool,
    update: bool,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
    nonfinite: str = "propagate",
    accepted_tensor: bool = True,
    residual: Tensor | None = None,
    act: str = "identity",
    negative_slope: float = 0.01,
    inplace_abn: bool = False,
    collective: ops.Collective | None = None,
) -> tuple[Tensor, Tensor | bool | None]:
    """The general form behind :func:`batch_norm` and every layer: ``act(bn(input) + residual)``.

    The two decisions that ``training`` conflates are separate: which statistics normalize
    (``normalize_with_batch``) and whether the running statistics ``update``. Returns the
    output and, when an update was attempted, the 0-d bool tensor telling whether it was applied;
    with ``accepted_tensor=False`` that is a plain bool when the training op moved the running
    statistics itself (:func:`train_with_update`), which saves a torch call (the layers use it).

    Plain batch norm is the case ``act="identity"`` with no ``residual`` (the plain operators,
    the fastest); otherwise the fused operators apply ``act`` (one of :data:`ACTIVATIONS`, with
    ``negative_slope`` for ``"leaky_relu"``) to ``bn(input) + residual``. ``inplace_abn``
    (training only) keeps only the output for the backward (an invertible ``act``, no residual,
    no ghost batches, every weight non-zero). ``collective`` (training only) normalizes with the
    statistics of the batch of every process, reduced by that hook (:class:`batchnorm.ops.Collective`).
    """
    check_nonfinite_mode(nonfinite)
    if isinstance(input, Tensor) and input.dim() < 2 and input.numel() == 0:
        return input.clone(), None  # as torch: an empty 1-D input gives an empty output
    synced = collective is not None and normalize_with_batch
    check_input(
        input, running_mean, running_var, weight, bias,
        training=(normalize_with_batch or update) and not synced, eps=eps, mask=mask,
        virtual_batch_size=virtual_batch_size,
    )
    if update and (running_mean is None or running_var is None):
        raise ValueError("update=True needs running_mean and running_var tensors")
    if not normalize_with_batch and (running_mean is None or running_var is None):
        raise ValueError("normalizing with running statistics needs running_mean and running_var")
    fused = act != "identity" or residual is not None or inplace_abn
    if fused:
        check_fused(input, weight, residual, act, negative_slope, inplace_abn and normalize_with_batch,
                     virtual_batch_size)
    kmask = mask_for_kernels(mask, input)
    if synced:
        return _collective_train(input, running_mean, running_var, weight, bias, kmask, update=update,
                                 momentum=momentum, eps=eps, nonfinite=nonfinite, collective=collective)  # type: ignore[arg-type]
    vbs = virtual_batch_size or 0
    if normalize_with_batch:
        op: Any
        args: tuple
        if not fused:
            op, args = ops.train, (input, eps, weight, bias, kmask, vbs)
        elif inplace_abn:
            op, args = ops.act_inplace_train, (input, eps, weight, bias, kmask, act, negative_slope)
        else:
            op, args = ops.act_train, (input, residual, eps, weight, bias, kmask, vbs, act, negative_slope)
        if input.numel() == 0:  # through the op (gamma and beta get zero gradients), no update
            return op(*args)[0], (empty_batch_update(accepted_tensor) if update else None)
        y, accepted = train_with_update(op, args, running_mean, running_var, update=update, momentum=momentum,
                                        nonfinite=nonfinite, fusable=kmask is None and not vbs and not inplace_abn)
        return y, (torch.tensor(accepted) if accepted_tensor and isinstance(accepted, bool) else accepted)
    assert running_mean is not None and running_var is not None
    accepted = None
    if update and input.numel() == 0:
        accepted = empty_batch_update(accepted_tensor)
    elif update:
        stats = _whole_batch(*_ref.stats(input.detach(), kmask, 0))
        # statistics to normalize with are read before the update, as in the frozen-statistics case
        rm, rv = running_mean.clone(), running_var.clone()
        accepted = update_running_stats(running_mean, running_var, stats, momentum, nonfinite)
        running_mean, running_var = rm, rv
    if not fused:
        return apply_stats(input, running_mean, running_var, weight, bias, eps), accepted
    acc = _ref.acc_dtype(input.dtype)
    return ops.act_apply(x=input, residual=residual, mean=running_mean.detach().to(acc),
                         var=running_var.detach().to(acc), eps=eps, weight=weight, bias=bias, act=act,
                         slope=negative_slope), accepted


def _collective_train(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                      weight: Tensor | None, bias: Tensor | None, kmask: Tensor | None, *, update: bool,
                      momentum: float | Tensor, eps: float, nonfinite: str, collective: ops.Collective
                      ) -> tuple[Tensor, Tensor | bool | None]:
    """Training with the statistics of every process's batch (checks on the global count)."""
    if eps <= 0:
        raise InputError(f"batch_norm eps must be positive during training, but got {eps}; use e.g. eps=1e-5")
    y, mean, var, count = ops.collective_train(x=input, eps=eps, weight=weight, bias=bias, mask=kmask,
                                               collective=collective)
    n = float(count)
    if n == 1:
        raise InputError(
            f"Expected more than 1 value per channel when training, got 1 over all processes "
            f"(local input size {tuple(input.shape)}). " + SMALL_BATCH_REMEDIES
        )
    if not update:
        return y, None
    if n == 0:  # every process empty: as one process with an empty batch
        return y, empty_batch_update()
    return y, update_running_stats(running_mean, running_var, Stats(mean, var, count), momentum,  # type: ignore[arg-type]
                                   nonfinite)


def apply_stats(
    input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with given per-channel statistics.

    Algorithm 2 (inference) and frozen statistics; ``mean``/``var`` are treated as constants.
    """
    if ops.transformed() and _tangent(input) and (_tangent(mean) or _tangent(var)):
        raise RuntimeError(
            "batch_norm is not differentiable with respect to running_mean and running_var (as in torch): "
            "give them no forward-mode tangent, or normalize with batch statistics"
        )
    acc = _ref.acc_dtype(input.dtype)
    mean, var = mean.detach(), var.detach()
    return ops.apply(x=input, mean=mean if mean.dtype == acc else mean.to(acc),
                     var=var if var.dtype == acc else var.to(acc), eps=eps, weight=weight, bias=bias)


def _tangent(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode AD tangent."""
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


# ----------------------------------------------------------------------- renormalization


def renorm_limits(step: Tensor | int, rmax: float, dmax: float, warmup_steps: int,
                  rmax_steps: int, dmax_steps: int) -> tuple[Tensor, Tensor]:
    """Ioffe (2017)'s schedule for the clipping limits at a given training step.

    Plain BN (``r_max = 1``, ``d_max = 0``) for the first ``warmup_steps``; then both limits are
    relaxed linearly to reach ``rmax`` at step ``rmax_steps`` and ``dmax`` at ``dmax_steps``
    (the paper: 5000, 40000, 25000). Limits already reached stay there.
    """
    s = torch.as_tensor(step, dtype=torch.float64)

    def ramp(end_step: int) -> Tensor:
        span = max(end_step - warmup_steps, 0)
        if span == 0:
            return (s >= warmup_steps).double()
        return ((s - warmup_steps) / span).clamp(0.0, 1.0)

    return 1.0 + (rmax - 1.0) * ramp(rmax_steps), dmax * ramp(dmax_steps)


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    rmax: float | Tensor,
    dmax: float | Tensor,
    training: bool,
    update: bool = True,
    momentum: float | Tensor = 0.01,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
    nonfinite: str = "propagate",
) -> tuple[Tensor, Tensor | None]:
    r"""Batch renormalization (Ioffe 2017), training forward.

    .. math::
        y = \gamma\,(r\,\hat x + d) + \beta,\quad
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\!\left(\frac{\sigma_B}{\sigma}\right),\quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\!\left(\frac{\mu_B-\mu}{\sigma}\right)

    with ``sigma = sqrt(running_var + eps)``, ``sigma_B = sqrt(var_B + eps)`` and ``r``, ``d``
    treated as constants in the backward (stop-gradient). With ghost batches, each group uses
    its own ``r`` and ``d``. In eval mode (``training=False``) it is plain Algorithm 2.
    Returns ``(y, accepted)`` as :func:`batch_norm_with_update`.
    """
    if not training:
        y, _ = batch_norm_with_update(
            input, running_mean, running_var, weight, bias, normalize_with_batch=False,
            update=False, eps=eps, mask=mask, virtual_batch_size=virtual_batch_size,
            nonfinite=nonfinite,
        )
        return y, None
    check_nonfinite_mode(nonfinite)
    check_input(input, running_mean, running_var, weight, bias, training=True, eps=eps, mask=mask,
                virtual_batch_size=virtual_batch_size)
    vbs = virtual_batch_size or 0
    xhat, mean, var, count = ops.train(x=input, eps=eps, weight=None, bias=None, mask=mask_for_kernels(mask, input),
                                       vbs=vbs)
    acc = mean.dtype
    sigma = torch.sqrt(running_var.detach().to(acc) + eps)
    rmax_t = torch.as_tensor(rmax, dtype=acc, device=mean.device)
    dmax_t = torch.as_tensor(dmax, dtype=acc, device=mean.device)
    r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / rmax_t, rmax_t).detach()  # (G, C)
    d = ((mean - running_mean.detach().to(acc)) / sigma).clamp(-dmax_t, dmax_t).detach()
    scale, shift = r, d
    if weight is not None:
        scale, shift = r * weight.to(acc), d * weight.to(acc)
    if bias is not None:
        shift = shift + bias.to(acc)
    n, nd = input.shape[0], input.dim()
    y = (xhat.to(acc) * _ref.per_sample(scale, n, vbs, nd) + _ref.per_sample(shift, n, vbs, nd)).to(input.dtype)
    accepted = None
    if update and input.numel() == 0:
        accepted = empty_batch_update()
    elif update:
        stats = _whole_batch(mean.detach(), var.detach(), count)
        accepted = update_running_stats(running_mean, running_var, stats, momentum, nonfinite)
    return y, accepted  # type: ignore[return-value]


def keras_to_torch_momentum(keras_momentum: float) -> float:
    """Keras/Flax ``moving = m * moving + (1 - m) * batch`` -> PyTorch's ``momentum = 1 - m``."""
    if not 0.0 <= keras_momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {keras_momentum}")
    return 1.0 - keras_momentum


__all__ = [
    "ACTIVATIONS",
    "INVERTIBLE",
    "NONFINITE_MODES",
    "InputError",
    "Stats",
    "apply_stats",
    "batch_norm",
    "batch_norm_with_update",
    "batch_renorm",
    "batch_stats",
    "check_activation",
    "check_input",
    "combine_stats",
    "inverse_std",
    "keras_to_torch_momentum",
    "renorm_limits",
    "unbiased",
    "update_running_stats",
]

