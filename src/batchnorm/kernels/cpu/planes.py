"""The planes kernels: contiguous ``(N, C, *S)`` seen as ``(N, C, L)``.

The training forward runs one channel per thread: one sweep reads the channel's slice from memory
for its sums shifted by a pilot mean (:func:`~.sums._pilot_moments`), and the normalize sweep,
last plane first, finds it in L2 -- one read and one write of the tensor instead of ATen's three
sweeps. The backward reads ``x``/``dy`` for the sums and sweeps them again *in reverse*, so its
first half is served by the cache the reduction just filled. When there are fewer channels than
threads can share evenly, a split path reduces per ``(n, c)`` plane in parallel and merges the
parts exactly (Chan et al.), so ``C = 1`` still uses every core. Sums are float64 additions of
input-dtype vector partials over blocks of :data:`~.base._VBLK` values, within a plane as across
planes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .base import _FM, _INL, _JIT, _NJ, _as, _eblocks, _flat, _ptr, _tiled
from .formulas import _dx_spans, _forward_operands, _g_spans, _gate_operands, _with_input_grad, _y_planes, _y_spans
from .primitives import keep
from .sums import _grad, _moments, _pilot_moments, _span_sums


@njit(**_JIT)
def _plane_stats(x, pmean, pm2):
    """Per ``(n, c)`` plane: mean and sum of squared deviations (two passes, plane is hot)."""
    N, C, L = x.shape
    xp = _ptr(x)
    for k in prange(N * C):
        n = k // C
        c = k % C
        center, sd, sq = _moments(x, xp, n, n + 1, c)
        offset = sd / L
        pmean[n, c] = center + offset
        pm2[n, c] = max(sq - L * offset * offset, 0.0)


@njit(**_NJ, fastmath=_FM)
def _merge_planes(pmean, pm2, L, mean_out, var_out):
    """Chan et al.: exact mean/biased variance of the union of equal-size planes."""
    N, C = pmean.shape
    for c in range(C):
        m = 0.0
        for n in range(N):
            m += pmean[n, c]
        m /= N
        m2 = 0.0
        for n in range(N):
            d = pmean[n, c] - m
            m2 += pm2[n, c] + L * d * d
        mean_out[c] = m
        var_out[c] = m2 / (N * L)


@njit(**_JIT)
def _act_train_fwd_planes(x, r, has_r, w, b, eps, code, slope, y, mean_out, var_out, stream):
    """Training forward (+ residual, + activation), one channel per iteration: shifted sums in
    one sweep, then normalize while the channel is hot, last plane first (the planes read last
    are the ones still in L2; streamed stores keep ``y`` from evicting them)."""
    N, C, L = x.shape
    cnt = N * L
    zero = _as(x, 0)
    slope_x = _as(x, slope)
    xp, rp, yf = _ptr(x), _ptr(r), _flat(y)
    for c in prange(C):
        center, sd, sq = _pilot_moments(x, xp, c)
        offset = sd / cnt  # the mean minus center
        v = max(sq / cnt - offset * offset, 0.0)
        if offset * offset > 64.0 * v:  # the pilot was far from the mean (in std units): two exact sweeps
            center, sd, sq = _moments(x, xp, 0, N, c)
            offset = sd / cnt
            v = max(sq / cnt - offset * offset, 0.0)
        mean_out[c] = center + offset
        var_out[c] = v
        scale = w[c] / math.sqrt(v + eps)
        # (x - center) * scale + (b - offset * scale): the subtraction stays in the input dtype,
        # exact near the mean
        ops = _forward_operands(xp, rp, has_r, center, _as(x, scale), _as(x, b[c] - offset * scale), code, slope_x,
                                zero)
        _y_spans(yf, ((N - 1) * C + c) * L, L, -C * L, N, 0, stream, ops)


@njit(**_JIT)
def _act_apply_planes(x, r, has_r, mean, scale, shift, code, slope, y, stream):
    """``y = act((x - mean) * scale + shift [+ r])``, parallel over planes."""
    N, C, L = x.shape
    K = N * C
    nb = _eblocks(K, L)
    mt, st, ht = _tiled(mean, x, 1), _tiled(scale, x, 1), _tiled(shift, x, 1)  # in x's dtype
    ops = _forward_operands(_ptr(x), _ptr(r), has_r, _ptr(mt), _ptr(st), _ptr(ht), code, _as(x, slope), _as(x, 0))
    yf = _flat(y)
    for bi in prange(nb):
        _y_planes(yf, bi * K // nb, (bi + 1) * K // nb, C, L, stream, ops)
    keep((mt, st, ht))  # ops points into them (see .pointers)


@njit(**_JIT)
def _act_bwd_planes(dy, x, r, has_r, mean, invstd, w, b, code, slope, train, need_dx, need_dr,
                    dx, dr, sum_dy, sum_dot, stream):
    """Backward through act and BN, one channel per iteration: reduce, then the input gradient
    sweeping backwards (its first planes are still in cache from the reduction).

    ``g = dy * act'(z)``; ``sum_dy = sum(g)``, ``sum_dot = sum(g * xhat)``; ``dr = g``;
    ``dx`` by the training formula (``train``) or ``g * w * invstd`` (given statistics: written
    plane by plane during the reduction, while the plane is in cache).
    """
    N, C, L = x.shape
    cnt = N * L
    zero = _as(x, 0)
    slope_x = _as(x, slope)
    dyp, xp, rp, dxf, drf = _ptr(dy), _ptr(x), _ptr(r), _flat(dx), _flat(dr)
    for c in prange(C):
        m = np.float64(mean[c])
        center = _as(x, m)
        offset = m - center
        inv = np.float64(invstd[c])
        scale = w[c] * inv
        scale_x = _as(x, scale)
        buf = np.empty(L if code != 0 else 0, dtype=x.dtype)
        bp = _ptr(buf)
        ops = _gate_operands(dyp, xp, rp, has_r, center, scale_x, _as(x, b[c] - offset * scale), code, slope_x, zero)
        dx_now = need_dx and not train  # outputs written during the reduction
        dr_now = need_dr and not (need_dx and train)
        if code == 0 and not dx_now and not dr_now:  # plain BN: the whole channel in one strided sweep
            s, t = _span_sums(dyp, 0, xp, c * L, L, C * L, N, center, True, zero)
        else:
            s = 0.0
            t = 0.0
            for n in range(N):
                f0 = (n * C + c) * L
                g, goff = _grad(ops, buf, bp, f0, f0 + L)
                ps, pt = _span_sums(g, goff, xp, f0, L, 0, 1, center, True, zero)
                s += ps
                t += pt
                if dx_now:
                    _dx_spans(dxf, f0, L, 0, 1, 0, stream, _with_input_grad(ops, scale_x, zero, zero))
                if dr_now:
                    _g_spans(drf, f0, L, 0, 1, 0, stream, ops)
        keep(buf)  # bp points into it
        # sum(g * (x - mean)) with the exact float64 mean
        t -= offset * s
        sum_dy[c] = s
        sum_dot[c] = t * inv
        if need_dx and train:
            x_scale = -scale * inv * inv * t / cnt
            dx_ops = _with_input_grad(ops, scale_x, _as(x, x_scale), _as(x, -scale * s / cnt - x_scale * offset))
            if not need_dr:
                _dx_spans(dxf, ((N - 1) * C + c) * L, L, -C * L, N, 0, stream, dx_ops)
            else:  # both outputs plane by plane, while the plane is hot
                for nn in range(N):
                    f0 = ((N - 1 - nn) * C + c) * L
                    _dx_spans(dxf, f0, L, 0, 1, 0, stream, dx_ops)
                    _g_spans(drf, f0, L, 0, 1, 0, stream, ops)


@njit(**_INL)
def _plane_gate(dyp, xp, rp, has_r, c, mean, scale, shift, code, slope, x):
    """Split paths: the gradient's :class:`~.formulas.Operands` of channel ``c`` (pointers,
    per-channel values rounded to the dtype of the input ``x``)."""
    return _gate_operands(dyp, xp, rp, has_r, _as(x, mean[c]), _as(x, scale[c]), _as(x, shift[c]), code,
                          _as(x, slope), _as(x, 0))


@njit(**_JIT)
def _act_bwd_reduce_planes(dy, x, r, has_r, mean, scale, shift, code, slope, psum, pdot):
    """Split path: per plane ``sum(g)`` and ``sum(g * (x - mean_rounded))``."""
    N, C, L = x.shape
    dyp, xp, rp = _ptr(dy), _ptr(x), _ptr(r)
    for k in prange(N * C):
        n = k // C
        c = k % C
        ops = _plane_gate(dyp, xp, rp, has_r, c, mean, scale, shift, code, slope, x)
        buf = np.empty(L if code != 0 else 0, dtype=x.dtype)
        g, goff = _grad(ops, buf, _ptr(buf), k * L, k * L + L)
        s, t = _span_sums(g, goff, xp, k * L, L, 0, 1, ops.center, True, ops.zero)
        keep(buf)  # g may point into it
        psum[n, c] = s
        pdot[n, c] = t


@njit(**_JIT)
def _act_bwd_elemt_planes(dy, x, r, has_r, mean, scale, shift, code, slope, g_scale, x_scale, dx_shift,
                          need_dx, need_dr, dx, dr, stream):
    """Split path: ``dx = g * g_scale + (x - mean) * x_scale + dx_shift`` and ``dr = g``."""
    N, C, L = x.shape
    dyp, xp, rp, dxf, drf = _ptr(dy), _ptr(x), _ptr(r), _flat(dx), _flat(dr)
    for k in prange(N * C):
        c = k % C
        ops = _plane_gate(dyp, xp, rp, has_r, c, mean, scale, shift, code, slope, x)
        if need_dx:
            dx_ops = _with_input_grad(ops, _as(x, g_scale[c]), _as(x, x_scale[c]), _as(x, dx_shift[c]))
            _dx_spans(dxf, k * L, L, 0, 1, 0, stream, dx_ops)
        if need_dr:
            _g_spans(drf, k * L, L, 0, 1, 0, stream, ops)
