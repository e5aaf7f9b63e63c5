"""CPU backend: fused batch-norm kernels compiled by numba (``parallel=True``, disk cache).

Two memory layouts are handled without copies:

* **planes**: contiguous ``(N, C, *S)`` seen as ``(N, C, L)``. The training forward runs one
  channel per thread: the channel's slice is read once from memory for the sum, and the
  second (variance) and third (normalize) sweeps hit it in L2 -- one read and one write of the
  tensor instead of ATen's three sweeps. The backward reads ``x``/``dy`` for the sums and
  sweeps them again *in reverse*, so its first half is served by the cache the reduction just
  filled. When there are fewer channels than threads can share evenly, a split path reduces
  per ``(n, c)`` plane in parallel and merges the parts exactly (Chan et al.), so ``C = 1``
  still uses every core.
* **rows**: channels_last ``(N, *S, C)`` and 2D ``(N, C)`` seen as ``(M, C)``; threads take
  blocks of rows and keep per-block partial sums (shifted by a per-channel pilot mean, so the
  one-pass variance has no cancellation), merged in float64.

Statistics are float64 sums of float32 block partials (float64 throughout for float64 input).
Masks, ghost batches, half precision and tiny tensors go to the reference backend
(:func:`supports`). Numba uses ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from . import register_backend

name = "cpu"

# Reassociation lets LLVM vectorize the reductions; no "nnan"/"ninf": NaN/inf must propagate
# (the layers detect non-finite batches from the statistics).
_FM = {"reassoc", "contract", "arcp", "nsz"}
_JIT = {"parallel": True, "cache": True, "fastmath": _FM, "nogil": True}
_BLK = 2048  # elements summed in the input dtype before a float64 flush (planes)
_RBLK = 64  # rows summed in the input dtype before a float64 flush (rows)

# Below this many elements the reference path (a few ATen calls) is as fast: measured on a
# 2-core EPYC, numba's parallel launch costs ~20-40 us.
MIN_NUMEL = 1 << 14
# Below this many elements one thread does the work: waking a second thread costs more than it
# saves, and much more when the machine is busy (the join waits for a time slice).
PARALLEL_MIN = 1 << 16


# ============================================================================ planes (N, C, L)


@njit(cache=True, inline="always")
def _zero(x):
    """A zero of ``x``'s dtype (accumulators start from it so LLVM vectorizes the loops)."""
    z = np.zeros(1, dtype=x.dtype)
    return z[0]



@njit(**_JIT)
def _train_fwd_planes(x, w, b, eps, y, mean_out, var_out):
    """One channel per iteration: sum, shifted sum of squares, normalize, all while it is hot."""
    N, C, L = x.shape
    zr = _zero(x)
    cnt = N * L
    for c in prange(C):
        s = 0.0
        for n in range(N):
            row = x[n, c]
            for l0 in range(0, L, _BLK):
                l1 = min(l0 + _BLK, L)
                p = zr
                for i in range(l0, l1):
                    p += row[i]
                s += p
        m = s / cnt
        sc = np.empty(3, dtype=x.dtype)  # casts to the input dtype
        sc[0] = m
        mf = sc[0]
        sd = 0.0
        sq = 0.0
        for n in range(N):
            row = x[n, c]
            for l0 in range(0, L, _BLK):
                l1 = min(l0 + _BLK, L)
                pd = zr
                pq = zr
                for i in range(l0, l1):
                    d = row[i] - mf
                    pd += d
                    pq += d * d
                sd += pd
                sq += pq
        md = sd / cnt
        v = max(sq / cnt - md * md, 0.0)
        m_exact = mf + md
        mean_out[c] = m_exact
        var_out[c] = v
        inv = 1.0 / math.sqrt(v + eps)
        a = w[c] * inv
        # (x - mf) * a + (b - md * a): the subtraction stays in the input dtype, exact near the mean
        sc[1] = a
        sc[2] = b[c] - md * a
        af = sc[1]
        bf = sc[2]
        for n in range(N):
            row = x[n, c]
            out = y[n, c]
            for i in range(L):
                out[i] = (row[i] - mf) * af + bf


@njit(**_JIT)
def _plane_stats(x, pmean, pm2):
    """Per ``(n, c)`` plane: mean and sum of squared deviations (two passes, plane is hot)."""
    N, C, L = x.shape
    zr = _zero(x)
    for k in prange(N * C):
        n = k // C
        c = k % C
        row = x[n, c]
        s = 0.0
        for l0 in range(0, L, _BLK):
            l1 = min(l0 + _BLK, L)
            p = zr
            for i in range(l0, l1):
                p += row[i]
            s += p
        sc = np.empty(1, dtype=x.dtype)
        sc[0] = s / L
        mf = sc[0]
        sd = 0.0
        sq = 0.0
        for l0 in range(0, L, _BLK):
            l1 = min(l0 + _BLK, L)
            pd = zr
            pq = zr
            for i in range(l0, l1):
                d = row[i] - mf
                pd += d
                pq += d * d
            sd += pd
            sq += pq
        md = sd / L
        pmean[n, c] = mf + md
        pm2[n, c] = max(sq - L * md * md, 0.0)


@njit(cache=True, fastmath=_FM)
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
def _apply_planes(x, mean, scale, shift, y):
    """``y = (x - mean) * scale + shift`` per channel, parallel over planes."""
    N, C, L = x.shape
    mfs = mean.astype(x.dtype)
    As = scale.astype(x.dtype)
    Bs = shift.astype(x.dtype)
    for k in prange(N * C):
        n = k // C
        c = k % C
        row = x[n, c]
        out = y[n, c]
        mf = mfs[c]
        a = As[c]
        b = Bs[c]
        for i in range(L):
            out[i] = (row[i] - mf) * a + b


@njit(**_JIT)
def _bwd_reduce_planes_split(dy, x, mean, psum, pdot):
    """Per plane ``sum(dy)`` and ``sum(dy * (x - mean))``."""
    N, C, L = x.shape
    zr = _zero(x)
    for k in prange(N * C):
        n = k // C
        c = k % C
        row = x[n, c]
        g = dy[n, c]
        sc = np.empty(1, dtype=x.dtype)
        sc[0] = mean[c]
        mf = sc[0]
        s = 0.0
        t = 0.0
        for l0 in range(0, L, _BLK):
            l1 = min(l0 + _BLK, L)
            ps = zr
            pt = zr
            for i in range(l0, l1):
                ps += g[i]
                pt += g[i] * (row[i] - mf)
            s += ps
            t += pt
        psum[n, c] = s
        pdot[n, c] = t


