"""The serial drivers: the parallel kernels of one op and the per-channel arithmetic between them."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .base import _NJ, _as, _fold
from .planes import (
    _act_apply_planes,
    _act_bwd_elemt_planes,
    _act_bwd_planes,
    _act_bwd_reduce_planes,
    _act_train_fwd_planes,
    _merge_planes,
    _plane_stats,
)
from .rows import _act_apply_rows, _act_bwd_elemt_rows, _act_bwd_reduce_rows, _rows_moments

# ================================================================== drivers: one call per op
#
# Each op is one call from Python into a serial driver that runs the parallel kernels and the
# per-channel arithmetic between them. The per-channel steps were numpy calls in the wrapper; a
# batch-norm call usually follows work that has flushed the caches, where each of those calls
# cost 5-20 us (the channels_last training forward was 0.5 ms faster as one call).


@njit(**_NJ)
def _inverse_std(var, eps):
    """``1 / sqrt(var + eps)`` per channel, in float64 and rounded once to ``var``'s dtype: within
    an ulp of :func:`~batchnorm.kernels.reference.inverse_std` (which rounds ``var + eps`` first)."""
    inv = np.empty_like(var)
    for c in range(var.shape[0]):
        inv[c] = 1.0 / math.sqrt(np.float64(var[c]) + eps)
    return inv


@njit(**_NJ)
def _coefficients(x, mean, invstd, w, b):
    """Per channel ``(center, scale, shift)``: ``center`` = the mean rounded to ``x``'s dtype (the
    kernels subtract it in that dtype, exactly near the mean), ``scale = w * invstd``, and
    ``shift = b - (mean - center) * scale`` so that ``(x - center) * scale + shift`` is the
    normalization with the exact mean."""
    C = mean.shape[0]
    center, scale, shift = np.empty(C), np.empty(C), np.empty(C)
    for c in range(C):
        m = np.float64(mean[c])
        rounded = np.float64(_as(x, m))
        a = np.float64(invstd[c]) * np.float64(w[c])
        center[c] = rounded
        scale[c] = a
        # (not 0 * a: an infinite scale, eps = 0 and a zero variance, gives +-inf like torch, not NaN)
        shift[c] = np.float64(b[c]) - (m - rounded) * a if m != rounded else np.float64(b[c])
    return center, scale, shift


@njit(**_NJ)
def _apply_planes(x, r, has_r, mean, invstd, w, b, code, slope, y, stream):
    center, scale, shift = _coefficients(x, mean, invstd, w, b)
    _act_apply_planes(x, r, has_r, center, scale, shift, code, slope, y, stream)


@njit(**_NJ)
def _apply_rows(x, r, has_r, mean, invstd, w, b, code, slope, y, stream, rep):
    center, scale, shift = _coefficients(x, mean, invstd, w, b)
    _act_apply_rows(x, r, has_r, center, scale, shift, code, slope, y, stream, rep)


@njit(**_NJ)
def _finish(mean, var, cnt, out, rm, rv, momentum, update, skip):
    """The training forward's float64 ``mean``/``var`` over ``cnt`` values into ``out`` (``(3, 1,
    C)`` in the statistics' dtype: mean, variance, and the count at ``[2, 0, 0]``); with
    ``update``, the running statistics ``rm``/``rv`` move towards them (the variance unbiased),
    unless ``skip`` and a channel's mean or unbiased variance is not finite in the statistics'
    dtype. Returns whether they moved (or would have)."""
    ok = True
    for c in range(mean.shape[0]):
        out[0, 0, c] = mean[c]
        out[1, 0, c] = var[c]
        if skip:
            ok = ok and math.isfinite(out[0, 0, c]) and math.isfinite(_as(out, var[c] * (cnt / (cnt - 1.0))))
    for c in range(mean.shape[0]):
        if update and ok:
            rm[c] += momentum * (mean[c] - rm[c])
            rv[c] += momentum * (var[c] * (cnt / (cnt - 1.0)) - rv[c])
    out[2, 0, 0] = cnt
    return ok


@njit(**_NJ)
def _train_planes(x, r, has_r, w, b, eps, code, slope, y, out, rm, rv, momentum, update, skip, stream, fused):
    """Training forward on planes: the fused one-channel-per-thread kernel, or (``fused`` false)
    per-plane statistics merged exactly, then the normalization; statistics and running
    statistics as :func:`_finish`."""
    N, C, L = x.shape
    mean = np.empty(C)
    var = np.empty(C)
    if fused:
        _act_train_fwd_planes(x, r, has_r, w, b, eps, code, slope, y, mean, var, stream)
    else:
        pmean = np.empty((N, C))
        pm2 = np.empty((N, C))
        _plane_stats(x, pmean, pm2)
        _merge_planes(pmean, pm2, L, mean, var)
        _apply_planes(x, r, has_r, mean, _inverse_std(var, eps), w, b, code, slope, y, stream)
    return _finish(mean, var, N * L, out, rm, rv, momentum, update, skip)


@njit(**_NJ)
def _rows_stats(x, pilot, nb, rep):
    """Per-channel float64 mean and biased variance of the rows from sums shifted by ``pilot``,
    and whether a channel's pilot was more than 2 standard deviations from its mean. The kernels
    subtract the pilot in the input dtype, so the mean adds back that rounded value (adding the
    float64 pilot put the mean up to half an ulp of the pilot off)."""
    M, P = x.shape
    C = P // rep
    cnt = M * rep
    pilot = pilot.copy()
    for c in range(C):
        pilot[c] = _as(x, pilot[c])
    psum = np.zeros((nb, P))
    psq = np.zeros((nb, P))
    _rows_moments(x, pilot, nb, psum, psq, rep)
    psum, psq = _fold(psum, rep), _fold(psq, rep)
    mean = np.empty(C)
    var = np.empty(C)
    far = False
    for c in range(C):
        sd = 0.0
        sq = 0.0
        for j in range(nb):
            sd += psum[j, c]
            sq += psq[j, c]
        offset = sd / cnt
        mean[c] = pilot[c] + offset
        var[c] = max(sq / cnt - offset * offset, 0.0)
        far = far or offset * offset > 4.0 * var[c]
    return mean, var, far


@njit(**_NJ)
def _train_rows(x, r, has_r, w, b, eps, code, slope, y, out, rm, rv, momentum, update, skip, stream, nb, rep):
    """Training forward on rows: block partial sums shifted by the mean of 16 rows spread over
    the tensor (the pilot; neighbouring rows, e.g. one image's corner, can sit far from the
    mean), merged in float64 -- summed again around that mean when the pilot was more than 2
    standard deviations off, where the one-pass variance would lose digits -- then the
    normalization; statistics and running statistics as :func:`_finish`."""
    M, P = x.shape
    C = P // rep
    k = min(M, 16)
    pilot = np.zeros(C)
    for i in range(k):
        for j in range(P):
            pilot[j // rep] += x[i * M // k, j]
    pilot /= k * rep
    mean, var, far = _rows_stats(x, pilot, nb, rep)
    if far:
        mean, var, _ = _rows_stats(x, mean, nb, rep)
    _apply_rows(x, r, has_r, mean, _inverse_std(var, eps), w, b, code, slope, y, stream, rep)
    return _finish(mean, var, M * rep, out, rm, rv, momentum, update, skip)


@njit(**_NJ)
def _bwd_coefficients(psum, pdot, mean, invstd, center, scale, cnt, train, x_scale, dx_shift, sum_dy, sum_dot):
    """From the partial sums over ``center``: ``sum_dy = sum(g)``, ``sum_dot = sum(g * xhat)`` and
    the input-gradient coefficients ``dx = g * scale + (x - center) * x_scale + dx_shift``."""
    for c in range(center.shape[0]):
        s = 0.0
        t = 0.0
        for j in range(psum.shape[0]):
            s += psum[j, c]
            t += pdot[j, c]
        m = np.float64(mean[c])
        inv = np.float64(invstd[c])
        t -= (m - center[c]) * s  # sum(g * (x - mean)) with the exact mean
        sum_dy[c] = s
        sum_dot[c] = t * inv
        if train:
            x_scale[c] = -scale[c] * inv * inv * t / cnt
            dx_shift[c] = -scale[c] * s / cnt + x_scale[c] * (center[c] - m)
        else:
            x_scale[c] = 0.0
            dx_shift[c] = 0.0


@njit(**_NJ)
def _bwd_planes(dy, x, r, has_r, mean, invstd, w, b, code, slope, train, need_dx, need_dr, dx, dr,
                sum_dy, sum_dot, stream, fused):
    """Backward on planes: the fused one-channel-per-thread kernel, or (``fused`` false) per-plane
    reductions, their merge, then the elementwise gradients."""
    if fused:
        _act_bwd_planes(dy, x, r, has_r, mean, invstd, w, b, code, slope, train, need_dx, need_dr,
                        dx, dr, sum_dy, sum_dot, stream)
        return
    N, C, L = x.shape
    center, scale, shift = _coefficients(x, mean, invstd, w, b)
    psum = np.empty((N, C))
    pdot = np.empty((N, C))
    _act_bwd_reduce_planes(dy, x, r, has_r, center, scale, shift, code, slope, psum, pdot)
    x_scale, dx_shift = np.empty(C), np.empty(C)
    _bwd_coefficients(psum, pdot, mean, invstd, center, scale, N * L, train, x_scale, dx_shift, sum_dy, sum_dot)
    if need_dx or need_dr:
        _act_bwd_elemt_planes(dy, x, r, has_r, center, scale, shift, code, slope, scale, x_scale, dx_shift, need_dx,
                              need_dr, dx, dr, stream)


@njit(**_NJ)
def _bwd_rows(dy, x, r, has_r, mean, invstd, w, b, code, slope, train, need_dx, need_dr, dx, dr,
              sum_dy, sum_dot, stream, nb, rep):
    """Backward on rows: block reductions, their merge, then the elementwise gradients."""
    M, P = x.shape
    C = P // rep
    center, scale, shift = _coefficients(x, mean, invstd, w, b)
    psum = np.zeros((nb, P))
    pdot = np.zeros((nb, P))
    _act_bwd_reduce_rows(dy, x, r, has_r, center, scale, shift, code, slope, nb, psum, pdot, rep)
    x_scale, dx_shift = np.empty(C), np.empty(C)
    _bwd_coefficients(_fold(psum, rep), _fold(pdot, rep), mean, invstd, center, scale, M * rep, train, x_scale,
                      dx_shift, sum_dy, sum_dot)
    if need_dx or need_dr:
        _act_bwd_elemt_rows(dy, x, r, has_r, center, scale, shift, code, slope, scale, x_scale, dx_shift, need_dx,
                            need_dr, dx, dr, stream, rep)


