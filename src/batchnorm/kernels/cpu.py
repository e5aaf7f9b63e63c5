"""CPU backend: fused batch-norm kernels compiled by numba (``parallel=True``, disk cache).

Two memory layouts are handled without copies:

* **planes**: contiguous ``(N, C, *S)`` seen as ``(N, C, L)``. The training forward runs one
  channel per thread: one sweep reads the channel's slice from memory for its sums shifted by a
  pilot mean (:func:`_pilot_moments`), and the normalize sweep, last plane first, finds it in
  L2 -- one read and one write of the tensor instead of ATen's three sweeps. The backward
  reads ``x``/``dy`` for the sums and sweeps them again *in reverse*, so its first half is
  served by the cache the reduction just filled. When there are fewer channels than threads
  can share evenly, a split path reduces per ``(n, c)`` plane in parallel and merges the parts
  exactly (Chan et al.), so ``C = 1`` still uses every core.
* **rows**: channels_last ``(N, *S, C)`` and 2D ``(N, C)`` seen as ``(M, C)``, and contiguous
  input with short planes as ``(N, C * L)`` (each channel ``L`` consecutive columns, see
  :data:`ROWS_MAX_PLANE`); threads take blocks of rows and keep per-block partial sums (shifted
  by a per-channel pilot mean, so the one-pass variance has no cancellation), merged in float64.

Every kernel takes an activation (and optional residual): ``y = act(bn(x) [+ residual])``; plain
batch norm is the identity, for which the backward uses ``dy`` itself (no gradient buffer), and
its element loops (like BN + ReLU's) are compiled separately with the activation as a constant
(:func:`_cases`), so it costs what a kernel written for it would.

The element formulas (forward, gradient at the pre-activation, input gradient) are written once
and compile to scalar and 32-byte vector code (:mod:`batchnorm.kernels._simd`); outputs of at
least :data:`STREAM_MIN_BYTES` (backward: :data:`STREAM_MIN_BYTES_BACKWARD`) are written with
non-temporal stores, which skip the write-allocate read and leave the cache to the input.

Each op is one call from Python (``_train``, ``_apply``, ``_bwd``: tensors passed by address,
arrays built inside numba) into a serial driver (``_train_planes``, ``_bwd_rows``, ...) that runs
the parallel kernels and the per-channel arithmetic between them; the training forward also moves
the running statistics when it is given them (``running=``; with ``skip_nonfinite`` not for a
batch whose statistics are not finite).

Statistics and the backward's sums are float64 sums of input-dtype partials over bounded blocks
(planes: blocks of :data:`_VBLK` values, within a plane as across planes; rows: blocks of
:data:`_RBLK` rows), so their error does not grow with the tensor (float64 throughout for float64
input). Kernels read tensors through raw pointers, which do not keep arrays alive: see the
lifetime rule of :func:`batchnorm.kernels._simd.pointers` (every pointer of an array the kernel
allocates is followed by a ``keep``). Divisions follow IEEE (numpy's error model: ``eps = 0``
with a zero variance gives inf/NaN, as in torch). Masks, ghost batches and half precision go to
the reference backend (:func:`supports`). Numba uses ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from . import _jit, register_backend
from . import reference as ref
from ._simd import (
    LINE_BYTES,
    add_at,
    at,
    atc,
    hsum,
    keep,
    lanes,
    lanewise,
    pointers,
    store_rows,
    store_span,
    vfill,
    voidptr,
    vpos,
    where_gt,
    where_le,
    where_lt,
    widen,
)
from .reference import acc_dtype

name = "cpu"

# Reassociation lets LLVM vectorize the reductions; no "nnan"/"ninf": NaN/inf must propagate
# (the layers detect non-finite batches from the statistics).
_FM = {"reassoc", "contract", "arcp", "nsz"}
# Numpy's error model: a division by zero gives inf/NaN as in torch (IEEE), not Python's
# ZeroDivisionError (``eps = 0`` with a zero variance); it also drops the divisor checks.
_NJ = {"cache": True, "error_model": "numpy"}
_JIT = {**_NJ, "parallel": True, "fastmath": _FM, "nogil": True}
# Planes: values summed in input-dtype vectors before they are added to float64 ones (a multiple
# of two vectors of float32); rows: rows summed in the input dtype before a float64 flush.
_VBLK = 512
_RBLK = 64

# Below this many elements the reference path would run. Since each op is one driver call (and
# small tensors run on one thread, see PARALLEL_MIN), this backend is faster than the reference
# path's ~10 torch calls at every size measured (layer forward, forward+backward and eval,
# (8, 16) to (32, 16, 8, 8), interleaved repeats on the 2-core EPYC: 1.12x-1.73x), so no size is
# left out; the constant stays for tests and for machines where launching numba costs more.
MIN_NUMEL = 1
# Outputs of at least this many bytes are written with non-temporal (streaming) stores, which
# skip reading the output's lines and keep it from evicting the input the kernel reads again
# (see :mod:`batchnorm.kernels._simd`); smaller ones stay in cache for whatever reads them next.
# Measured on the 2-core EPYC, (N, 64, H, W) float32, kernel time plain/streamed: forward
# 0.87-0.99 up to 6 MiB, 1.09-1.13 at 12.5 MiB; backward 1.08-1.22 from 1.5 MiB on. In a network
# the next layer reads the output at once: a streamed 1 MiB backward output made the backward
# kernel 143 us against 98-111 us plain inside a conv-BN-ReLU stack ((64, 64, 8, 8); the step
# 1.5 ms slower), so the backward streams from 2 MiB (docs/results/2026-12-01-cpu-compile-time-streaming-network.md).
STREAM_MIN_BYTES = 8 << 20
STREAM_MIN_BYTES_BACKWARD = 2 << 20
# ... and on the planes kernels only when a plane is a whole number of 64-byte lines or at least
# this many bytes: a plane's partial lines at both ends take plain stores between streamed ones,
# and short unaligned planes lost (7x7 float32, 6 MiB, plain/streamed time: inference 0.27-0.51,
# backward 0.69-0.80, training forward 0.79-1.09; 14x14 backward 1.08-1.18, 8x8 0.98-1.21).
STREAM_MIN_PLANE_BYTES = 512
# Contiguous (N, C, *S) input whose planes hold fewer than ROWS_MAX_PLANE values (and whose
# samples at most ROWS_MAX_COLUMNS) runs on the rows kernels as (N, C * L) rows, each channel L
# consecutive columns: below that the planes kernels' per-plane work (loop setup, horizontal sums)
# costs more than the rows kernels' per-column accumulators. Measured on the 2-core EPYC, 2 MiB
# float32, time of forward_apply + forward_train + backward_train, planes / rows (us), since the
# plain batch norm has its own loops (see _cases): C = 64: L = 4 2623/502, 9 1450/546, 16 701/676,
# 25 739/746, 36 611/876, 49 486/1003; C = 256: L = 4 2754/702, 9 1417/843, 16 639/1087.
ROWS_MAX_PLANE = 16
ROWS_MAX_COLUMNS = 4096
# Below this many elements one thread does the work: waking a second thread costs more than it
# saves, and much more when the machine is busy (the join waits for a time slice).
PARALLEL_MIN = 1 << 16


# ============================================================================ inline helpers
#
# Each loop the kernels share is written once here. ``inline="always"`` splices a helper into its
# caller's numba IR before compilation, so a kernel compiles to the same loops as if they were
# written out in it, and arguments the caller passes as constants (``use_g``, ``mode``, ``has_r``)
# fold away. Activation codes (see :mod:`batchnorm.kernels.reference_act`): 0 identity, 1 relu,
# 2 leaky_relu, 3 silu, 4 gelu (erf form); plain batch norm is code 0 of the fused kernels.

_INL = {**_NJ, "fastmath": _FM, "inline": "always"}
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@njit(**_INL)
def _as(x, v):
    """``v`` rounded to ``x``'s dtype (a kernel's per-channel constants are rounded once)."""
    return x.dtype.type(v)


@njit(**_INL)
def _flat(t):
    return t.reshape(t.size)


@njit(**_INL)
def _eblocks(M, P):
    """Blocks for the elementwise kernels over ``M`` units (rows, planes) of ``P`` values: at
    least ~1024 values each, at most 64."""
    return max(1, min(M, M * P // 1024, 64))


@njit(**_INL)
def _ptr(t):
    """A pointer to the data of the C-contiguous ``t``, read with ``at`` at flat indices: no view
    and no reference count per plane (a plane's views cost more than its arithmetic when it is
    small: (128, 64, 8, 8) normalized in 3x the time of the flat loop). ``t`` must outlive the
    pointer: an argument of the compiled kernel, or an array it passes to ``keep`` after the
    pointer's last use (the lifetime rule of :func:`~batchnorm.kernels._simd.pointers`)."""
    return pointers((_flat(t),))[0]


