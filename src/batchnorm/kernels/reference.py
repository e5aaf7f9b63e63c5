"""Reference backend: the batch-norm math in plain torch ops.

This is the ground truth every other backend is tested against. It is written to be read,
not to be fast, and it supports everything: any rank, any layout, masks and ghost batches,
float16/bfloat16/float32/float64 (statistics in float32, or float64 for float64 input).

Conventions shared by every backend (see :mod:`batchnorm.kernels`):

* ``x`` has shape ``(N, C, *S)``; the channel is dim 1 (the functional layer moves it there).
* ``mask`` is ``None`` or a bool tensor of shape ``(N, 1, *S)`` marking valid positions.
* ``vbs`` is the ghost (virtual) batch size, ``0`` for "the whole batch is one group".
  Samples are split into ``G = ceil(N / vbs)`` consecutive groups; each group has its own
  statistics, so ``mean``, ``var``, ``invstd``, the backward sums have shape ``(G, C)`` and
  ``count`` has shape ``(G,)``. A last, partial group is padded with invalid rows.
* Statistics: two-pass mean and *biased* variance over the valid positions of each group.
* The output is computed at every position (valid or not); only valid positions shape the
  statistics. The closed-form gradient follows from that: with ``w`` the validity of a
  position and ``n`` the valid count of its group,

  ``dx = gamma * invstd * (dy - w * (sum(dy) + xhat * sum(dy * xhat)) / n)``

  where both sums run over every position of the group (padded rows have ``dy = 0``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .protocol import Running

name = "reference"


def all_finite(mean: Tensor, var_u: Tensor) -> Tensor:
    """0-d bool tensor: every channel's mean and unbiased variance is finite (the test behind
    ``skip_nonfinite`` and ``nonfinite="skip"``/``"raise"``)."""
    return torch.isfinite(mean).all() & torch.isfinite(var_u).all()


def update_running(running: Running, mean: Tensor, var: Tensor, n: float) -> None:
    """Move ``running`` towards one group's statistics (``mean``, biased ``var``, over ``n > 1``
    values) in place; non-finite statistics are written as they are (torch's behaviour), or with
    ``running.skip_nonfinite`` not at all (``running.accepted`` tells)."""
    if mean.dim() > 1 and mean.shape[0] != 1:
        raise ValueError(f"running statistics move with one group's statistics, got shape {tuple(mean.shape)} "
                         "(ghost batches: merge the groups first, see batchnorm.functional.combine_stats)")
    rm, rv, f = running.mean, running.var, running.momentum
    mean, var = mean.detach(), var.detach()  # no gradient, nor forward-mode tangent, into the buffers
    var_u = var.reshape(-1).to(rv.dtype) * (n / (n - 1))
    running.accepted = not running.skip_nonfinite or bool(all_finite(mean, var_u))
    if running.accepted:
        with torch.no_grad():
            rm.lerp_(mean.reshape(-1).to(rm.dtype), f)
            rv.lerp_(var_u, f)


def kernel_can_update(running: Running | None, device: torch.device, dtype: torch.dtype,
                      checks_finite: bool = False) -> bool:
    """Whether a backend's kernel may move ``running`` itself: 1-D contiguous vectors of ``dtype``
    on ``device`` that do not require grad, and a number for momentum; with
    ``running.skip_nonfinite`` only a kernel that ``checks_finite`` (and sets ``running.accepted``).
    Otherwise the backend calls :func:`finish_running` with ``updated=False`` and torch does it."""
    if running is None or (running.skip_nonfinite and not checks_finite):
        return False
    rm, rv, f = running.mean, running.var, running.momentum
    return (isinstance(f, (int, float)) and not isinstance(f, bool) and rm.device == device
            and rm.dtype == rv.dtype == dtype and rm.dim() == rv.dim() == 1 and rm.is_contiguous()
            and rv.is_contiguous() and not (rm.requires_grad or rv.requires_grad))


def finish_running(running: Running | None, updated: bool, mean: Tensor, var: Tensor, n: float) -> None:
    """After a training kernel: tell autograd the buffers changed if the kernel moved them
    (``updated``, as an in-place torch op would), else move them with :func:`update_running`."""
    if running is None:
        return
    if updated:
        if running.accepted:
            torch.autograd.graph.increment_version((running.mean, running.var))
    else:
        update_running(running, mean, var, n)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype statistics are accumulated in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_groups(n: int, vbs: int) -> int:
    """Number of ghost groups for a batch of ``n`` samples (``vbs == 0``: one group)."""
    if vbs <= 0 or vbs >= n:
        return 1
    return -(-n // vbs)


def group(t: Tensor, vbs: int) -> Tensor:
    """``(N, ...) -> (G, k, ...)``: a view when no padding is needed, else a zero-padded copy."""
    n = t.shape[0]
    g = num_groups(n, vbs)
    if g == 1:
        return t.unsqueeze(0)
    pad = g * vbs - n
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    return t.unflatten(0, (g, vbs))


def per_channel(stat: Tensor, ndim: int) -> Tensor:
    """Reshape a ``(G, C)`` statistic to broadcast against a grouped ``(G, k, C, *S)`` tensor."""
    return stat.reshape(stat.shape[0], 1, stat.shape[1], *([1] * (ndim - 3)))


def per_sample(stat: Tensor, n: int, vbs: int, ndim: int) -> Tensor:
    """A ``(G, C)`` per-group statistic shaped to broadcast against the *ungrouped* ``(N, C, *S)``
    input: ``(1, C, 1, ...)`` for one group, else ``(N, C, 1, ...)`` with each sample's group row.

    Elementwise results are computed on the input itself, never on a grouped view of it, so
    every output is a tensor of its own (a view returned from an autograd function cannot be
    modified in place, e.g. by ``ReLU(inplace=True)`` after the layer)."""
    if stat.shape[0] != 1:
        stat = stat.repeat_interleave(vbs, dim=0)[:n]
    return stat.reshape(stat.shape[0], stat.shape[1], *([1] * (ndim - 2)))


def per_feature(param: Tensor, ndim: int) -> Tensor:
    """A ``(C,)`` parameter shaped to broadcast against ``(N, C, *S)``."""
    return param.reshape(1, -1, *([1] * (ndim - 2)))


def _validity(x: Tensor, mask: Tensor | None, vbs: int, dtype: torch.dtype) -> Tensor | None:
    """Grouped validity weights ``(G, k, 1, *S)`` in ``dtype``; ``None`` when every position counts."""
    n = x.shape[0]
    g = num_groups(n, vbs)
    padded = g > 1 and g * vbs > n
    if mask is None and not padded:
        return None
    if mask is None:
        w = x.new_ones((n, 1, *([1] * (x.dim() - 2))), dtype=dtype)
    else:
        w = mask.to(dtype)
    w = w.expand(n, 1, *x.shape[2:])
    return group(w, vbs)


def _reduce_dims(ndim: int) -> list[int]:
    """Dims of a grouped tensor ``(G, k, C, *S)`` that statistics reduce over."""
    return [1, *range(3, ndim)]


def _match_layout(y: Tensor, like: Tensor) -> Tensor:
    """Give ``y`` the memory format of ``like`` (channels_last stays channels_last); under a
    ``torch.func`` transform, where memory formats cannot be queried, ``y`` as it is."""
    if torch._C._are_functorch_transforms_active():
        return y
    if like.dim() in (4, 5) and not like.is_contiguous():
        fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
        if like.is_contiguous(memory_format=fmt):
            return y.contiguous(memory_format=fmt)
    return y


def stats(x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group mean, biased variance and valid count: ``(G, C), (G, C), (G,)``.

    Two passes (mean first, then the mean of squared deviations) in float32, or float64 for
    float64 input, which avoids the cancellation of the one-pass ``E[x^2] - E[x]^2``.
    A group without valid positions gets mean 0, variance 0 and count 0.
    """
    acc = acc_dtype(x.dtype)
    xg = group(x, vbs).to(acc)
    dims = _reduce_dims(xg.dim())
    w = _validity(x, mask, vbs, acc)
    if w is None:
        per_group = math.prod(xg.shape[1:]) // xg.shape[2]
        count = torch.full((xg.shape[0],), float(per_group), dtype=acc, device=x.device)
        mean = xg.mean(dims)
        var = (xg - per_channel(mean, xg.dim())).square().mean(dims)
        return mean, var, count
    count = w.sum(dims).reshape(-1)
    denom = count.clamp_min(1).unsqueeze(1)
    mean = (xg * w).sum(dims) / denom
    var = ((xg - per_channel(mean, xg.dim())).square() * w).sum(dims) / denom
    return mean, var, count


def normalize(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    vbs: int = 0,
) -> Tensor:
    """``y = (x - mean) * invstd * weight + bias`` per group and channel, in the input dtype."""
    acc = acc_dtype(x.dtype)
    n, nd = x.shape[0], x.dim()
    scale = invstd.to(acc)
    if weight is not None:
        scale = scale * weight.to(acc)
    centered = x.to(acc) - per_sample(mean.to(acc), n, vbs, nd)
    if bias is None:
        y = centered * per_sample(scale, n, vbs, nd)
    else:
        y = torch.addcmul(per_feature(bias.to(acc), nd), centered, per_sample(scale, n, vbs, nd))
    return _match_layout(y.to(x.dtype), x)


def backward_reduce(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, vbs: int = 0
) -> tuple[Tensor, Tensor]:
    """Per-group ``sum(dy)`` and ``sum(dy * xhat)`` over every position: ``(G, C)`` each."""
    acc = acc_dtype(x.dtype)
    xg = group(x, vbs).to(acc)
    dyg = group(dy, vbs).to(acc)
    dims = _reduce_dims(xg.dim())
    xhat = (xg - per_channel(mean.to(acc), xg.dim())) * per_channel(invstd.to(acc), xg.dim())
    return dyg.sum(dims), (dyg * xhat).sum(dims)


def backward_elemt(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: Tensor,
    mask: Tensor | None = None,
    vbs: int = 0,
) -> Tensor:
    """Input gradient of training-mode BN from the reduced sums (see the module docstring)."""
    acc = acc_dtype(x.dtype)
    n, nd = x.shape[0], x.dim()
    invstd = invstd.to(acc)
    xhat = (x.to(acc) - per_sample(mean.to(acc), n, vbs, nd)) * per_sample(invstd, n, vbs, nd)
    scale = invstd if weight is None else invstd * weight.to(acc)
    cnt = count.to(acc).clamp_min(1).unsqueeze(1)
    correction = torch.addcmul(per_sample(sum_dy.to(acc) / cnt, n, vbs, nd), xhat,
                               per_sample(sum_dy_xhat.to(acc) / cnt, n, vbs, nd))
    if mask is not None:
        correction = correction * mask.to(acc)
    dx = (dy.to(acc) - correction) * per_sample(scale, n, vbs, nd)
    return _match_layout(dx.to(x.dtype), x)


# --- fused entry points (what the custom ops call; fast backends may override these) ---


def forward_train(
    x: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
    vbs: int,
    running: Running | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training forward (Algorithm 1): ``(y, mean, var, count)`` with per-group statistics.

    With ``running`` (one group, no mask: the caller's promise), the running statistics are
    moved too (:func:`update_running`); every backend's ``forward_train`` takes it."""
    mean, var, count = stats(x, mask, vbs)
    y = normalize(x, mean, inverse_std(var, eps), weight, bias, vbs)
    if running is not None:
        update_running(running, mean, var, x.numel() // x.shape[1])
    return y, mean, var, count


def inverse_std(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``, in ``var``'s dtype: the one rule every backend, layer and tool uses."""
    return torch.add(var, eps).rsqrt_()


def forward_apply(
    x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """Normalize with given statistics of shape ``(C,)`` (Algorithm 2, frozen statistics)."""
    return normalize(x, mean.unsqueeze(0), inverse_std(var, eps).unsqueeze(0), weight, bias, 0)


def backward_train(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    mask: Tensor | None,
    count: Tensor,
    vbs: int,
    need_input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Closed-form backward of :func:`forward_train` from its statistics ``(mean, var)`` and
    ``eps``: ``(dx, dweight, dbias)``.

    ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` summed over groups, each ``(C,)``.
    """
    inv = inverse_std(var, eps)
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, inv, vbs)
    dx = None
    if need_input_grad:
        dx = backward_elemt(dy, x, mean, inv, weight, sum_dy, sum_dy_xhat, count, mask, vbs)
    return dx, sum_dy_xhat.sum(0), sum_dy.sum(0)


def backward_train_graph(
    dy: Tensor,
    x: Tensor,
    eps: float,
    weight: Tensor | None,
    mask: Tensor | None,
    vbs: int,
    need_input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """:func:`backward_train` with the statistics recomputed from ``x`` by differentiable torch
    ops: the gradient as a function of ``(dy, x, weight)`` that autograd can differentiate again
    (double backward, ``create_graph=True``) and ``torch.func`` can transform (batched
    gradients). The closed form alone treats the saved mean and variance as constants."""
    mean, var, count = stats(x, mask, vbs)
    return backward_train(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad)


def backward_apply(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    need_input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Backward of :func:`forward_apply` (statistics are constants): ``(dx, dweight, dbias)``."""
    acc = acc_dtype(x.dtype)
    invstd = inverse_std(var, eps)
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean.unsqueeze(0), invstd.unsqueeze(0), 0)
    dx = None
    if need_input_grad:
        scale = invstd.to(acc) if weight is None else invstd.to(acc) * weight.to(acc)
        dx = _match_layout((dy.to(acc) * scale.reshape(1, -1, *([1] * (x.dim() - 2)))).to(x.dtype), x)
    return dx, sum_dy_xhat[0], sum_dy[0]


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """The reference backend supports every op, device, dtype, layout and feature."""
    return True