@njit(**_JIT)
def _bwd_elemt_planes(dy, x, mf_, ka, kb, kc, dx):
    """``dx = dy * ka + (x - mean) * kb + kc`` per channel, parallel over planes."""
    N, C, L = x.shape
    for k in prange(N * C):
        n = k // C
        c = k % C
        row = x[n, c]
        g = dy[n, c]
        out = dx[n, c]
        sc = np.empty(4, dtype=x.dtype)
        sc[0] = mf_[c]
        sc[1] = ka[c]
        sc[2] = kb[c]
        sc[3] = kc[c]
        mf = sc[0]
        a = sc[1]
        bb = sc[2]
        cc = sc[3]
        for i in range(L):
            out[i] = g[i] * a + (row[i] - mf) * bb + cc


@njit(**_JIT)
def _train_bwd_planes(dy, x, mean, invstd, w, need_dx, dx, sum_dy, sum_dot):
    """One channel per iteration: reduce, then the input gradient sweeping backwards (L2 reuse)."""
    N, C, L = x.shape
    zr = _zero(x)
    cnt = N * L
    for c in prange(C):
        sc = np.empty(4, dtype=x.dtype)
        sc[0] = mean[c]
        mf = sc[0]
        s = 0.0
        t = 0.0
        for n in range(N):
            row = x[n, c]
            g = dy[n, c]
            for l0 in range(0, L, _BLK):
                l1 = min(l0 + _BLK, L)
                ps = zr
                pt = zr
                for i in range(l0, l1):
                    ps += g[i]
                    pt += g[i] * (row[i] - mf)
                s += ps
                t += pt
        # sum(dy * (x - mean)) with the exact float64 mean
        t -= (mean[c] - mf) * s
        inv = invstd[c]
        sum_dy[c] = s
        sum_dot[c] = t * inv
        if need_dx:
            scale = w[c] * inv
            ka = scale
            kb = -scale * inv * inv * t / cnt
            kc = -scale * s / cnt + kb * (mf - mean[c])
            sc[1] = ka
            sc[2] = kb
            sc[3] = kc
            a = sc[1]
            bb = sc[2]
            cc = sc[3]
            for nn in range(N):
                n = N - 1 - nn
                row = x[n, c]
                g = dy[n, c]
                out = dx[n, c]
                for i in range(L):
                    out[i] = g[i] * a + (row[i] - mf) * bb + cc


@njit(**_JIT)
def _apply_bwd_planes(dy, x, mean, invstd, w, need_dx, dx, sum_dy, sum_dot):
    """Backward with constant statistics: ``dx = dy * w * invstd`` and the two sums, one sweep."""
    N, C, L = x.shape
    zr = _zero(x)
    for c in prange(C):
        sc = np.empty(2, dtype=x.dtype)
        sc[0] = mean[c]
        sc[1] = w[c] * invstd[c]
        mf = sc[0]
        a = sc[1]
        s = 0.0
        t = 0.0
        for n in range(N):
            row = x[n, c]
            g = dy[n, c]
            out = dx[n, c]
            for l0 in range(0, L, _BLK):
                l1 = min(l0 + _BLK, L)
                ps = zr
                pt = zr
                for i in range(l0, l1):
                    ps += g[i]
                    pt += g[i] * (row[i] - mf)
                s += ps
                t += pt
                if need_dx:
                    for i in range(l0, l1):
                        out[i] = g[i] * a
        t -= (mean[c] - mf) * s
        sum_dy[c] = s
        sum_dot[c] = t * invstd[c]


# ================================================================================ rows (M, C)


