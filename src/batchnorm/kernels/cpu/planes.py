"""The planes kernels: contiguous ``(N, C, *S)`` seen as ``(N, C, L)``."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .base import _FM, _INL, _JIT, _NJ, _as, _eblocks, _flat, _ptr, _tiled
from .formulas import _dx_spans, _g_spans, _y_planes, _y_spans
from .simd import keep
from .sums import _grad, _moments, _pilot_moments, _span_sums


@njit(**_JIT)
def _plane_stats(x, pmean, pm2):
    """Per ``(n, c)`` plane: mean and sum of squared deviations (two passes, plane is hot)."""
    N, C, L = x.shape
    xp = _ptr(x)
    for k in prange(N * C):
        n = k // C
        c = k % C
        mf, sd, sq = _moments(x, xp, n, n + 1, c)
        md = sd / L
        pmean[n, c] = mf + md
        pm2[n, c] = max(sq - L * md * md, 0.0)


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
    slf = _as(x, slope)
    xp, rp, yf = _ptr(x), _ptr(r), _flat(y)
    for c in prange(C):
        mf, sd, sq = _pilot_moments(x, xp, c)
        md = sd / cnt
        v = max(sq / cnt - md * md, 0.0)
        if md * md > 64.0 * v:  # the pilot was far from the mean (in std units): two exact sweeps
            mf, sd, sq = _moments(x, xp, 0, N, c)
            md = sd / cnt
            v = max(sq / cnt - md * md, 0.0)
        mean_out[c] = mf + md
        var_out[c] = v
        a = w[c] / math.sqrt(v + eps)
        # (x - mf) * a + (b - md * a): the subtraction stays in the input dtype, exact near the mean
        p = (xp, rp, has_r, mf, _as(x, a), _as(x, b[c] - md * a), code, slf, zero)
        _y_spans(yf, ((N - 1) * C + c) * L, L, -C * L, N, 0, stream, p)


@njit(**_JIT)
def _act_apply_planes(x, r, has_r, mean, scale, shift, code, slope, y, stream):
    """``y = act((x - mean) * scale + shift [+ r])``, parallel over planes."""
    N, C, L = x.shape
    K = N * C
    nb = _eblocks(K, L)
    mt, st, ht = _tiled(mean, x, 1), _tiled(scale, x, 1), _tiled(shift, x, 1)  # in x's dtype
    p = (_ptr(x), _ptr(r), has_r, _ptr(mt), _ptr(st), _ptr(ht), code, _as(x, slope), _as(x, 0))
    yf = _flat(y)
    for bi in prange(nb):
        _y_planes(yf, bi * K // nb, (bi + 1) * K // nb, C, L, stream, p)
    keep((mt, st, ht))  # p points into them (see _simd.pointers)


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
    slf = _as(x, slope)
    dyp, xp, rp, dxf, drf = _ptr(dy), _ptr(x), _ptr(r), _flat(dx), _flat(dr)
    for c in prange(C):
        m = np.float64(mean[c])
        mf = _as(x, m)
        md = m - mf
        inv = np.float64(invstd[c])
        a = w[c] * inv
        af = _as(x, a)
        buf = np.empty(L if code != 0 else 0, dtype=x.dtype)
        bp = _ptr(buf)
        gp = (dyp, xp, rp, has_r, mf, af, _as(x, b[c] - md * a), code, slf, zero)
        dx_now = need_dx and not train  # outputs written during the reduction
        dr_now = need_dr and not (need_dx and train)
        if code == 0 and not dx_now and not dr_now:  # plain BN: the whole channel in one strided sweep
            s, t = _span_sums(dyp, 0, xp, c * L, L, C * L, N, mf, True, zero)
        else:
            s = 0.0
            t = 0.0
            for n in range(N):
                f0 = (n * C + c) * L
                g, goff = _grad(gp, buf, bp, f0, f0 + L)
                ps, pt = _span_sums(g, goff, xp, f0, L, 0, 1, mf, True, zero)
                s += ps
                t += pt
                if dx_now:
                    _dx_spans(dxf, f0, L, 0, 1, 0, stream, gp + (af, zero, zero))
                if dr_now:
                    _g_spans(drf, f0, L, 0, 1, 0, stream, gp)
        keep(buf)  # bp points into it
        # sum(g * (x - mean)) with the exact float64 mean
        t -= md * s
        sum_dy[c] = s
        sum_dot[c] = t * inv
        if need_dx and train:
            kb = -a * inv * inv * t / cnt
            p = gp + (af, _as(x, kb), _as(x, -a * s / cnt - kb * md))
            if not need_dr:
                _dx_spans(dxf, ((N - 1) * C + c) * L, L, -C * L, N, 0, stream, p)
            else:  # both outputs plane by plane, while the plane is hot
                for nn in range(N):
                    f0 = ((N - 1 - nn) * C + c) * L
                    _dx_spans(dxf, f0, L, 0, 1, 0, stream, p)
                    _g_spans(drf, f0, L, 0, 1, 0, stream, gp)


@njit(**_INL)
def _plane_gate(dyp, xp, rp, has_r, c, mean, scale, shift, code, slope, x):
    """Split paths: the :func:`_fg` parameters of channel ``c`` (pointers, per-channel values
    rounded to the dtype of the input ``x``)."""
    return (dyp, xp, rp, has_r, _as(x, mean[c]), _as(x, scale[c]), _as(x, shift[c]), code, _as(x, slope), _as(x, 0))


@njit(**_JIT)
def _act_bwd_reduce_planes(dy, x, r, has_r, mean, scale, shift, code, slope, psum, pdot):
    """Split path: per plane ``sum(g)`` and ``sum(g * (x - mean_rounded))``."""
    N, C, L = x.shape
    dyp, xp, rp = _ptr(dy), _ptr(x), _ptr(r)
    for k in prange(N * C):
        n = k // C
        c = k % C
        gp = _plane_gate(dyp, xp, rp, has_r, c, mean, scale, shift, code, slope, x)
        buf = np.empty(L if code != 0 else 0, dtype=x.dtype)
        g, goff = _grad(gp, buf, _ptr(buf), k * L, k * L + L)
        s, t = _span_sums(g, goff, xp, k * L, L, 0, 1, gp[4], True, gp[9])
        keep(buf)  # g may point into it
        psum[n, c] = s
        pdot[n, c] = t


@njit(**_JIT)
def _act_bwd_elemt_planes(dy, x, r, has_r, mean, scale, shift, code, slope, ka, kb, kc,
                          need_dx, need_dr, dx, dr, stream):
    """Split path: ``dx = g * ka + (x - mean) * kb + kc`` and ``dr = g``."""
    N, C, L = x.shape
    dyp, xp, rp, dxf, drf = _ptr(dy), _ptr(x), _ptr(r), _flat(dx), _flat(dr)
    for k in prange(N * C):
        c = k % C
        gp = _plane_gate(dyp, xp, rp, has_r, c, mean, scale, shift, code, slope, x)
        if need_dx:
            _dx_spans(dxf, k * L, L, 0, 1, 0, stream, gp + (_as(x, ka[c]), _as(x, kb[c]), _as(x, kc[c])))
        if need_dr:
            _g_spans(drf, k * L, L, 0, 1, 0, stream, gp)