@njit(**_INL)
def _pair_step(xp, g, goff, i, w, mf, use_g, acc):
    """Two vectors from ``i`` into the accumulators ``acc = (vs0, vt0, vs1, vt1)`` (see :func:`_span_sums`)."""
    vs0, vt0, vs1, vt1 = acc
    d0 = at(xp, vpos(i)) - mf
    d1 = at(xp, vpos(i + w)) - mf
    g0 = at(g, vpos(i - goff)) if use_g else d0
    g1 = at(g, vpos(i + w - goff)) if use_g else d1
    return vs0 + g0, vt0 + g0 * d0, vs1 + g1, vt1 + g1 * d1


@njit(**_INL)
def _span_sums(g, goff, xp, f0, n, step, count, mf, use_g, zero):
    """Float64 ``sum(g)`` and ``sum(g * (x - mf))`` over ``count`` spans of ``n`` values of ``x``
    from ``f0``, ``f0 + step``, ... (``xp`` a pointer; ``g`` at ``i`` is the pointer ``g`` at
    ``i - goff``); ``g = x - mf`` when not ``use_g`` (the shifted moments).

    Summed in 32-byte vectors of the input dtype, two per step, which are added to float64 vectors
    (:func:`~batchnorm.kernels._simd.widen`, no horizontal sum) after each whole block of
    :data:`_VBLK` values of a span (a fixed trip count) and, for the rest of the spans (short
    planes, a plane's last part), once :data:`_VBLK` such values have come: an input-dtype lane
    adds at most ``_VBLK / W`` values between flushes, so the error does not grow with the plane
    (summed whole in float32, a 4096x4096 plane's variance was 4e-4 off). One horizontal sum at
    the end (a horizontal sum per plane cost as much as a short plane's arithmetic)."""
    w = lanes(zero)
    s = 0.0
    t = 0.0
    z = vfill(zero)
    ws = widen(z)
    wt = ws
    acc = (z, z, z, z)
    ps = zero
    pt = zero
    since = 0
    for k in range(count):
        a = f0 + k * step
        e2 = a + n // (2 * w) * (2 * w)
        e1 = a + n // w * w
        eb = a + (e2 - a) // _VBLK * _VBLK
        for c0 in range(a, eb, _VBLK):  # whole blocks (a fixed trip count), each flushed
            for i in range(c0, c0 + _VBLK, 2 * w):
                acc = _pair_step(xp, g, goff, i, w, mf, use_g, acc)
            ws += widen(acc[0] + acc[2])
            wt += widen(acc[1] + acc[3])
            acc = (z, z, z, z)
        for i in range(eb, e2, 2 * w):
            acc = _pair_step(xp, g, goff, i, w, mf, use_g, acc)
        vs0, vt0, vs1, vt1 = acc
        for i in range(e2, e1, w):
            d0 = at(xp, vpos(i)) - mf
            g0 = at(g, vpos(i - goff)) if use_g else d0
            vs0 += g0
            vt0 += g0 * d0
        for i in range(e1, a + n):
            d = at(xp, i) - mf
            gi = at(g, i - goff) if use_g else d
            ps += gi
            pt += gi * d
        acc = (vs0, vt0, vs1, vt1)
        since += a + n - eb
        if since >= _VBLK or k == count - 1:
            ws += widen(vs0 + vs1)
            wt += widen(vt0 + vt1)
            s += ps
            t += pt
            acc = (z, z, z, z)
            ps = zero
            pt = zero
            since = 0
    return hsum(ws) + s, hsum(wt) + t


@njit(**_INL)
def _plane_sums(x, xp, n0, n1, c, mf):
    """Float64 ``sum(x - mf)`` and ``sum((x - mf)**2)`` over the planes ``x[n0:n1, c]``."""
    _, C, L = x.shape
    return _span_sums(xp, 0, xp, (n0 * C + c) * L, L, C * L, n1 - n0, mf, False, _as(x, 0))


@njit(**_INL)
def _moments(x, xp, n0, n1, c):
    """Planes ``x[n0:n1, c]`` (``xp`` = ``_ptr(x)``): their mean rounded to the input dtype
    ``mf``, then float64 ``sum(x - mf)`` and ``sum((x - mf)**2)`` in a second sweep while they are
    hot (the shift keeps the one-pass variance free of cancellation)."""
    mf = _as(x, _plane_sums(x, xp, n0, n1, c, _as(x, 0))[0] / ((n1 - n0) * x.shape[2]))
    sd, sq = _plane_sums(x, xp, n0, n1, c, mf)
    return mf, sd, sq