def _row_blocks(m: int) -> int:
    return max(1, min(m // 32, 8 * numba.get_num_threads()))


@njit(**_JIT)
def _rows_moments(x, pilot, nb, psum, psq):
    """Per block of rows: float64 sums of ``x - pilot`` and ``(x - pilot)**2``.

    Four rows per sweep of the channel accumulators (a quarter of their loads and stores)."""
    M, C = x.shape
    for bi in prange(nb):
        r0 = bi * M // nb
        r1 = (bi + 1) * M // nb
        accs = np.zeros(C, dtype=x.dtype)
        accq = np.zeros(C, dtype=x.dtype)
        k = pilot.astype(x.dtype)
        r = r0
        since = 0
        while r < r1:
            if r + 4 <= r1:
                x0 = x[r]
                x1 = x[r + 1]
                x2 = x[r + 2]
                x3 = x[r + 3]
                for c in range(C):
                    kc = k[c]
                    d0 = x0[c] - kc
                    d1 = x1[c] - kc
                    d2 = x2[c] - kc
                    d3 = x3[c] - kc
                    accs[c] += (d0 + d1) + (d2 + d3)
                    accq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                r += 4
                since += 4
            else:
                xr = x[r]
                for c in range(C):
                    d = xr[c] - k[c]
                    accs[c] += d
                    accq[c] += d * d
                r += 1
                since += 1
            if since >= _RBLK or r == r1:
                for c in range(C):
                    psum[bi, c] += accs[c]
                    psq[bi, c] += accq[c]
                    accs[c] = 0
                    accq[c] = 0
                since = 0


@njit(**_JIT)
def _rows_apply(x, mean, scale, shift, y):
    """``y = (x - mean) * scale + shift`` on ``(M, C)`` rows."""
    M, C = x.shape
    nb = max(1, min(M // 32, 64))
    mf = mean.astype(x.dtype)
    a = scale.astype(x.dtype)
    b = shift.astype(x.dtype)
    for bi in prange(nb):
        r0 = bi * M // nb
        r1 = (bi + 1) * M // nb
        for r in range(r0, r1):
            xr = x[r]
            yr = y[r]
            for c in range(C):
                yr[c] = (xr[c] - mf[c]) * a[c] + b[c]


@njit(**_JIT)
def _rows_bwd_reduce(dy, x, mean, nb, psum, pdot):
    """Per block of rows: float64 sums of ``dy`` and ``dy * (x - mean)`` (four rows per sweep)."""
    M, C = x.shape
    for bi in prange(nb):
        r0 = bi * M // nb
        r1 = (bi + 1) * M // nb
        accs = np.zeros(C, dtype=x.dtype)
        acct = np.zeros(C, dtype=x.dtype)
        mf = mean.astype(x.dtype)
        r = r0
        since = 0
        while r < r1:
            if r + 4 <= r1:
                x0 = x[r]
                x1 = x[r + 1]
                x2 = x[r + 2]
                x3 = x[r + 3]
                g0 = dy[r]
                g1 = dy[r + 1]
                g2 = dy[r + 2]
                g3 = dy[r + 3]
                for c in range(C):
                    m = mf[c]
                    accs[c] += (g0[c] + g1[c]) + (g2[c] + g3[c])
                    acct[c] += (g0[c] * (x0[c] - m) + g1[c] * (x1[c] - m)) + (
                        g2[c] * (x2[c] - m) + g3[c] * (x3[c] - m))
                r += 4
                since += 4
            else:
                xr = x[r]
                gr = dy[r]
                for c in range(C):
                    g = gr[c]
                    accs[c] += g
                    acct[c] += g * (xr[c] - mf[c])
                r += 1
                since += 1
            if since >= _RBLK or r == r1:
                for c in range(C):
                    psum[bi, c] += accs[c]
                    pdot[bi, c] += acct[c]
                    accs[c] = 0
                    acct[c] = 0
                since = 0


@njit(**_JIT)
def _rows_bwd_elemt(dy, x, mean, ka, kb, kc, dx):
    """``dx = dy * ka + (x - mean) * kb + kc`` on ``(M, C)`` rows."""
    M, C = x.shape
    nb = max(1, min(M // 32, 64))
    mf = mean.astype(x.dtype)
    a = ka.astype(x.dtype)
    b = kb.astype(x.dtype)
    cc = kc.astype(x.dtype)
    for bi in prange(nb):
        r0 = bi * M // nb
        r1 = (bi + 1) * M // nb
        for r in range(r0, r1):
            xr = x[r]
            gr = dy[r]
            out = dx[r]
            for c in range(C):
                out[c] = gr[c] * a[c] + (xr[c] - mf[c]) * b[c] + cc[c]


# ============================================================================ python wrappers


def _launch_pool() -> None:
    """Start numba's thread pool now, without letting it change torch's thread count.

    Numba's OpenMP layer can share the OpenMP runtime with torch; starting its pool sets that
    runtime's thread count, which torch then reports (and uses) as its own.
    """
    before = torch.get_num_threads()
    try:
        from numba.np.ufunc import parallel as _parallel

        _parallel._launch_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


_launch_pool()


def _threads(numel: int = 1 << 30) -> int:
    """Set numba's thread count for this call: torch's, or 1 below :data:`PARALLEL_MIN` elements."""
    t = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numel < PARALLEL_MIN:
        t = 1
    if numba.get_num_threads() != t:
        numba.set_num_threads(t)
    return t


def _channels_last_fmt(x: Tensor) -> torch.memory_format | None:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _layout(x: Tensor) -> str:
    """``"rows"`` for (N, C), (N, C, 1, ...) and channels_last; ``"planes"`` for contiguous (N, C, *S)."""
    if x.dim() == 2 or (x.is_contiguous() and x.numel() == x.shape[0] * x.shape[1]):
        return "rows"
    if x.is_contiguous():
        return "planes"
    if _channels_last_fmt(x) is not None:
        return "rows"
    return "planes"  # made contiguous by _prepare


def _prepare(x: Tensor, layout: str) -> Tensor:
    if layout == "planes":
        return x.contiguous()
    if x.dim() == 2 or x.is_contiguous():
        return x.contiguous()
    return x  # channels_last, already dense


def _like(x: Tensor, layout: str) -> Tensor:
    """An output tensor with the layout the kernels write (contiguous or channels_last)."""
    if layout == "rows" and x.dim() > 2:
        fmt = _channels_last_fmt(x) or torch.contiguous_format
        return torch.empty(x.shape, dtype=x.dtype, memory_format=fmt)
    return torch.empty(x.shape, dtype=x.dtype)


def _view(t: Tensor, layout: str) -> np.ndarray:
    """The numpy view a kernel works on: ``(N, C, L)`` planes or ``(M, C)`` rows."""
    t = t.detach()
    if layout == "planes":
        return t.reshape(t.shape[0], t.shape[1], -1).numpy()
    if t.dim() == 2:
        return t.numpy()
    return t.movedim(1, -1).reshape(-1, t.shape[1]).numpy()


def _vec(t: Tensor | None, c: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    if t is None:
        return np.full(c, fill, dtype=np.float64 if dtype == torch.float64 else np.float64)
    return t.detach().to(torch.float64).contiguous().numpy()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused_channels(c: int, threads: int) -> bool:
    """Whether one-channel-per-thread keeps every thread busy (else split across the batch)."""
    return threads == 1 or c % threads == 0 or c >= 8 * threads


def _stats_rows(xv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m, c = xv.shape
    k = min(m, 16)
    pilot = xv[:k].astype(np.float64).mean(0)
    nb = _row_blocks(m)
    psum = np.zeros((nb, c))
    psq = np.zeros((nb, c))
    _rows_moments(xv, pilot, nb, psum, psq)
    md = psum.sum(0) / m
    var = np.maximum(psq.sum(0) / m - md * md, 0.0)
    return pilot + md, var


def forward_train(x, weight, bias, mask, eps, vbs):
    """Training forward on the whole batch (one group): ``(y, mean, var, count)``."""
    threads = _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, layout)
    n, c = x.shape[0], x.shape[1]
    count = x.numel() // c
    y = _like(x, layout)
    xv, yv = _view(x, layout), _view(y, layout)
    w = _vec(weight, c, 1.0, x.dtype)
    b = _vec(bias, c, 0.0, x.dtype)
    if layout == "planes" and _fused_channels(c, threads):
        mean = np.empty(c)
        var = np.empty(c)
        _train_fwd_planes(xv, w, b, float(eps), yv, mean, var)
    else:
        if layout == "planes":
            pmean = np.empty((n, c))
            pm2 = np.empty((n, c))
            _plane_stats(xv, pmean, pm2)
            mean = np.empty(c)
            var = np.empty(c)
            _merge_planes(pmean, pm2, xv.shape[2], mean, var)
        else:
            mean, var = _stats_rows(xv)
        scale = w / np.sqrt(var + eps)
        if layout == "planes":
            _apply_planes(xv, mean, scale, b, yv)
        else:
            _rows_apply(xv, mean, scale, b, yv)
    acc = _acc(x.dtype)
    mean_t = torch.from_numpy(mean).to(acc).unsqueeze(0)
    var_t = torch.from_numpy(var).to(acc).unsqueeze(0)
    return y, mean_t, var_t, torch.full((1,), float(count), dtype=acc)


def forward_apply(x, mean, invstd, weight, bias):
    """``y = (x - mean) * invstd * weight + bias`` with given ``(C,)`` statistics."""
    _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, layout)
    c = x.shape[1]
    y = _like(x, layout)
    xv, yv = _view(x, layout), _view(y, layout)
    m = mean.detach().to(torch.float64).contiguous().numpy()
    scale = invstd.detach().to(torch.float64).numpy() * _vec(weight, c, 1.0, x.dtype)
    b = _vec(bias, c, 0.0, x.dtype)
    if layout == "planes":
        _apply_planes(xv, m, scale, b, yv)
    else:
        _rows_apply(xv, m, scale, b, yv)
    return y


def _grad_layout(dy: Tensor, x: Tensor, layout: str) -> Tensor:
    if layout == "planes":
        return dy.contiguous()
    if x.dim() == 2 or x.is_contiguous():
        return dy.contiguous()
    return dy.contiguous(memory_format=_channels_last_fmt(x) or torch.contiguous_format)


def _reduce_and_coefs(dyv, xv, layout, m, inv, w, threads):
    """Float64 ``sum(dy)``, ``sum(dy * (x - mean))`` (split paths)."""
    if layout == "planes":
        n, c = xv.shape[0], xv.shape[1]
        psum = np.empty((n, c))
        pdot = np.empty((n, c))
        _bwd_reduce_planes_split(dyv, xv, m, psum, pdot)
    else:
        nb = _row_blocks(xv.shape[0])
        psum = np.zeros((nb, xv.shape[1]))
        pdot = np.zeros((nb, xv.shape[1]))
        _rows_bwd_reduce(dyv, xv, m, nb, psum, pdot)
    s, t = psum.sum(0), pdot.sum(0)
    # the kernels subtract the mean rounded to the input dtype; correct to the exact mean
    return s, t - (m - m.astype(xv.dtype).astype(np.float64)) * s


def backward_train(dy, x, mean, invstd, weight, mask, count, vbs, need_input_grad=True):
    """Closed-form training backward: ``(dx, dweight, dbias)`` (see the reference backend)."""
    threads = _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, layout)
    dy = _grad_layout(dy, x, layout)
    c = x.shape[1]
    cnt = x.numel() // c
    xv, dyv = _view(x, layout), _view(dy, layout)
    m = mean.detach().reshape(-1).to(torch.float64).contiguous().numpy()
    inv = invstd.detach().reshape(-1).to(torch.float64).contiguous().numpy()
    w = _vec(weight, c, 1.0, x.dtype)
    dx = _like(x, layout) if need_input_grad else None
    acc = _acc(x.dtype)
    if layout == "planes" and _fused_channels(c, threads):
        sum_dy = np.empty(c)
        sum_dot = np.empty(c)
        dxv = _view(dx, layout) if dx is not None else xv[:1, :1, :1].copy()
        _train_bwd_planes(dyv, xv, m, inv, w, need_input_grad, dxv, sum_dy, sum_dot)
        return dx, torch.from_numpy(sum_dot).to(acc), torch.from_numpy(sum_dy).to(acc)
    s, t = _reduce_and_coefs(dyv, xv, layout, m, inv, w, threads)
    sum_dot = t * inv
    if dx is not None:
        scale = w * inv
        ka = scale
        kb = -scale * inv * inv * t / cnt
        kc = -scale * s / cnt + kb * (m.astype(xv.dtype).astype(np.float64) - m)
        dxv = _view(dx, layout)
        if layout == "planes":
            _bwd_elemt_planes(dyv, xv, m, ka, kb, kc, dxv)
        else:
            _rows_bwd_elemt(dyv, xv, m, ka, kb, kc, dxv)
    return dx, torch.from_numpy(sum_dot).to(acc), torch.from_numpy(s).to(acc)


def backward_apply(dy, x, mean, invstd, weight, need_input_grad=True):
    """Backward with constant ``(C,)`` statistics: ``(dx, dweight, dbias)``."""
    threads = _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, layout)
    dy = _grad_layout(dy, x, layout)
    c = x.shape[1]
    xv, dyv = _view(x, layout), _view(dy, layout)
    m = mean.detach().reshape(-1).to(torch.float64).contiguous().numpy()
    inv = invstd.detach().reshape(-1).to(torch.float64).contiguous().numpy()
    w = _vec(weight, c, 1.0, x.dtype)
    dx = _like(x, layout) if need_input_grad else None
    acc = _acc(x.dtype)
    if layout == "planes" and _fused_channels(c, threads):
        sum_dy = np.empty(c)
        sum_dot = np.empty(c)
        dxv = _view(dx, layout) if dx is not None else xv[:1, :1, :1].copy()
        _apply_bwd_planes(dyv, xv, m, inv, w, need_input_grad, dxv, sum_dy, sum_dot)
        return dx, torch.from_numpy(sum_dot).to(acc), torch.from_numpy(sum_dy).to(acc)
    s, t = _reduce_and_coefs(dyv, xv, layout, m, inv, w, threads)
    if dx is not None:
        zero = np.zeros(c)
        dxv = _view(dx, layout)
        if layout == "planes":
            _bwd_elemt_planes(dyv, xv, m, w * inv, zero, zero, dxv)
        else:
            _rows_bwd_elemt(dyv, xv, m, w * inv, zero, zero, dxv)
    return dx, torch.from_numpy(t * inv).to(acc), torch.from_numpy(s).to(acc)




# ====================================================================== fused activations
#
# Activation codes (see :mod:`batchnorm.kernels.reference_act`): 0 identity, 1 relu,
# 2 leaky_relu, 3 silu, 4 gelu (erf form). ``z = bn(x) [+ residual]``, ``y = act(z)``; the
# backward recomputes ``z`` from ``x`` (and the residual) instead of storing it.

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@njit(cache=True, fastmath=_FM)
def _act_scalar(z, code, slope):
    if code == 3:
        return z / (1.0 + math.exp(-z))
    return 0.5 * z * (1.0 + math.erf(z * _SQRT1_2))


@njit(cache=True, fastmath=_FM)
def _dact_scalar(z, code, slope):
    if code == 3:
        s = 1.0 / (1.0 + math.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    return 0.5 * (1.0 + math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * math.exp(-0.5 * z * z)


@njit(cache=True, fastmath=_FM, inline="always")
def _act_line(row, rr, has_r, mf, af, bf, code, slope, zero, out):
    """``out = act((row - mf) * af + bf [+ rr])`` for one line; per-element mf/af/bf arrays (rows: per channel)."""
    n = row.shape[0]
    if code == 0:
        for i in range(n):
            z = (row[i] - mf[i]) * af[i] + bf[i]
            if has_r:
                z += rr[i]
            out[i] = z
    elif code == 1:
        for i in range(n):
            z = (row[i] - mf[i]) * af[i] + bf[i]
            if has_r:
                z += rr[i]
            out[i] = zero if z <= zero else z
    elif code == 2:
        for i in range(n):
            z = (row[i] - mf[i]) * af[i] + bf[i]
            if has_r:
                z += rr[i]
            out[i] = z * slope if z < zero else z
    else:
        for i in range(n):
            z = (row[i] - mf[i]) * af[i] + bf[i]
            if has_r:
                z += rr[i]
            out[i] = _act_scalar(z, code, slope)


@njit(cache=True, fastmath=_FM, inline="always")
def _grad_line(gy, row, rr, has_r, mf, af, bf, code, slope, zero, out):
    """``out = gy * act'(z)`` with ``z`` recomputed as in :func:`_act_line`."""
    n = row.shape[0]
    if code == 0:
        for i in range(n):
            out[i] = gy[i]
    elif code == 1:
        for i in range(n):
            z = (row[i] - mf[i]) * af[i] + bf[i]
            if has_r:
                z += rr[i]
            out[i] = gy[i] if z > zero else zero
    elif code == 2:
        for i in range(n):
            z = (row[i] - mf[i]) * af[i] + bf[i]
            if has_r:
                z += rr[i]
            out[i] = gy[i] if z > zero else gy[i] * slope
    else:
        for i in range(n):
            z = (row[i] - mf[i]) * af[i] + bf[i]
            if has_r:
                z += rr[i]
            out[i] = gy[i] * _dact_scalar(z, code, slope)


@njit(cache=True, fastmath=_FM)
def _act_line_s(row, rr, has_r, mf, af, bf, code, slope, zero, out):
    """As :func:`_act_line` with scalar ``mf``/``af``/``bf`` (one plane of one channel)."""
    n = row.shape[0]
    if code == 0:
        for i in range(n):
            z = (row[i] - mf) * af + bf
            if has_r:
                z += rr[i]
            out[i] = z
    elif code == 1:
        for i in range(n):
            z = (row[i] - mf) * af + bf
            if has_r:
                z += rr[i]
            out[i] = zero if z <= zero else z
    elif code == 2:
        for i in range(n):
            z = (row[i] - mf) * af + bf
            if has_r:
                z += rr[i]
            out[i] = z * slope if z < zero else z
    else:
        for i in range(n):
            z = (row[i] - mf) * af + bf
            if has_r:
                z += rr[i]
            out[i] = _act_scalar(z, code, slope)


@njit(cache=True, fastmath=_FM)
def _grad_line_s(gy, row, rr, has_r, mf, af, bf, code, slope, zero, out):
    """As :func:`_grad_line` with scalar ``mf``/``af``/``bf``."""
    n = row.shape[0]
    if code == 0:
        for i in range(n):
            out[i] = gy[i]
    elif code == 1:
        for i in range(n):
            z = (row[i] - mf) * af + bf
            if has_r:
                z += rr[i]
            out[i] = gy[i] if z > zero else zero
    elif code == 2:
        for i in range(n):
            z = (row[i] - mf) * af + bf
            if has_r:
                z += rr[i]
            out[i] = gy[i] if z > zero else gy[i] * slope
    else:
        for i in range(n):
            z = (row[i] - mf) * af + bf
            if has_r:
                z += rr[i]
            out[i] = gy[i] * _dact_scalar(z, code, slope)


@njit(**_JIT)
def _act_train_fwd_planes(x, r, has_r, w, b, eps, code, slope, y, mean_out, var_out):
    """Fused training forward + activation (+ residual), one channel per iteration."""
    N, C, L = x.shape
    zr = _zero(x)
    cnt = N * L
    for c in prange(C):
        s = 0.0
        for n in range(N):
            row = x[n, c]
            for l0 in range(0, L, _BLK):
                l1 = min(l0 + _BLK, L)
                p = zr
                for i in range(l0, l1):
                    p += row[i]
                s += p
        sc = np.empty(5, dtype=x.dtype)
        sc[0] = s / cnt
        mf = sc[0]
        sd = 0.0
        sq = 0.0
        for n in range(N):
            row = x[n, c]
            for l0 in range(0, L, _BLK):
                l1 = min(l0 + _BLK, L)
                pd = zr
                pq = zr
                for i in range(l0, l1):
                    d = row[i] - mf
                    pd += d
                    pq += d * d
                sd += pd
                sq += pq
        md = sd / cnt
        v = max(sq / cnt - md * md, 0.0)
        mean_out[c] = mf + md
        var_out[c] = v
        a = w[c] / math.sqrt(v + eps)
        cf = np.empty(3, dtype=x.dtype)
        cf[0] = mf
        cf[1] = a
        cf[2] = b[c] - md * a
        mvs = cf[0]
        avs = cf[1]
        bvs = cf[2]
        sc[3] = 0
        sc[4] = slope
        for n in range(N):
            rr = r[n, c] if has_r else x[n, c]
            _act_line_s(x[n, c], rr, has_r, mvs, avs, bvs, code, sc[4], sc[3], y[n, c])


@njit(**_JIT)
def _act_apply_planes(x, r, has_r, mean, scale, shift, code, slope, y):
    """``y = act((x - mean) * scale + shift [+ r])``, parallel over planes."""
    N, C, L = x.shape
    for k in prange(N * C):
        n = k // C
        c = k % C
        cf = np.empty(3, dtype=x.dtype)
        cf[0] = mean[c]
        cf[1] = scale[c]
        cf[2] = shift[c]
        mvs = cf[0]
        avs = cf[1]
        bvs = cf[2]
        sc = np.empty(2, dtype=x.dtype)
        sc[0] = 0
        sc[1] = slope
        rr = r[n, c] if has_r else x[n, c]
        _act_line_s(x[n, c], rr, has_r, mvs, avs, bvs, code, sc[1], sc[0], y[n, c])


@njit(**_JIT)
def _act_apply_rows(x, r, has_r, mean, scale, shift, code, slope, y):
    M, C = x.shape
    nb = max(1, min(M // 32, 64))
    mv = mean.astype(x.dtype)
    av = scale.astype(x.dtype)
    bv = shift.astype(x.dtype)
    sc = np.empty(2, dtype=x.dtype)
    sc[0] = 0
    sc[1] = slope
    for bi in prange(nb):
        for m in range(bi * M // nb, (bi + 1) * M // nb):
            rr = r[m] if has_r else x[m]
            _act_line(x[m], rr, has_r, mv, av, bv, code, sc[1], sc[0], y[m])


@njit(**_JIT)
def _act_bwd_planes(dy, x, r, has_r, mean, invstd, w, b, code, slope, train, need_dx, need_dr,
                    dx, dr, sum_dy, sum_dot):
    """Fused backward through act and BN, one channel per iteration (second sweep reversed).

    ``g = dy * act'(z)``; ``sum_dy = sum(g)``, ``sum_dot = sum(g * xhat)``; ``dr = g``;
    ``dx`` by the training formula (``train``) or ``g * w * invstd`` (given statistics).
    """
    N, C, L = x.shape
    zr = _zero(x)
    cnt = N * L
    for c in prange(C):
        sc = np.empty(4, dtype=x.dtype)
        sc[0] = mean[c]
        sc[1] = 0
        sc[2] = slope
        mf = sc[0]
        zero = sc[1]
        inv = invstd[c]
        a = w[c] * inv
        md = mean[c] - mf
        cf = np.empty(3, dtype=x.dtype)
        cf[0] = mf
        cf[1] = a
        cf[2] = b[c] - md * a
        mvs = cf[0]
        avs = cf[1]
        bvs = cf[2]
        g = np.empty(L, dtype=x.dtype)
        s = 0.0
        t = 0.0
        for n in range(N):
            row = x[n, c]
            rr = r[n, c] if has_r else row
            _grad_line_s(dy[n, c], row, rr, has_r, mvs, avs, bvs, code, sc[2], zero, g)
            for l0 in range(0, L, _BLK):
                l1 = min(l0 + _BLK, L)
                ps = zr
                pt = zr
                for i in range(l0, l1):
                    ps += g[i]
                    pt += g[i] * (row[i] - mf)
                s += ps
                t += pt
            if need_dr and not (need_dx and train):
                dr[n, c][:] = g
            if need_dx and not train:
                out = dx[n, c]
                for i in range(L):
                    out[i] = g[i] * avs
        t -= md * s
        sum_dy[c] = s
        sum_dot[c] = t * inv
        if need_dx and train:
            kb = -a * inv * inv * t / cnt
            sc[1] = kb
            sc[3] = -a * s / cnt - kb * md
            bb = sc[1]
            cc = sc[3]
            for nn in range(N):
                n = N - 1 - nn
                row = x[n, c]
                rr = r[n, c] if has_r else row
                _grad_line_s(dy[n, c], row, rr, has_r, mvs, avs, bvs, code, sc[2], zero, g)
                out = dx[n, c]
                for i in range(L):
                    out[i] = g[i] * avs + (row[i] - mf) * bb + cc
                if need_dr:
                    dr[n, c][:] = g


@njit(**_JIT)
def _act_bwd_reduce_planes(dy, x, r, has_r, mean, scale, shift, code, slope, psum, pdot):
    """Split path: per plane ``sum(g)`` and ``sum(g * (x - mean_rounded))``."""
    N, C, L = x.shape
    zr = _zero(x)
    for k in prange(N * C):
        n = k // C
        c = k % C
        cf = np.empty(3, dtype=x.dtype)
        cf[0] = mean[c]
        cf[1] = scale[c]
        cf[2] = shift[c]
        mvs = cf[0]
        avs = cf[1]
        bvs = cf[2]
        sc = np.empty(2, dtype=x.dtype)
        sc[0] = 0
        sc[1] = slope
        g = np.empty(L, dtype=x.dtype)
        row = x[n, c]
        rr = r[n, c] if has_r else row
        _grad_line_s(dy[n, c], row, rr, has_r, mvs, avs, bvs, code, sc[1], sc[0], g)
        s = 0.0
        t = 0.0
        for l0 in range(0, L, _BLK):
            l1 = min(l0 + _BLK, L)
            ps = zr
            pt = zr
            for i in range(l0, l1):
                ps += g[i]
                pt += g[i] * (row[i] - mvs)
            s += ps
            t += pt
        psum[n, c] = s
        pdot[n, c] = t


@njit(**_JIT)
def _act_bwd_elemt_planes(dy, x, r, has_r, mean, scale, shift, code, slope, ka, kb, kc,
                          need_dx, need_dr, dx, dr):
    """Split path: ``g``, then ``dx = g * ka + (x - mean) * kb + kc`` and ``dr = g``."""
    N, C, L = x.shape
    for k in prange(N * C):
        n = k // C
        c = k % C
        cf = np.empty(3, dtype=x.dtype)
        cf[0] = mean[c]
        cf[1] = scale[c]
        cf[2] = shift[c]
        mvs = cf[0]
        avs = cf[1]
        bvs = cf[2]
        sc = np.empty(5, dtype=x.dtype)
        sc[0] = 0
        sc[1] = slope
        sc[2] = ka[c]
        sc[3] = kb[c]
        sc[4] = kc[c]
        g = np.empty(L, dtype=x.dtype)
        row = x[n, c]
        rr = r[n, c] if has_r else row
        _grad_line_s(dy[n, c], row, rr, has_r, mvs, avs, bvs, code, sc[1], sc[0], g)
        if need_dx:
            out = dx[n, c]
            for i in range(L):
                out[i] = g[i] * sc[2] + (row[i] - mvs) * sc[3] + sc[4]
        if need_dr:
            dr[n, c][:] = g


@njit(**_JIT)
def _act_bwd_reduce_rows(dy, x, r, has_r, mean, scale, shift, code, slope, nb, psum, pdot):
    """Per block of rows: float64 ``sum(g)`` and ``sum(g * (x - mean))``, ``g = dy * act'(z)``.

    identity/relu/leaky_relu share one branch-free formula ``act'(z) = 1 if z > 0 else lo``."""
    M, C = x.shape
    mv = mean.astype(x.dtype)
    av = scale.astype(x.dtype)
    bv = shift.astype(x.dtype)
    sc = np.empty(3, dtype=x.dtype)
    sc[0] = 0
    sc[1] = slope
    sc[2] = 1.0 if code == 0 else (0.0 if code == 1 else slope)
    zero = sc[0]
    lo = sc[2]
    for bi in prange(nb):
        accs = np.zeros(C, dtype=x.dtype)
        acct = np.zeros(C, dtype=x.dtype)
        g = np.empty(C, dtype=x.dtype)
        r0 = bi * M // nb
        r1 = (bi + 1) * M // nb
        since = 0
        for m in range(r0, r1):
            xr = x[m]
            gr = dy[m]
            rr = r[m] if has_r else xr
            if code <= 2:
                if has_r:
                    for c in range(C):
                        d = xr[c] - mv[c]
                        z = d * av[c] + bv[c] + rr[c]
                        gg = gr[c] if z > zero else gr[c] * lo
                        accs[c] += gg
                        acct[c] += gg * d
                else:
                    for c in range(C):
                        d = xr[c] - mv[c]
                        z = d * av[c] + bv[c]
                        gg = gr[c] if z > zero else gr[c] * lo
                        accs[c] += gg
                        acct[c] += gg * d
            else:
                _grad_line(gr, xr, rr, has_r, mv, av, bv, code, sc[1], zero, g)
                for c in range(C):
                    accs[c] += g[c]
                    acct[c] += g[c] * (xr[c] - mv[c])
            since += 1
            if since == _RBLK or m == r1 - 1:
                for c in range(C):
                    psum[bi, c] += accs[c]
                    pdot[bi, c] += acct[c]
                    accs[c] = 0
                    acct[c] = 0
                since = 0


@njit(**_JIT)
def _act_bwd_elemt_rows(dy, x, r, has_r, mean, scale, shift, code, slope, ka, kb, kc,
                        need_dx, need_dr, dx, dr):
    """``g``, then ``dx = g * ka + (x - mean) * kb + kc`` and ``dr = g`` on ``(M, C)`` rows."""
    M, C = x.shape
    nb = max(1, min(M // 32, 64))
    mv = mean.astype(x.dtype)
    av = scale.astype(x.dtype)
    bv = shift.astype(x.dtype)
    a = ka.astype(x.dtype)
    bb = kb.astype(x.dtype)
    cc = kc.astype(x.dtype)
    sc = np.empty(3, dtype=x.dtype)
    sc[0] = 0
    sc[1] = slope
    sc[2] = 1.0 if code == 0 else (0.0 if code == 1 else slope)
    zero = sc[0]
    lo = sc[2]
    for bi in prange(nb):
        g = np.empty(C, dtype=x.dtype)
        for m in range(bi * M // nb, (bi + 1) * M // nb):
            xr = x[m]
            gr = dy[m]
            rr = r[m] if has_r else xr
            if code <= 2 and need_dx and not need_dr and not has_r:
                out = dx[m]
                for c in range(C):
                    d = xr[c] - mv[c]
                    z = d * av[c] + bv[c]
                    gg = gr[c] if z > zero else gr[c] * lo
                    out[c] = gg * a[c] + d * bb[c] + cc[c]
                continue
            _grad_line(gr, xr, rr, has_r, mv, av, bv, code, sc[1], zero, g)
            if need_dx:
                out = dx[m]
                for c in range(C):
                    out[c] = g[c] * a[c] + (xr[c] - mv[c]) * bb[c] + cc[c]
            if need_dr:
                dr[m][:] = g


# ------------------------------------------------------------------ fused activation wrappers

_ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}


def _residual(r: Tensor | None, x: Tensor, layout: str) -> tuple[np.ndarray, bool]:
    if r is None:
        return _view(x, layout), False
    r = r.to(x.dtype)
    r = _grad_layout(r, x, layout)
    return _view(r, layout), True


def forward_train_act(x, weight, bias, residual, mask, eps, vbs, act, slope):
    """``y = act(bn(x) [+ residual])`` in training mode: ``(y, mean, var, count)``."""
    threads = _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, layout)
    n, c = x.shape[0], x.shape[1]
    count = x.numel() // c
    y = _like(x, layout)
    xv, yv = _view(x, layout), _view(y, layout)
    rv, has_r = _residual(residual, x, layout)
    code = _ACT_CODES[act]
    w = _vec(weight, c, 1.0, x.dtype)
    b = _vec(bias, c, 0.0, x.dtype)
    if layout == "planes" and _fused_channels(c, threads):
        mean = np.empty(c)
        var = np.empty(c)
        _act_train_fwd_planes(xv, rv, has_r, w, b, float(eps), code, float(slope), yv, mean, var)
    else:
        if layout == "planes":
            pmean = np.empty((n, c))
            pm2 = np.empty((n, c))
            _plane_stats(xv, pmean, pm2)
            mean = np.empty(c)
            var = np.empty(c)
            _merge_planes(pmean, pm2, xv.shape[2], mean, var)
        else:
            mean, var = _stats_rows(xv)
        _apply_act(xv, rv, has_r, layout, mean, w / np.sqrt(var + eps), b, code, slope, yv)
    acc = _acc(x.dtype)
    mean_t = torch.from_numpy(mean).to(acc).unsqueeze(0)
    var_t = torch.from_numpy(var).to(acc).unsqueeze(0)
    return y, mean_t, var_t, torch.full((1,), float(count), dtype=acc)


def _apply_act(xv, rv, has_r, layout, mean, scale, shift, code, slope, yv):
    # the kernels compute (x - mean_rounded) * scale + shift'; fold the rounding into shift'
    mr = mean.astype(xv.dtype).astype(np.float64)
    shift = shift - (mean - mr) * scale
    if layout == "planes":
        _act_apply_planes(xv, rv, has_r, mr, scale, shift, code, float(slope), yv)
    else:
        _act_apply_rows(xv, rv, has_r, mr, scale, shift, code, float(slope), yv)


def forward_apply_act(x, mean, invstd, weight, bias, residual, act, slope):
    """``y = act(bn(x; mean, invstd) [+ residual])`` with given ``(C,)`` statistics."""
    _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, layout)
    c = x.shape[1]
    y = _like(x, layout)
    xv, yv = _view(x, layout), _view(y, layout)
    rv, has_r = _residual(residual, x, layout)
    m = mean.detach().reshape(-1).to(torch.float64).contiguous().numpy()
    scale = invstd.detach().reshape(-1).to(torch.float64).numpy() * _vec(weight, c, 1.0, x.dtype)
    _apply_act(xv, rv, has_r, layout, m, scale, _vec(bias, c, 0.0, x.dtype), _ACT_CODES[act], slope, yv)
    return y


def _backward_act(dy, x, residual, mean, invstd, weight, bias, act, slope, train, need_dx, need_dr):
    threads = _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, layout)
    dy = _grad_layout(dy, x, layout)
    c = x.shape[1]
    cnt = x.numel() // c
    xv, dyv = _view(x, layout), _view(dy, layout)
    rv, has_r = _residual(residual, x, layout)
    code = _ACT_CODES[act]
    m = mean.detach().reshape(-1).to(torch.float64).contiguous().numpy()
    inv = invstd.detach().reshape(-1).to(torch.float64).contiguous().numpy()
    w = _vec(weight, c, 1.0, x.dtype)
    b = _vec(bias, c, 0.0, x.dtype)
    dx = _like(x, layout) if need_dx else None
    dr = _like(x, layout) if need_dr else None
    dxv = _view(dx, layout) if dx is not None else xv
    drv = _view(dr, layout) if dr is not None else xv
    acc = _acc(x.dtype)
    if layout == "planes" and _fused_channels(c, threads):
        sum_dy = np.empty(c)
        sum_dot = np.empty(c)
        _act_bwd_planes(dyv, xv, rv, has_r, m, inv, w, b, code, float(slope), train, need_dx, need_dr,
                        dxv, drv, sum_dy, sum_dot)
        return dx, torch.from_numpy(sum_dot).to(acc), torch.from_numpy(sum_dy).to(acc), dr
    mr = m.astype(xv.dtype).astype(np.float64)
    scale = w * inv
    shift = b - (m - mr) * scale
    if layout == "planes":
        psum = np.empty((xv.shape[0], c))
        pdot = np.empty((xv.shape[0], c))
        _act_bwd_reduce_planes(dyv, xv, rv, has_r, mr, scale, shift, code, float(slope), psum, pdot)
    else:
        nb = _row_blocks(xv.shape[0])
        psum = np.zeros((nb, c))
        pdot = np.zeros((nb, c))
        _act_bwd_reduce_rows(dyv, xv, rv, has_r, mr, scale, shift, code, float(slope), nb, psum, pdot)
    s = psum.sum(0)
    t = pdot.sum(0) - (m - mr) * s
    if need_dx or need_dr:
        if train:
            kb = -scale * inv * inv * t / cnt
            kc = -scale * s / cnt + kb * (mr - m)
        else:
            kb = np.zeros(c)
            kc = np.zeros(c)
        args = (dyv, xv, rv, has_r, mr, scale, shift, code, float(slope), scale, kb, kc, need_dx, need_dr,
                dxv, drv)
        if layout == "planes":
            _act_bwd_elemt_planes(*args)
        else:
            _act_bwd_elemt_rows(*args)
    return dx, torch.from_numpy(t * inv).to(acc), torch.from_numpy(s).to(acc), dr


def backward_train_act(dy, x, residual, mean, invstd, weight, bias, mask, count, vbs, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    """Backward of :func:`forward_train_act`: ``(dx, dweight, dbias, dresidual)``."""
    return _backward_act(dy, x, residual, mean, invstd, weight, bias, act, slope, True,
                         need_input_grad, need_residual_grad)


def backward_apply_act(dy, x, residual, mean, invstd, weight, bias, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    """Backward of :func:`forward_apply_act` (statistics constant): ``(dx, dweight, dbias, dresidual)``."""
    return _backward_act(dy, x, residual, mean, invstd, weight, bias, act, slope, False,
                         need_input_grad, need_residual_grad)


_DTYPES = (torch.float32, torch.float64)
_OPS = frozenset({"forward_train", "forward_apply", "backward_train", "backward_apply", "forward_train_act",
                  "forward_apply_act", "backward_train_act", "backward_apply_act"})


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """Dense float32/float64 CPU tensors of at least :data:`MIN_NUMEL` elements, no mask, one group."""
    if op not in _OPS:
        return False
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2:
        return False
    if mask is not None or (0 < vbs < x.shape[0]):
        return False
    if x.numel() < MIN_NUMEL or x.shape[1] == 0:
        return False
    return True


register_backend(name, __import__(__name__, fromlist=["name"]), priority=50)