@njit(**_INL)
def _pilot_moments(x, xp, c):
    """All planes of channel ``c`` in one sweep: a pilot mean ``mf`` (in the input dtype, from
    the first planes, at least ~1024 values, which are then hot), then float64 ``sum(x - mf)`` and
    ``sum((x - mf)**2)`` over the channel. It saves :func:`_moments`' second sweep over the
    channel; the caller falls back to :func:`_moments` when the pilot is far from the mean (in
    units of the standard deviation), where the one-pass variance would cancel."""
    N, L = x.shape[0], x.shape[2]
    npl = min(N, max(1, (1024 + L - 1) // L))
    mf = _as(x, _plane_sums(x, xp, 0, npl, c, _as(x, 0))[0] / (npl * L))
    sd, sq = _plane_sums(x, xp, 0, N, c, mf)
    return mf, sd, sq


# ------------------------------------------------------------------ element formulas
#
# Each formula is written once, as a function of a parameter tuple ``p`` and an index ``i``: a
# flat index (an int, or a :class:`~batchnorm.kernels._simd.Pos`: the formula then computes 32
# bytes of lanes), or for rows ``(flat index, column)``. Tensors are pointers read with ``at``,
# per-channel values (a plane's scalars, a row's tiled arrays) with ``atc``;
# :func:`~batchnorm.kernels._simd.store_span` and ``store_rows`` run a formula over a span of a
# flat output and stream large outputs past the cache.


@njit(**_INL)
def _zat(x, r, has_r, mf, af, bf, i):
    """The pre-activation ``(x - mf) * af + bf [+ r]`` at ``i``."""
    z = (at(x, i) - atc(mf, i)) * atc(af, i) + atc(bf, i)
    if has_r:
        z += at(r, i)
    return z


@njit(**_NJ, fastmath=_FM)
def _act_scalar(z, code, slope):
    if code == 3:
        return z / (1.0 + math.exp(-z))
    return 0.5 * z * (1.0 + math.erf(z * _SQRT1_2))


@njit(**_NJ, fastmath=_FM)
def _dact_scalar(z, code, slope):
    if code == 3:
        s = 1.0 / (1.0 + math.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    return 0.5 * (1.0 + math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * math.exp(-0.5 * z * z)


@njit(**_INL)
def _fy(p, i):
    """Forward: ``act(z)``; ``p = (x, r, has_r, mf, af, bf, code, slope, zero)``."""
    x, r, has_r, mf, af, bf, code, slope, zero = p
    z = _zat(x, r, has_r, mf, af, bf, i)
    if code == 0:
        return z
    if code == 1:
        return where_le(z, zero, zero, z)
    if code == 2:
        return where_lt(z, zero, z * slope, z)
    return lanewise(_act_scalar, z, code, slope)


@njit(**_INL)
def _fg(p, i):
    """The gradient at the pre-activation, ``g = dy * act'(z)``;
    ``p = (dy, x, r, has_r, mf, af, bf, code, slope, zero, ...)`` (read by position: :func:`_fdx`
    passes a longer tuple; a tuple nested in a tuple trips numba's parfor array analysis)."""
    gy = at(p[0], i)
    code, zero = p[7], p[9]
    if code == 0:
        return gy
    z = _zat(p[1], p[2], p[3], p[4], p[5], p[6], i)
    if code == 1:
        return where_gt(z, zero, gy, zero)
    if code == 2:
        return where_gt(z, zero, gy, gy * p[8])
    return gy * lanewise(_dact_scalar, z, code, p[8])


@njit(**_INL)
def _fdx(p, i):
    """The input gradient ``g * ka + (x - mf) * kb + kc``; ``p`` = the :func:`_fg` parameters
    followed by ``ka, kb, kc``."""
    return _fg(p, i) * atc(p[10], i) + (at(p[1], i) - atc(p[4], i)) * atc(p[11], i) + atc(p[12], i)


# Each formula's loop is compiled once per signature in these (not inlined) functions and
# called once per plane or block of rows, with flat outputs and pointer operands (no reference
# counting): inlined at every call site, the backward alone took 150 s to compile.
_LINE = {**_NJ, "fastmath": _FM}


# Two common cases run their own copy of each loop, with the activation and the residual flag as
# compile-time constants: the plain batch norm (the identity) and BN + ReLU, both without a
# residual. As run-time values every vector tested them (LLVM does not unswitch a loop this
# large), which made a (128, 64, 8, 8) inference 2.5x slower. Every other case runs the general
# loop. The copies add a quarter to the cold compile (docs/results/2026-12-01-cpu-loop-copies.md).


@njit(**_INL)
def _case(p):
    """The case of the :func:`_fy` parameters ``p``: the activation code 0 (identity) or 1 (ReLU)
    without a residual, else -1 (the general loop)."""
    if p[2] or p[6] > 1:
        return -1
    return p[6]


@njit(**_INL)
def _fixed(p, code):
    """The :func:`_fy` parameters ``p`` with no residual and the activation ``code`` as constants."""
    return p[:2] + (False,) + p[3:6] + (code,) + p[7:]


@njit(**_INL)
def _cases(run, a, p):
    """``run(a, q)``, ``q`` the :func:`_fy` parameters ``p`` with the constants of their case."""
    k = _case(p)
    if k == 0:
        run(a, _fixed(p, 0))
    elif k == 1:
        run(a, _fixed(p, 1))
    else:
        run(a, p)


@njit(**_INL)
def _cases_g(run, a, p):
    """:func:`_cases` for the :func:`_fg` (and :func:`_fdx`) parameters (``dy`` first)."""
    k = _case(p[1:])
    if k == 0:
        run(a, p[:1] + _fixed(p[1:], 0))
    elif k == 1:
        run(a, p[:1] + _fixed(p[1:], 1))
    else:
        run(a, p)


# The loops, as ``run(a, q)`` for :func:`_cases`: ``a`` the loop's arguments and formula, ``q``
# the formula's parameters. A ``_spans`` loop writes ``count`` spans of ``n`` values starting at
# ``f0``, ``f0 + step``, ... (a plane: ``count = 1``; a channel's planes, last first:
# ``step = -C * L``).


@njit(**_INL)
def _spans(a, q):
    out, f0, n, step, count, off, stream, f = a
    for k in range(count):
        store_span(out, f0 + k * step, f0 + k * step + n, off, stream, f, q)


@njit(**_INL)
def _rows(a, q):
    out, m0, m1, ch, stream, f = a
    store_rows(out, m0, m1, ch, stream, f, q)


@njit(**_INL)
def _planes(a, q):
    out, k0, k1, C, L, stream = a
    c = k0 % C
    f0 = k0 * L
    for _ in range(k0, k1):
        store_span(out, f0, f0 + L, 0, stream, _fy,
                   (q[0], q[1], q[2], at(q[3], c), at(q[4], c), at(q[5], c), q[6], q[7], q[8]))
        f0 += L
        c = c + 1 if c + 1 < C else 0


@njit(**_LINE)
def _y_spans(out, f0, n, step, count, off, stream, p):
    _cases(_spans, (out, f0, n, step, count, off, stream, _fy), pointers(p))


@njit(**_LINE)
def _g_spans(out, f0, n, step, count, off, stream, p):
    _cases_g(_spans, (out, f0, n, step, count, off, stream, _fg), pointers(p))


@njit(**_LINE)
def _dx_spans(out, f0, n, step, count, off, stream, p):
    _cases_g(_spans, (out, f0, n, step, count, off, stream, _fdx), pointers(p))


@njit(**_LINE)
def _y_planes(out, k0, k1, C, L, stream, p):
    """Planes ``k0:k1`` of the flat ``(N, C, L)`` tensors with the per-channel values ``p[3:6]``
    (pointers, read at each plane's channel): one call for a run of planes, as a call per short
    plane costs as much as its arithmetic."""
    _cases(_planes, (out, k0, k1, C, L, stream), pointers(p))


@njit(**_LINE)
def _y_rows(out, m0, m1, ch, stream, p):
    _cases(_rows, (out, m0, m1, ch, stream, _fy), pointers(p))


@njit(**_LINE)
def _g_rows(out, m0, m1, ch, stream, p):
    _cases_g(_rows, (out, m0, m1, ch, stream, _fg), pointers(p))


@njit(**_LINE)
def _dx_rows(out, m0, m1, ch, stream, p):
    _cases_g(_rows, (out, m0, m1, ch, stream, _fdx), pointers(p))


@njit(**_INL)
def _grad(gp, buf, bp, f0, f1):
    """``g`` (:func:`_fg`, parameters ``gp``) on the span ``f0:f1`` as ``(pointer, offset)``, ``g``
    at ``i`` being the pointer at ``i - offset``: ``dy`` itself for the identity (no copy), else
    computed into ``buf`` (``bp`` its pointer, at least ``f1 - f0`` long)."""
    if gp[7] == 0:
        return gp[0], 0
    _g_spans(buf, f0, f1 - f0, 0, 1, f0, False, gp)
    return bp, f0


@njit(**_INL)
def _flush(accs, acct, psum, pdot, bi):
    """Add a block's input-dtype accumulators to its float64 partial sums and reset them."""
    for c in range(accs.shape[0]):
        psum[bi, c] += accs[c]
        pdot[bi, c] += acct[c]
        accs[c] = 0
        acct[c] = 0


@njit(**_INL)
def _g_d(q, moments, i):
    """``(g, x - k)`` at ``i`` (one element or ``W`` lanes), ``k = q[4]``: ``g = x - k`` for the
    ``moments``, else ``g`` of :func:`_fg`."""
    d = at(q[1], i) - atc(q[4], i)
    return (d if moments else _fg(q, i)), d


@njit(**_INL)
def _sums_step(q, moments, i, c, accs, acct):
    """Add ``g`` and ``g * (x - k)`` at ``i`` (:func:`_g_d`) to the accumulators at channel ``c``."""
    g, d = _g_d(q, moments, i)
    add_at(accs, c, g)
    add_at(acct, c, g * d)


@njit(**_INL)
def _rows_block_sums(q, moments, ch, r0, r1, bi, psum, pdot):
    """Rows ``r0:r1`` of the flat ``(M, ch)`` tensors of the gate parameters ``q`` (:func:`_fg`,
    tensors as pointers) into ``psum[bi]``, ``pdot[bi]``: float64 ``sum(g)`` and
    ``sum(g * (x - k))``, ``k = q[4]``, with ``g = x - k`` (``moments``) or ``g`` of :func:`_fg`;
    ``W`` channels at a time, two rows
    per step (one accumulator update for both). The per-channel accumulators, in the input dtype,
    are flushed to float64 every :data:`_RBLK` rows."""
    accs = np.full(ch, q[9])
    acct = np.full(ch, q[9])
    w = 32 // accs.itemsize
    cv = ch // w * w
    for s0 in range(r0, r1, _RBLK):
        s1 = min(s0 + _RBLK, r1)
        for m in range(s0, s1 - 1, 2):
            for c in range(0, cv, w):
                g0, d0 = _g_d(q, moments, (vpos(m * ch + c), vpos(c)))
                g1, d1 = _g_d(q, moments, (vpos((m + 1) * ch + c), vpos(c)))
                add_at(accs, vpos(c), g0 + g1)
                add_at(acct, vpos(c), g0 * d0 + g1 * d1)
            for c in range(cv, ch):
                _sums_step(q, moments, (m * ch + c, c), c, accs, acct)
                _sums_step(q, moments, ((m + 1) * ch + c, c), c, accs, acct)
        if (s1 - s0) % 2:
            m = s1 - 1
            for c in range(0, cv, w):
                _sums_step(q, moments, (vpos(m * ch + c), vpos(c)), vpos(c), accs, acct)
            for c in range(cv, ch):
                _sums_step(q, moments, (m * ch + c, c), c, accs, acct)
        _flush(accs, acct, psum, pdot, bi)


@njit(**_INL)
def _block_sums(a, q):
    ch, r0, r1, bi, psum, pdot = a
    _rows_block_sums(q, False, ch, r0, r1, bi, psum, pdot)


@njit(**_LINE)
def _g_block_sums(gp, ch, r0, r1, bi, psum, pdot):
    """:func:`_rows_block_sums` of ``g`` (the backward's reduction), per case (:func:`_cases`)."""
    _cases_g(_block_sums, (ch, r0, r1, bi, psum, pdot), pointers(gp))


# ============================================================================ planes (N, C, L)


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


# ============================================================================== rows (M, P)
#
# The row kernels see the tensors as ``M`` rows of ``P`` columns, each channel ``rep`` consecutive
# columns: channels_last ``(N, *S, C)`` and 2D ``(N, C)`` are ``(N * L, C)`` with ``rep = 1``;
# contiguous ``(N, C, *S)`` with small planes is ``(N, C * L)`` with ``rep = L`` (a plane is then
# too short for the planes kernels' per-plane loop, see :data:`ROWS_MAX_PLANE`). They index the
# flat tensors ``(m * P + j, j)``; per-channel values are tiled to ``P + W`` column entries
# (:func:`_tiled`) so that a vector of ``W`` lanes starting at any column reads consecutive entries.


def _row_blocks(m: int, threads: int) -> int:
    """Blocks of rows that the reductions split ``m`` rows into: at least 32 rows each, since a
    block's partial sums cost as much as 32 rows' arithmetic (measured with 4096-column rows:
    blocks of 8 rows took the training forward 1.6-2x longer)."""
    return max(1, min(m // 32, 8 * threads))


@njit(**_NJ)
def _tiled(v, x, rep):
    """Per-channel ``v`` in ``x``'s dtype as column entries (channel ``c`` at columns
    ``c * rep .. c * rep + rep - 1``), repeated to ``P + W`` entries (``W`` lanes of 32 bytes)."""
    p = v.shape[0] * rep
    out = np.empty(p + 32 // x.itemsize, dtype=x.dtype)
    # no division per entry: ``v[(k % p) // rep]`` took 4 us per 1000 columns (a kernel call
    # tiles 3 to 9 vectors: 49 us at 4000 columns), this 0.4 us
    if rep == 1:
        out[:p] = v
    else:
        k = 0
        for c in range(v.shape[0]):
            for _ in range(rep):
                out[k] = v[c]
                k += 1
    for k in range(p, out.shape[0]):  # the wrap: out[k] == out[k % p]
        out[k] = out[k - p]
    return out


@njit(**_NJ)
def _fold(ps, rep):
    """Per-column partial sums ``(nb, P)`` to per-channel ones ``(nb, P // rep)``."""
    if rep == 1:
        return ps
    nb, p = ps.shape
    out = np.zeros((nb, p // rep))
    for j in range(nb):
        for k in range(p):
            out[j, k // rep] += ps[j, k]
    return out


@njit(**_INL)
def _row_norm(x, r, has_r, mean, scale, shift, code, slope, rep):
    """The :func:`_fy` parameters for flat rows (per-channel values tiled, see :func:`_tiled`)."""
    return (_flat(x), _flat(r), has_r, _tiled(mean, x, rep), _tiled(scale, x, rep), _tiled(shift, x, rep), code,
            _as(x, slope), _as(x, 0))


@njit(**_INL)
def _row_gate(dy, x, r, has_r, mean, scale, shift, code, slope, rep):
    """The :func:`_fg` parameters for flat rows: ``dy`` and those of :func:`_row_norm`."""
    return (_flat(dy),) + _row_norm(x, r, has_r, mean, scale, shift, code, slope, rep)


@njit(**_JIT)
def _rows_moments(x, pilot, nb, psum, psq, rep):
    """Per block of rows: float64 per-column sums of ``x - pilot`` and ``(x - pilot)**2``."""
    M, P = x.shape
    gp = _row_gate(x, x, x, False, pilot, pilot, pilot, 0, 0.0, rep)
    q = pointers(gp)
    for bi in prange(nb):
        _rows_block_sums(q, True, P, bi * M // nb, (bi + 1) * M // nb, bi, psum, psq)
    keep(gp)  # the tiled pilot: q points into it


@njit(**_JIT)
def _act_apply_rows(x, r, has_r, mean, scale, shift, code, slope, y, stream, rep):
    """``y = act((x - mean) * scale + shift [+ r])`` on ``(M, P)`` rows."""
    M, P = x.shape
    nb = _eblocks(M, P)
    p = _row_norm(x, r, has_r, mean, scale, shift, code, slope, rep)
    yf = _flat(y)
    for bi in prange(nb):
        _y_rows(yf, bi * M // nb, (bi + 1) * M // nb, P, stream, p)


@njit(**_JIT)
def _act_bwd_reduce_rows(dy, x, r, has_r, mean, scale, shift, code, slope, nb, psum, pdot, rep):
    """Per block of rows: float64 per-column ``sum(g)`` and ``sum(g * (x - mean))``,
    ``g = dy * act'(z)``."""
    M, P = x.shape
    gp = _row_gate(dy, x, r, has_r, mean, scale, shift, code, slope, rep)
    for bi in prange(nb):
        _g_block_sums(gp, P, bi * M // nb, (bi + 1) * M // nb, bi, psum, pdot)


@njit(**_JIT)
def _act_bwd_elemt_rows(dy, x, r, has_r, mean, scale, shift, code, slope, ka, kb, kc,
                        need_dx, need_dr, dx, dr, stream, rep):
    """``dx = g * ka + (x - mean) * kb + kc`` and ``dr = g`` on ``(M, P)`` rows."""
    M, P = x.shape
    nb = _eblocks(M, P)
    gp = _row_gate(dy, x, r, has_r, mean, scale, shift, code, slope, rep)
    p = gp + (_tiled(ka, x, rep), _tiled(kb, x, rep), _tiled(kc, x, rep))
    dxf = _flat(dx)
    drf = _flat(dr)
    for bi in prange(nb):
        m1 = (bi + 1) * M // nb
        # with both outputs, _RBLK rows at a time: the second pass finds them in cache
        step = _RBLK if need_dx and need_dr else M
        for m0 in range(bi * M // nb, m1, step):
            if need_dx:
                _dx_rows(dxf, m0, min(m0 + step, m1), P, stream, p)
            if need_dr:
                _g_rows(drf, m0, min(m0 + step, m1), P, stream, gp)


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
    """Per channel ``(mr, scale, shift)``: ``mr`` = the mean rounded to ``x``'s dtype (the kernels
    subtract it in that dtype, exactly near the mean), ``scale = w * invstd``, and
    ``shift = b - (mean - mr) * scale`` so that ``(x - mr) * scale + shift`` is the normalization
    with the exact mean."""
    C = mean.shape[0]
    mr, scale, shift = np.empty(C), np.empty(C), np.empty(C)
    for c in range(C):
        m = np.float64(mean[c])
        rm = np.float64(_as(x, m))
        a = np.float64(invstd[c]) * np.float64(w[c])
        mr[c] = rm
        scale[c] = a
        # (not 0 * a: an infinite scale, eps = 0 and a zero variance, gives +-inf like torch, not NaN)
        shift[c] = np.float64(b[c]) - (m - rm) * a if m != rm else np.float64(b[c])
    return mr, scale, shift


@njit(**_NJ)
def _apply_planes(x, r, has_r, mean, invstd, w, b, code, slope, y, stream):
    mr, scale, shift = _coefficients(x, mean, invstd, w, b)
    _act_apply_planes(x, r, has_r, mr, scale, shift, code, slope, y, stream)


@njit(**_NJ)
def _apply_rows(x, r, has_r, mean, invstd, w, b, code, slope, y, stream, rep):
    mr, scale, shift = _coefficients(x, mean, invstd, w, b)
    _act_apply_rows(x, r, has_r, mr, scale, shift, code, slope, y, stream, rep)


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
        md = sd / cnt
        mean[c] = pilot[c] + md
        var[c] = max(sq / cnt - md * md, 0.0)
        far = far or md * md > 4.0 * var[c]
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
def _bwd_coefficients(psum, pdot, mean, invstd, mr, scale, cnt, train, kb, kc, sum_dy, sum_dot):
    """From the partial sums over ``mr``: ``sum_dy = sum(g)``, ``sum_dot = sum(g * xhat)`` and
    the input-gradient coefficients ``dx = g * scale + (x - mr) * kb + kc``."""
    for c in range(mr.shape[0]):
        s = 0.0
        t = 0.0
        for j in range(psum.shape[0]):
            s += psum[j, c]
            t += pdot[j, c]
        m = np.float64(mean[c])
        inv = np.float64(invstd[c])
        t -= (m - mr[c]) * s  # sum(g * (x - mean)) with the exact mean
        sum_dy[c] = s
        sum_dot[c] = t * inv
        if train:
            kb[c] = -scale[c] * inv * inv * t / cnt
            kc[c] = -scale[c] * s / cnt + kb[c] * (mr[c] - m)
        else:
            kb[c] = 0.0
            kc[c] = 0.0


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
    mr, scale, shift = _coefficients(x, mean, invstd, w, b)
    psum = np.empty((N, C))
    pdot = np.empty((N, C))
    _act_bwd_reduce_planes(dy, x, r, has_r, mr, scale, shift, code, slope, psum, pdot)
    kb, kc = np.empty(C), np.empty(C)
    _bwd_coefficients(psum, pdot, mean, invstd, mr, scale, N * L, train, kb, kc, sum_dy, sum_dot)
    if need_dx or need_dr:
        _act_bwd_elemt_planes(dy, x, r, has_r, mr, scale, shift, code, slope, scale, kb, kc, need_dx,
                              need_dr, dx, dr, stream)


@njit(**_NJ)
def _bwd_rows(dy, x, r, has_r, mean, invstd, w, b, code, slope, train, need_dx, need_dr, dx, dr,
              sum_dy, sum_dot, stream, nb, rep):
    """Backward on rows: block reductions, their merge, then the elementwise gradients."""
    M, P = x.shape
    C = P // rep
    mr, scale, shift = _coefficients(x, mean, invstd, w, b)
    psum = np.zeros((nb, P))
    pdot = np.zeros((nb, P))
    _act_bwd_reduce_rows(dy, x, r, has_r, mr, scale, shift, code, slope, nb, psum, pdot, rep)
    kb, kc = np.empty(C), np.empty(C)
    _bwd_coefficients(_fold(psum, rep), _fold(pdot, rep), mean, invstd, mr, scale, M * rep, train, kb, kc, sum_dy,
                      sum_dot)
    if need_dx or need_dr:
        _act_bwd_elemt_rows(dy, x, r, has_r, mr, scale, shift, code, slope, scale, kb, kc, need_dx,
                            need_dr, dx, dr, stream, rep)


# ========================================================== entries: tensors by address
#
# Python passes each tensor as its address (``Tensor.data_ptr()``) and the drivers see numpy
# arrays built over it here: after a large kernel has flushed the caches, ``Tensor.numpy()``
# and the reshapes around it cost tens of microseconds each in Python, ``data_ptr()`` a few.
# ``a``: one int64 array of the addresses followed by ``N, C, L`` (numba types an array in C; a
# tuple of ints and a dtype class cost ~12 us of Python typing per call); ``rep = 0``: planes
# ``(N, C, L)``, else rows ``(N * L / rep, C * rep)`` (see "rows" above); ``proto`` an empty array
# of the dtype of every tensor (input, outputs, per-channel vectors, statistics); address 0 =
# no such vector.


@njit(**_INL)
def _tensor(addr, shape, dt):
    return numba.carray(voidptr(addr), shape, dt)


@njit(**_INL)
def _channel(addr, c, dt, fill):
    """A per-channel vector, or ``fill`` everywhere for address 0 (no weight, no bias)."""
    if addr == 0:
        return np.full(c, fill, dt)
    return _tensor(addr, c, dt)


@njit(**_NJ)
def _train(a, proto, rep, has_r, eps, code, slope, momentum, update, skip, stream, fused, nb):
    """Training forward; ``a = (x, r, y, weight, bias, out, running_mean, running_var, N, C, L)``
    (see :func:`_finish` for ``out``, ``skip`` and the result; without ``update`` the running
    statistics' addresses are unused)."""
    dt = proto.dtype
    N, C, L = a[8], a[9], a[10]
    dims = (N, C, L)
    w, b = _channel(a[3], C, dt, 1.0), _channel(a[4], C, dt, 0.0)
    out = _tensor(a[5], (3, 1, C), dt)
    rm, rv = _tensor(a[6], C, dt), _tensor(a[7], C, dt)
    if rep:
        s = (N * L // rep, C * rep)
        x, r, y = _tensor(a[0], s, dt), _tensor(a[1], s, dt), _tensor(a[2], s, dt)
        return _train_rows(x, r, has_r, w, b, eps, code, slope, y, out, rm, rv, momentum, update, skip, stream, nb,
                           rep)
    else:
        x, r, y = _tensor(a[0], dims, dt), _tensor(a[1], dims, dt), _tensor(a[2], dims, dt)
        return _train_planes(x, r, has_r, w, b, eps, code, slope, y, out, rm, rv, momentum, update, skip, stream,
                             fused)


@njit(**_NJ)
def _apply(a, proto, rep, has_r, eps, code, slope, stream):
    """Normalization with given statistics; ``a = (x, r, y, mean, var, weight, bias, N, C, L)``
    (``invstd`` from ``var`` and ``eps`` by :func:`_inverse_std`)."""
    dt = proto.dtype
    N, C, L = a[7], a[8], a[9]
    dims = (N, C, L)
    mean, inv = _channel(a[3], C, dt, 0.0), _inverse_std(_channel(a[4], C, dt, 1.0), eps)
    w, b = _channel(a[5], C, dt, 1.0), _channel(a[6], C, dt, 0.0)
    if rep:
        s = (N * L // rep, C * rep)
        x, r, y = _tensor(a[0], s, dt), _tensor(a[1], s, dt), _tensor(a[2], s, dt)
        _apply_rows(x, r, has_r, mean, inv, w, b, code, slope, y, stream, rep)
    else:
        x, r, y = _tensor(a[0], dims, dt), _tensor(a[1], dims, dt), _tensor(a[2], dims, dt)
        _apply_planes(x, r, has_r, mean, inv, w, b, code, slope, y, stream)


@njit(**_NJ)
def _bwd(a, proto, rep, has_r, code, slope, eps, train, need_dx, need_dr, stream, fused, nb):
    """Backward; ``a = (dy, x, r, dx, dr, mean, var, weight, bias, sums, N, C, L)``: ``var`` the
    training forward's batch variance (``train``) or the given one; ``sums`` = ``(2, C)``
    (``sum(g)``, ``sum(g * xhat)``); absent outputs' addresses are unused."""
    dt = proto.dtype
    N, C, L = a[10], a[11], a[12]
    dims = (N, C, L)
    mean, inv = _channel(a[5], C, dt, 0.0), _inverse_std(_channel(a[6], C, dt, 1.0), eps)
    w, b = _channel(a[7], C, dt, 1.0), _channel(a[8], C, dt, 0.0)
    sums = _tensor(a[9], (2, C), dt)
    if rep:
        s = (N * L // rep, C * rep)
        dy, x, r = _tensor(a[0], s, dt), _tensor(a[1], s, dt), _tensor(a[2], s, dt)
        dx, dr = _tensor(a[3], s, dt), _tensor(a[4], s, dt)
        _bwd_rows(dy, x, r, has_r, mean, inv, w, b, code, slope, train, need_dx, need_dr, dx, dr, sums[0], sums[1],
                  stream, nb, rep)
    else:
        dy, x, r = _tensor(a[0], dims, dt), _tensor(a[1], dims, dt), _tensor(a[2], dims, dt)
        dx, dr = _tensor(a[3], dims, dt), _tensor(a[4], dims, dt)
        _bwd_planes(dy, x, r, has_r, mean, inv, w, b, code, slope, train, need_dx, need_dr, dx, dr, sums[0],
                    sums[1], stream, fused)


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


# The wrappers below run once per call, often right after a large kernel or convolution has
# flushed the caches, where each torch call costs tens of microseconds: they convert the small
# per-channel tensors with numpy and make as few torch calls as they can.

_MAX_THREADS = numba.config.NUMBA_NUM_THREADS
_tls = threading.local()  # numba's thread count is per calling thread


def _threads(numel: int = 1 << 30) -> int:
    """Set numba's thread count for this call: torch's, or 1 below :data:`PARALLEL_MIN` elements."""
    t = 1 if numel < PARALLEL_MIN else max(1, min(torch.get_num_threads(), _MAX_THREADS))
    if getattr(_tls, "threads", 0) != t:
        numba.set_num_threads(t)
        _tls.threads = t
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


def _prepare(t: Tensor, x: Tensor, layout: str) -> Tensor:
    """``t`` (the input, a gradient or a residual, shaped like ``x``) in the memory layout the
    kernels read for ``x``: contiguous, or channels_last when ``x`` is channels_last."""
    if layout == "planes" or x.dim() == 2 or x.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=_channels_last_fmt(x))  # type: ignore[arg-type]


_NP = {torch.float32: np.float32, torch.float64: np.float64}
_PROTO = {t: np.empty(0, d) for t, d in _NP.items()}  # the entries take the dtype from an array


def _args(*values: int) -> np.ndarray:
    """The entries' ``a``: addresses and sizes as one int64 array."""
    return np.array(values, dtype=np.int64)


def _dims(x: Tensor) -> tuple[int, int, int]:
    """``(N, C, L)``: the kernels see planes ``(N, C, L)`` or rows (see :func:`_view`)."""
    n, c = x.shape[0], x.shape[1]
    return n, c, (x.numel() // (n * c) if n else 0)


def _view(x: Tensor, layout: str, threads: int = 1) -> tuple[tuple[int, int, int], int, int]:
    """``(dims, rep, nb)`` of the prepared ``x``: :func:`_dims`; ``rep = 0`` for the planes
    kernels, else the rows kernels on ``(N * L / rep, C * rep)`` -- channels_last and 2D with
    ``rep = 1``, contiguous input with planes shorter than :data:`ROWS_MAX_PLANE` with
    ``rep = L``; ``nb`` the rows reductions' blocks."""
    n, c, l = dims = _dims(x)
    if layout == "rows":
        rep = 1
    else:
        rep = l if l < ROWS_MAX_PLANE and c * l <= ROWS_MAX_COLUMNS else 0
    return dims, rep, (_row_blocks(n * l // rep, threads) if rep else 1)


def _cvec(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-channel tensor contiguous in ``x``'s dtype (``None`` stays ``None``): one dtype for
    every tensor a kernel sees, so each compiles once per input dtype; for float32/float64 input
    it is the statistics' dtype, which the reference rounds parameters to as well."""
    if t is None or (t.dtype == x.dtype and t.is_contiguous()):
        return t
    return t.to(x.dtype).contiguous()


def _addr(t: Tensor | None, absent: int = 0) -> int:
    return absent if t is None else t.data_ptr()


def _stream(x: Tensor, dims: tuple[int, int, int], rep: int, backward: bool = False) -> bool:
    """Whether the outputs (each the size of ``x``; ``dims``, ``rep`` from :func:`_view`) go out
    with non-temporal stores: from :data:`STREAM_MIN_BYTES` (:data:`STREAM_MIN_BYTES_BACKWARD`)
    on, and on the planes kernels (``rep == 0``) for planes of whole cache lines or of at least
    :data:`STREAM_MIN_PLANE_BYTES`."""
    size = x.element_size()
    if x.numel() * size < (STREAM_MIN_BYTES_BACKWARD if backward else STREAM_MIN_BYTES):
        return False
    plane = dims[2] * size
    return rep != 0 or plane % LINE_BYTES == 0 or plane >= STREAM_MIN_PLANE_BYTES


def _fused_channels(c: int, threads: int) -> bool:
    """Whether one-channel-per-thread keeps every thread busy (else split across the batch)."""
    return threads == 1 or c % threads == 0 or c >= 8 * threads


# --------------------------------------------------------- plain batch norm: the identity activation


def forward_train(x, weight, bias, mask, eps, vbs, running=None):
    """Training forward on the whole batch (one group): ``(y, mean, var, count)``."""
    return forward_train_act(x, weight, bias, None, mask, eps, vbs, "identity", 0.0, running)


def forward_apply(x, mean, var, eps, weight, bias):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` with given ``(C,)`` statistics."""
    return forward_apply_act(x, mean, var, eps, weight, bias, None, "identity", 0.0)


def backward_train(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad=True):
    """Closed-form training backward: ``(dx, dweight, dbias)`` (see the reference backend)."""
    return _backward_act(dy, x, None, mean, var, eps, weight, None, "identity", 0.0, True, need_input_grad,
                         False)[:3]


def backward_apply(dy, x, mean, var, eps, weight, need_input_grad=True):
    """Backward with constant ``(C,)`` statistics: ``(dx, dweight, dbias)``."""
    return _backward_act(dy, x, None, mean, var, eps, weight, None, "identity", 0.0, False, need_input_grad,
                         False)[:3]


# ------------------------------------------------------ plain batch norm: the layers' lean calls
#
# The layers' common training call (no mask, one group, no activation, no residual) with the
# fewest Python steps: the per-shape decisions are cached (:func:`_plan`), the statistics stay in
# the numpy array the kernel wrote (the backward reads it by address), and the backward returns
# the parameter gradients as views of one array. Same kernels and arguments as above.

_PLANS: dict[tuple, tuple] = {}


def _plan(x: Tensor, threads: int) -> tuple:
    """``(prepared x, dims, rep, nb, stream, stream_backward, fused)`` for ``x``, cached per shape,
    strides, dtype and thread count."""
    key = (x.shape, x.stride(), x.dtype, threads)
    plan = _PLANS.get(key)
    if plan is None:
        layout = _layout(x)
        xp = _prepare(x, x, layout)
        dims, rep, nb = _view(xp, layout, threads)
        plan = (xp is x, layout, dims, rep, nb, _stream(xp, dims, rep), _stream(xp, dims, rep, backward=True),
                _fused_channels(dims[1], threads))
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    same, layout, *rest = plan
    return (x if same else _prepare(x, x, layout), *rest)


def train_lean(x, weight, bias, eps, running):
    """:func:`forward_train` of the whole batch, plain batch norm: ``(y, stats)`` with ``stats``
    the ``(3, 1, C)`` numpy array of mean, variance and count (:func:`_finish`) that
    :func:`backward_lean` takes; ``running`` (or ``None``) as :func:`forward_train_act`'s."""
    threads = _threads(x.numel())
    x, dims, rep, nb, stream, _, fused = _plan(x, threads)
    y = torch.empty_like(x)
    acc = acc_dtype(x.dtype)
    out = np.empty((3, 1, dims[1]), dtype=_NP[acc])
    w, b = _cvec(weight, x), _cvec(bias, x)
    update = ref.kernel_can_update(running, x.device, acc, checks_finite=True)
    o = out.ctypes.data
    rm, rv = (running.mean.data_ptr(), running.var.data_ptr()) if update else (o, o)  # type: ignore[union-attr]
    xa = x.data_ptr()
    ok = _train(_args(xa, xa, y.data_ptr(), _addr(w), _addr(b), o, rm, rv, *dims), _PROTO[x.dtype], rep, False,
                float(eps), 0, 0.0, float(running.momentum) if update else 0.0, update,  # type: ignore[union-attr]
                update and running.skip_nonfinite, stream, fused, nb)  # type: ignore[union-attr]
    if update:
        running.accepted = ok  # type: ignore[union-attr]
        if ok:
            torch.autograd.graph.increment_version((running.mean, running.var))  # type: ignore[union-attr]
    elif running is not None:
        mean, var, _ = lean_stats(out)
        ref.update_running(running, mean, var, dims[0] * dims[2])
    return y, out


def lean_stats(stats: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, count)`` as :func:`forward_train` returns them, from :func:`train_lean`'s array."""
    return torch.from_numpy(stats[0]), torch.from_numpy(stats[1]), torch.from_numpy(stats[2, 0, :1])


def backward_lean(dy, x, stats, eps, weight, need_input_grad):
    """:func:`backward_train` from :func:`train_lean`'s statistics: ``(dx or None, dweight, dbias)``."""
    threads = _threads(x.numel())
    x, dims, rep, nb, _, stream, fused = _plan(x, threads)
    dy = _prepare(dy, x, "rows" if rep else "planes") if dy.stride() != x.stride() else dy
    dx = torch.empty_like(x) if need_input_grad else None
    sums = np.empty((2, dims[1]), dtype=stats.dtype)  # sum(g), sum(g * xhat)
    w = _cvec(weight, x)
    xa = x.data_ptr()
    o = stats.ctypes.data
    _bwd(_args(dy.data_ptr(), xa, xa, _addr(dx, xa), xa, o, o + stats.strides[0], _addr(w), 0, sums.ctypes.data,
               *dims), _PROTO[x.dtype], rep, False, 0, 0.0, float(eps), True, bool(need_input_grad), False, stream,
         fused, nb)
    return dx, torch.from_numpy(sums[1]), torch.from_numpy(sums[0])  # (own storages, as _backward_act's)


# ------------------------------------------------------------------ fused activation wrappers

_ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}


def _residual(r: Tensor | None, x: Tensor, layout: str) -> Tensor | None:
    """The residual in ``x``'s dtype and the kernels' layout."""
    return None if r is None else _prepare(r.to(x.dtype), x, layout)


def forward_train_act(x, weight, bias, residual, mask, eps, vbs, act, slope, running=None):
    """``y = act(bn(x) [+ residual])`` in training mode: ``(y, mean, var, count)``; ``running``
    (:class:`~batchnorm.kernels.reference.Running`) is moved by the same call."""
    threads = _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, x, layout)
    dims, rep, nb = _view(x, layout, threads)
    y = torch.empty_like(x)
    r = _residual(residual, x, layout)
    acc = acc_dtype(x.dtype)
    # mean, var, count (see _finish) in one buffer; separate tensors, as a custom op's outputs
    # must not share storage
    out = np.empty((3, 1, dims[1]), dtype=_NP[acc])
    mean, var, count = torch.from_numpy(out[0]), torch.from_numpy(out[1]), torch.from_numpy(out[2, 0, :1])
    w, b = _cvec(weight, x), _cvec(bias, x)
    update = ref.kernel_can_update(running, x.device, acc, checks_finite=True)
    o = mean.data_ptr()
    rm, rv = (running.mean.data_ptr(), running.var.data_ptr()) if update else (o, o)  # type: ignore[union-attr]
    xa = x.data_ptr()
    ok = _train(_args(xa, _addr(r, xa), y.data_ptr(), _addr(w), _addr(b), o, rm, rv, *dims), _PROTO[x.dtype], rep,
                r is not None, float(eps), _ACT_CODES[act], float(slope),
                float(running.momentum) if update else 0.0, update,  # type: ignore[union-attr]
                update and running.skip_nonfinite, _stream(x, dims, rep), _fused_channels(dims[1], threads), nb)  # type: ignore[union-attr]
    if update:
        running.accepted = ok  # type: ignore[union-attr]
    ref.finish_running(running, update, mean, var, dims[0] * dims[2])
    return y, mean, var, count


def forward_apply_act(x, mean, var, eps, weight, bias, residual, act, slope):
    """``y = act(bn(x; mean, var) [+ residual])`` with given ``(C,)`` statistics."""
    _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, x, layout)
    y = torch.empty_like(x)
    r = _residual(residual, x, layout)
    vecs = _cvec(mean, x), _cvec(var, x), _cvec(weight, x), _cvec(bias, x)
    xa = x.data_ptr()
    dims, rep, _ = _view(x, layout)
    _apply(_args(xa, _addr(r, xa), y.data_ptr(), *[_addr(v) for v in vecs], *dims), _PROTO[x.dtype], rep,
           r is not None, float(eps), _ACT_CODES[act], float(slope), _stream(x, dims, rep))
    return y


def _backward_act(dy, x, residual, mean, var, eps, weight, bias, act, slope, train, need_dx, need_dr):
    """Both backwards: ``(mean, var)`` the training forward's batch statistics (``train``) or the
    given ones."""
    threads = _threads(x.numel())
    layout = _layout(x)
    x = _prepare(x, x, layout)
    dy = _prepare(dy, x, layout)
    dims, rep, nb = _view(x, layout, threads)
    r = _residual(residual, x, layout)
    dx = torch.empty_like(x) if need_dx else None
    dr = torch.empty_like(x) if need_dr else None
    sums = np.empty((2, dims[1]), dtype=_NP[acc_dtype(x.dtype)])  # sum(g), sum(g * xhat)
    sum_dy, sum_dot = torch.from_numpy(sums[0]), torch.from_numpy(sums[1])  # (not sharing a storage)
    vecs = _cvec(mean, x), _cvec(var, x), _cvec(weight, x), _cvec(bias, x)
    xa = x.data_ptr()
    _bwd(_args(dy.data_ptr(), xa, _addr(r, xa), _addr(dx, xa), _addr(dr, xa), *[_addr(v) for v in vecs],
               sum_dy.data_ptr(), *dims), _PROTO[x.dtype], rep, r is not None, _ACT_CODES[act], float(slope),
         float(eps), bool(train), bool(need_dx), bool(need_dr), _stream(x, dims, rep, backward=True),
         _fused_channels(dims[1], threads), nb)
    return dx, sum_dot, sum_dy, dr


def backward_train_act(dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    """Backward of :func:`forward_train_act` from its statistics: ``(dx, dweight, dbias, dresidual)``."""
    return _backward_act(dy, x, residual, mean, var, eps, weight, bias, act, slope, True,
                         need_input_grad, need_residual_grad)


def backward_apply_act(dy, x, residual, mean, var, eps, weight, bias, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    """Backward of :func:`forward_apply_act` (statistics constant): ``(dx, dweight, dbias, dresidual)``."""
    return _backward_act(dy, x, residual, mean, var, eps, weight, bias, act, slope, False,
                         need_input_grad, need_residual_grad)


_DTYPES = (torch.float32, torch.float64)
_OPS = frozenset({"forward_train", "forward_apply", "backward_train", "backward_apply", "forward_train_act",
                  "forward_apply_act", "backward_train_act", "backward_apply_act"})

# ---------------------------------------------------------------- compiled without waiting

#: The compiled driver each op calls.
_ENTRY_OF = {"forward_train": "_train", "forward_train_act": "_train", "forward_apply": "_apply",
             "forward_apply_act": "_apply", "backward_train": "_bwd", "backward_apply": "_bwd",
             "backward_train_act": "_bwd", "backward_apply_act": "_bwd"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def _sample_args(entry: str, dtype: str) -> tuple:
    """Arguments of the Python types the wrappers above pass to ``entry`` (numba types each
    call by them, so these give the one signature per entry and dtype that the wrappers use)."""
    a, proto = _args(0), _PROTO[getattr(torch, dtype)]
    if entry == "_train":
        return a, proto, 0, False, 1e-5, 0, 0.0, 0.0, False, False, False, False, 1
    if entry == "_apply":
        return a, proto, 0, False, 1e-5, 0, 0.0, False
    return a, proto, 0, False, 0, 0.0, 1e-5, True, True, False, False, False, 1


def _signature(entry: str, dtype: str) -> tuple:
    disp = _ENTRIES[entry]
    return tuple(disp.typeof_pyval(v) for v in _sample_args(entry, dtype))


_ENTRIES = {"_train": _train, "_bwd": _bwd, "_apply": _apply}
#: The kernels of this backend, got without blocking a call (see :mod:`batchnorm.kernels._jit`).
KERNELS = _jit.Kernels(__name__, _ENTRIES, _signature,
                       [Path(__file__), Path(__file__).with_name("_simd.py")])


def prepared(op: str, x: Tensor, wait: bool = False) -> bool:
    """Whether the compiled driver of ``op`` for ``x``'s dtype is loaded in this process; if not,
    it is being got in the background (see :mod:`batchnorm.kernels._jit`), or, with ``wait``,
    waited for. The dispatcher asks this after :func:`supports` said yes."""
    entry = _ENTRY_OF[op]
    dtype = _DTYPE_NAMES[x.dtype]
    return (entry, dtype) in KERNELS._ready or KERNELS.ready(entry, dtype, wait)


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """Dense float32/float64 CPU tensors (of at least :data:`MIN_NUMEL` elements), no mask, one group."""
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
