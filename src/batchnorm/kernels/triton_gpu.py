"""GPU backend: batch norm (and the fused activation/residual ops) as Triton kernels.

Registered when a CUDA device is present, or on the CPU when both ``TRITON_INTERPRET=1`` and
``BATCHNORM_TRITON=1`` are set (Triton's interpreter runs the kernels on CPU tensors; the tests use
it on tiny shapes). Otherwise importing this module raises ``ImportError`` and the dispatcher
skips it.

A dense input (contiguous or channels_last; anything else is copied to contiguous first) is seen
in one of two geometries, like the CPU backend's:

* *planes* (NCHW, ``L > 1``): ``N * C`` contiguous planes of ``L`` values; tiles are
  ``[planes, positions in a plane]``, so every load runs along contiguous memory;
* *rows* (channels_last, or ``(N, C)``): ``N * L`` rows of ``C`` contiguous values; tiles are
  ``[rows, channels]``.

Four kernels cover every op, float32/float16/bfloat16 with float32 statistics (merged in
float64):

* ``_stats``: per-chunk partial sums on a grid that does not depend on ``C``: each channel's
  ``N * L`` positions are split into ``G`` chunks chosen from the SM count, so ``C = 64`` still
  gives a 132-SM H100/H200 about a thousand programs. Forward: ``sum(x - k)``, ``sum((x - k)^2)``
  with ``k`` the channel's first value (a shift that keeps the one-pass variance free of
  cancellation); backward: ``sum(g)``, ``sum(g * (x - mean))`` with ``g = dy * act'(z)``
  recomputed from ``x`` (and the residual).
* ``_finish_fwd`` / ``_finish_bwd``: one small program per block of channels merges the ``(G, C)``
  partials in float64 and writes the op's per-channel outputs: mean, variance, ``1/std`` and the
  count, and moves the running statistics in place (``running=``); or ``dweight``, ``dbias``
  and the backward's two per-channel coefficients.
* ``_apply``: ``y = act((x - mean) * invstd * weight + bias [+ residual])``, or, with
  ``BACKWARD``, ``dx = g * invstd * weight + (x - mean) * kb + kc`` and ``dresidual = g``. It
  walks the tensor last tile first, so the tiles the statistics pass read last are still in L2.

A training forward is three launches (statistics, finish, apply), a backward three, an
inference forward one; nothing else runs on the GPU.

Between the statistics and the elementwise pass the input leaves L2 when the tensor is larger
than L2, so those three launches read it twice from memory. ``_pipelined`` (planes only, opt-in
with ``BATCHNORM_TRITON_PIPELINE=1`` or ``_PIPELINE``, until a GPU has measured it) runs a whole
training forward or backward as one launch over groups of channels each small enough to stay in
L2: the group's statistics chunks, then, when the last of them has merged the group's sums, its
elementwise tiles, while the next group is being read. Programs take tickets in the order they
start and only wait for lower tickets, so no program waits for one that has not started.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("BATCHNORM_TRITON") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    raise ImportError("triton backend: no CUDA device (set TRITON_INTERPRET=1 BATCHNORM_TRITON=1 to interpret)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import reference as ref  # noqa: E402
from . import register_backend  # noqa: E402

name = "triton"

_ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPS = frozenset({"forward_train", "forward_apply", "backward_train", "backward_apply", "forward_train_act",
                  "forward_apply_act", "backward_train_act", "backward_apply_act"})


@triton.jit
def _act(z, slope, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _dact(z, slope, ACT: tl.constexpr):
    if ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(z > 0, 1.0, slope)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def _params(c, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            CM: tl.constexpr):
    """Per-channel ``(mean, invstd * weight, bias)`` in float32 for channel index(es) ``c``
    (``CM=".cg"``: read from L2, for values another program of the same launch wrote)."""
    m = tl.load(mean_ptr + c, mask=cmask, other=0.0, cache_modifier=CM).to(tl.float32)
    a = tl.load(invstd_ptr + c, mask=cmask, other=0.0, cache_modifier=CM).to(tl.float32)
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = m * 0.0
    return m, a, b


@triton.jit
def _grad_out(dy, d, r, a, b, slope, HAS_R: tl.constexpr, ACT: tl.constexpr):
    """``g = dy * act'(z)`` with ``z = d * a + b [+ r]`` recomputed (``dy`` itself for the identity)."""
    if ACT != 0:
        z = d * a + b
        if HAS_R:
            z += r
        dy = dy * _dact(z, slope, ACT)
    return dy


@triton.jit
def _shift(x_ptr, pilot_off, c, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr,
           BACKWARD: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """``(k, a, b)`` for :func:`_accumulate`: backward the channel's mean, ``invstd * weight``, bias;
    forward the pilot (the channel's first value, at ``pilot_off``) and placeholders."""
    if BACKWARD:
        k, a, b = _params(c, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B, "")
    else:
        k = tl.load(x_ptr + pilot_off, mask=cmask, other=0.0).to(tl.float32)
        a = k
        b = k
    return k, a, b


@triton.jit
def _accumulate(x_ptr, dy_ptr, r_ptr, off, msk, k, a, b, slope, acc1, acc2,
                BACKWARD: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr, EVICT: tl.constexpr):
    """One tile's contribution: forward ``x - k`` and its square (``k`` the pilot); backward
    ``g`` and ``g * (x - k)`` (``k`` the mean, ``a``/``b`` scale and shift for ``act'``)."""
    d = tl.load(x_ptr + off, mask=msk, other=0.0, eviction_policy=EVICT).to(tl.float32) - k
    if BACKWARD:
        r = 0.0
        if HAS_R:
            r = tl.load(r_ptr + off, mask=msk, other=0.0, eviction_policy=EVICT).to(tl.float32)
        g = tl.load(dy_ptr + off, mask=msk, other=0.0, eviction_policy=EVICT).to(tl.float32)
        g = tl.where(msk, _grad_out(g, d, r, a, b, slope, HAS_R, ACT), 0.0)
        acc1 += g
        acc2 += g * d
    else:
        d = tl.where(msk, d, 0.0)
        acc1 += d
        acc2 += d * d
    return acc1, acc2


@triton.jit
def _plane_chunk(x_ptr, dy_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr, c, g,
                 N, C, L, NB, LSEG, GL, G, slope, BACKWARD: tl.constexpr, HAS_R: tl.constexpr,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_Q: tl.constexpr, EVICT: tl.constexpr):
    """Partial sums of chunk ``g`` of channel ``c`` on planes: samples ``[gn * NB, gn * NB + NB)``
    and positions ``[gl * LSEG, gl * LSEG + LSEG)`` (``gn, gl = divmod(g, GL)``) in
    ``[BLOCK_P samples, BLOCK_Q positions]`` tiles, into ``part[0, g, c]`` and ``part[1, g, c]``."""
    n_lo = (g // GL) * NB
    n_hi = tl.minimum(n_lo + NB, N)
    l_lo = (g % GL) * LSEG
    l_hi = tl.minimum(l_lo + LSEG, L)
    ns = tl.arange(0, BLOCK_P)
    ls = tl.arange(0, BLOCK_Q)
    k, a, b = _shift(x_ptr, c * L, c, c < C, mean_ptr, invstd_ptr, w_ptr, b_ptr, BACKWARD, HAS_W, HAS_B)
    acc1 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_P):
        n = n0 + ns
        base = (n.to(tl.int64) * C + c) * L
        for l0 in range(l_lo, l_hi, BLOCK_Q):
            pos = l0 + ls
            msk = (n < n_hi)[:, None] & (pos < l_hi)[None, :]
            off = base[:, None] + pos[None, :]
            acc1, acc2 = _accumulate(x_ptr, dy_ptr, r_ptr, off, msk, k, a, b, slope, acc1, acc2, BACKWARD,
                                     HAS_R, ACT, EVICT)
    tl.store(part_ptr + g * C + c, tl.sum(tl.sum(acc1, 1), 0))
    tl.store(part_ptr + (G + g) * C + c, tl.sum(tl.sum(acc2, 1), 0))


@triton.jit
def _stats(x_ptr, dy_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
           N, C, L, NB, LSEG, GL, G, slope,
           ROWS: tl.constexpr, BACKWARD: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr,
           HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Partial sums of one chunk of positions: ``part[0, g, c]``, ``part[1, g, c]``.

    Planes: program ``(g, c)`` is :func:`_plane_chunk`. Rows: program ``(g, channel block)``
    covers rows ``[g * NB, g * NB + NB)`` in ``[BLOCK_P rows, BLOCK_Q channels]`` tiles.
    """
    pid = tl.program_id(0)
    if ROWS:
        nblk = tl.cdiv(C, BLOCK_Q)
        g = pid // nblk
        cs = (pid % nblk) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        cmask = cs < C
        lo = g * NB
        hi = tl.minimum(lo + NB, N * L)
        ps = tl.arange(0, BLOCK_P)
        k, a, b = _shift(x_ptr, cs, cs, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, BACKWARD, HAS_W, HAS_B)
        acc1 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_P):
            rows = start + ps
            msk = (rows < hi)[:, None] & cmask[None, :]
            off = rows.to(tl.int64)[:, None] * C + cs[None, :]
            acc1, acc2 = _accumulate(x_ptr, dy_ptr, r_ptr, off, msk, k[None, :], a[None, :], b[None, :], slope,
                                     acc1, acc2, BACKWARD, HAS_R, ACT, "")
        tl.store(part_ptr + g * C + cs, tl.sum(acc1, 0), mask=cmask)
        tl.store(part_ptr + (G + g) * C + cs, tl.sum(acc2, 0), mask=cmask)
    else:
        _plane_chunk(x_ptr, dy_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr, pid % C, pid // C,
                     N, C, L, NB, LSEG, GL, G, slope, BACKWARD, HAS_R, HAS_W, HAS_B, ACT, BLOCK_P, BLOCK_Q, "")


@triton.jit
def _merge(part_ptr, G, C, cs, cmask, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, CM: tl.constexpr):
    """Float64 sums over the ``G`` chunks of ``part[0]`` and ``part[1]`` for channels ``cs``
    (``[BLOCK_G, channels]`` tiles: a thousand chunks take 16 steps, not a thousand)."""
    s = tl.zeros([BLOCK_G, BLOCK], dtype=tl.float64)
    q = tl.zeros([BLOCK_G, BLOCK], dtype=tl.float64)
    gs = tl.arange(0, BLOCK_G)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + gs
        msk = (g < G)[:, None] & cmask[None, :]
        off = g[:, None] * C + cs[None, :]
        s += tl.load(part_ptr + off, mask=msk, other=0.0, cache_modifier=CM).to(tl.float64)
        q += tl.load(part_ptr + G * C + off, mask=msk, other=0.0, cache_modifier=CM).to(tl.float64)
    return tl.sum(s, 0), tl.sum(q, 0)


@triton.jit
def _fwd_channels(part_ptr, x_ptr, mean_ptr, var_ptr, invstd_ptr, count_ptr, rm_ptr, rv_ptr, cs, cmask, G, C,
                  k_stride, count, eps, momentum, unbias, UPDATE: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_G: tl.constexpr, CM: tl.constexpr):
    """Mean, biased variance, ``1/sqrt(var + eps)`` (and the running statistics) of channels ``cs``."""
    s, q = _merge(part_ptr, G, C, cs, cmask, BLOCK_G, BLOCK, CM)
    k = tl.load(x_ptr + cs * k_stride, mask=cmask, other=0.0).to(tl.float64)
    md = s / count
    var = tl.maximum(q / count - md * md, 0.0)
    mean = k + md
    tl.store(mean_ptr + cs, mean.to(tl.float32), mask=cmask)
    tl.store(var_ptr + cs, var.to(tl.float32), mask=cmask)
    tl.store(invstd_ptr + cs, (1.0 / tl.sqrt(var + eps)).to(tl.float32), mask=cmask)
    tl.store(count_ptr + cs * 0, (s * 0.0 + count).to(tl.float32), mask=cs == 0)
    if UPDATE:  # torch's lerp_ of the eager update, in float32
        rm = tl.load(rm_ptr + cs, mask=cmask, other=0.0)
        rv = tl.load(rv_ptr + cs, mask=cmask, other=0.0)
        tl.store(rm_ptr + cs, rm + momentum * (mean.to(tl.float32) - rm), mask=cmask)
        tl.store(rv_ptr + cs, rv + momentum * ((var.to(tl.float32) * unbias) - rv), mask=cmask)


@triton.jit
def _bwd_channels(part_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, k_ptr, cs, cmask, G, C, count,
                  TRAIN: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr,
                  CM: tl.constexpr):
    """``dweight = sum(g * xhat)``, ``dbias = sum(g)`` of channels ``cs``; training: ``kb``, ``kc`` of ``dx``."""
    s, t = _merge(part_ptr, G, C, cs, cmask, BLOCK_G, BLOCK, CM)
    inv = tl.load(invstd_ptr + cs, mask=cmask, other=0.0).to(tl.float64)
    tl.store(dw_ptr + cs, (t * inv).to(tl.float32), mask=cmask)
    tl.store(db_ptr + cs, s.to(tl.float32), mask=cmask)
    if TRAIN:
        a = inv
        if HAS_W:
            a = a * tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float64)
        tl.store(k_ptr + cs, (-a * inv * inv * t / count).to(tl.float32), mask=cmask)
        tl.store(k_ptr + C + cs, (-a * s / count).to(tl.float32), mask=cmask)


@triton.jit
def _finish_fwd(part_ptr, x_ptr, mean_ptr, var_ptr, invstd_ptr, count_ptr, rm_ptr, rv_ptr, G, C, k_stride,
                count, eps, momentum, unbias, UPDATE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
    """:func:`_fwd_channels` for one block of ``BLOCK`` channels per program."""
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _fwd_channels(part_ptr, x_ptr, mean_ptr, var_ptr, invstd_ptr, count_ptr, rm_ptr, rv_ptr, cs, cs < C, G, C,
                  k_stride, count, eps, momentum, unbias, UPDATE, BLOCK, BLOCK_G, "")


@triton.jit
def _finish_bwd(part_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, k_ptr, G, C, count,
                TRAIN: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
    """:func:`_bwd_channels` for one block of ``BLOCK`` channels per program."""
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _bwd_channels(part_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, k_ptr, cs, cs < C, G, C, count, TRAIN, HAS_W,
                  BLOCK, BLOCK_G, "")


@triton.jit
def _tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, off, msk, m, a, b, kb, kc, slope,
          BACKWARD: tl.constexpr, TRAIN: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
          NEED_DX: tl.constexpr, NEED_DR: tl.constexpr, EVICT: tl.constexpr):
    """The elementwise formulas on one tile (``EVICT``: L2 policy of its loads and stores)."""
    d = tl.load(x_ptr + off, mask=msk, other=0.0, eviction_policy=EVICT).to(tl.float32) - m
    r = 0.0
    if HAS_R:
        r = tl.load(r_ptr + off, mask=msk, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if BACKWARD:
        dy = tl.load(dy_ptr + off, mask=msk, other=0.0, eviction_policy=EVICT).to(tl.float32)
        g = _grad_out(dy, d, r, a, b, slope, HAS_R, ACT)
        if NEED_DX:
            dx = g * a
            if TRAIN:
                dx += d * kb + kc
            tl.store(y_ptr + off, dx.to(y_ptr.dtype.element_ty), mask=msk, eviction_policy=EVICT)
        if NEED_DR:
            tl.store(dr_ptr + off, g.to(dr_ptr.dtype.element_ty), mask=msk, eviction_policy=EVICT)
    else:
        z = d * a + b
        if HAS_R:
            z += r
        tl.store(y_ptr + off, _act(z, slope, ACT).to(y_ptr.dtype.element_ty), mask=msk, eviction_policy=EVICT)


@triton.jit
def _plane_tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, k_ptr, n, c, pmask, pos,
                C, L, slope, BACKWARD: tl.constexpr, TRAIN: tl.constexpr, HAS_R: tl.constexpr,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr,
                NEED_DR: tl.constexpr, CM: tl.constexpr, EVICT: tl.constexpr):
    """The elementwise pass on planes ``(n, c)`` (vectors, ``pmask`` the valid ones) at positions ``pos``."""
    m, a, b = _params(c, pmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B, CM)
    kb = 0.0
    kc = 0.0
    if TRAIN:
        kb = tl.load(k_ptr + c, mask=pmask, other=0.0, cache_modifier=CM)[:, None]
        kc = tl.load(k_ptr + C + c, mask=pmask, other=0.0, cache_modifier=CM)[:, None]
    off = (n.to(tl.int64) * C + c)[:, None] * L + pos[None, :]
    msk = pmask[:, None] & (pos < L)[None, :]
    _tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, off, msk, m[:, None], a[:, None], b[:, None], kb, kc, slope,
          BACKWARD, TRAIN, HAS_R, ACT, NEED_DX, NEED_DR, EVICT)


@triton.jit
def _apply(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, k_ptr, N, C, L, slope,
           ROWS: tl.constexpr, BACKWARD: tl.constexpr, TRAIN: tl.constexpr, HAS_R: tl.constexpr,
           HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr,
           NEED_DR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The elementwise pass (forward: ``y``; backward: ``dx`` into ``y_ptr`` and ``dresidual``),
    one ``[BLOCK_P, BLOCK_Q]`` tile (rows x channels, or planes x positions) per program, the
    programs taken last tile first."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    if ROWS:
        nblk = tl.cdiv(C, BLOCK_Q)
        rows = (pid // nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
        cs = (pid % nblk) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        cmask = cs < C
        m, a, b = _params(cs, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B, "")
        kb = 0.0
        kc = 0.0
        if TRAIN:
            kb = tl.load(k_ptr + cs, mask=cmask, other=0.0)[None, :]
            kc = tl.load(k_ptr + C + cs, mask=cmask, other=0.0)[None, :]
        off = rows.to(tl.int64)[:, None] * C + cs[None, :]
        msk = (rows < N * L)[:, None] & cmask[None, :]
        _tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, off, msk, m[None, :], a[None, :], b[None, :], kb, kc, slope,
              BACKWARD, TRAIN, HAS_R, ACT, NEED_DX, NEED_DR, "")
    else:
        nblk = tl.cdiv(L, BLOCK_Q)
        planes = (pid // nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
        pos = (pid % nblk) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        _plane_tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, k_ptr, planes // C,
                    planes % C, planes < N * C, pos, C, L, slope, BACKWARD, TRAIN, HAS_R, HAS_W, HAS_B, ACT,
                    NEED_DX, NEED_DR, "", "")


@triton.jit
def _pipelined(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, mean_ptr, var_ptr, invstd_ptr, count_ptr, rm_ptr, rv_ptr,
               w_ptr, b_ptr, dw_ptr, db_ptr, k_ptr, part_ptr, ws_ptr,
               N, C, L, NB, LSEG, GL, G, K, S, A, count, eps, momentum, unbias, slope,
               BACKWARD: tl.constexpr, TRAIN: tl.constexpr, UPDATE: tl.constexpr, HAS_R: tl.constexpr,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr,
               NEED_DR: tl.constexpr, CG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_PS: tl.constexpr,
               BLOCK_PA: tl.constexpr, BLOCK_Q: tl.constexpr, KEEP: tl.constexpr, DROP: tl.constexpr):
    """A whole training forward or backward on planes in one launch, ``K`` groups of ``CG``
    channels in a pipeline (see :class:`_Pipeline`).

    Each program first takes a ticket (``ws[0]``): the order in which programs started. Tickets
    ``S_0, S_1, A_0, S_2, A_1, ..., A_(K-1)`` (``S`` statistics chunks then ``A`` elementwise
    tiles per group) mean that while group ``k`` is normalized, group ``k + 1`` is being read, and
    that a program only ever waits for programs holding lower tickets, which have started and never
    wait themselves: no deadlock, whatever order the hardware starts programs in. The last
    statistics program of a group (counter ``ws[1 + k]``) merges the group's partial sums, writes
    its per-channel outputs and raises the group's flag ``ws[1 + K + k]``; the group's elementwise
    programs wait for it. A group's data is sized to stay in L2 until its elementwise pass reads it
    again, so the tensor comes from memory once instead of twice; ``KEEP`` and ``DROP`` are the L2
    eviction policies of the statistics loads and of the elementwise loads and stores (see
    :data:`_PIPELINE_HINTS`).
    """
    t = tl.atomic_add(ws_ptr, 1)
    # after S_0, units of S + A tickets: S_(unit + 1) then A_unit; the last unit is A_(K-1) alone
    unit = (t - S) // (S + A)
    rem = (t - S) - unit * (S + A)
    is_stats = (t < S) | ((unit < K - 1) & (rem < S))
    grp = tl.where(t < S, 0, tl.where(is_stats, unit + 1, unit))
    loc = tl.where(t < S, t, tl.where(is_stats | (unit == K - 1), rem, rem - S))
    if is_stats:
        c = grp * CG + loc % CG
        if c < C:
            _plane_chunk(x_ptr, dy_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr, c, loc // CG,
                         N, C, L, NB, LSEG, GL, G, slope, BACKWARD, HAS_R, HAS_W, HAS_B, ACT, BLOCK_PS, BLOCK_Q,
                         KEEP)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        if tl.atomic_add(ws_ptr + 1 + grp, 1, sem="acq_rel") == S - 1:  # the group's last chunk
            cs = grp * CG + tl.arange(0, CG)
            if BACKWARD:
                _bwd_channels(part_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, k_ptr, cs, cs < C, G, C, count, TRAIN,
                              HAS_W, CG, BLOCK_G, ".cg")
            else:
                _fwd_channels(part_ptr, x_ptr, mean_ptr, var_ptr, invstd_ptr, count_ptr, rm_ptr, rv_ptr, cs,
                              cs < C, G, C, L, count, eps, momentum, unbias, UPDATE, CG, BLOCK_G, ".cg")
            tl.debug_barrier()
            tl.atomic_xchg(ws_ptr + 1 + K + grp, 1, sem="release")
    else:
        while tl.load(ws_ptr + 1 + K + grp, volatile=True) == 0:
            pass
        tl.atomic_add(ws_ptr + 1 + K + grp, 0, sem="acquire")
        tl.debug_barrier()
        nblk = tl.cdiv(L, BLOCK_Q)
        lp = (loc // nblk) * BLOCK_PA + tl.arange(0, BLOCK_PA)  # planes of the group: (n, c) n-major
        pos = (loc % nblk) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        n = lp // CG
        ch = grp * CG + lp % CG
        _plane_tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, k_ptr, n, ch,
                    (n < N) & (ch < C), pos, C, L, slope, BACKWARD, TRAIN, HAS_R, HAS_W, HAS_B, ACT, NEED_DX,
                    NEED_DR, ".cg", DROP)


# ------------------------------------------------------------------------------- geometry

#: Elements per tile of the statistics and elementwise kernels; channels and chunks per finish step.
_STATS_TILE, _APPLY_TILE, _FINISH_BLOCK, _FINISH_CHUNKS = 4096, 2048, 16, 128
#: Statistics programs per SM (the chunk count ``G`` per channel follows from it).
_PROGRAMS_PER_SM = 8
#: Whether training forwards and backwards on planes run as one pipelined launch (:func:`_pipelined`)
#: instead of three: ``BATCHNORM_TRITON_PIPELINE=1``. Off by default until a GPU has measured it
#: (docs/performance.md, "How the GPU kernels work").
_PIPELINE = os.environ.get("BATCHNORM_TRITON_PIPELINE") == "1"
#: A pipelined channel group's data fills at most ``1 / _GROUP_L2_SHARE`` of L2 (the group being
#: normalized shares L2 with the next group being read and the outputs being written).
_GROUP_L2_SHARE = 4
#: Bytes of one channel group, ``None``: from the device's L2 (the checks set it to force groups).
_GROUP_BYTES: int | None = None
#: L2 eviction policies of the pipelined launch: its statistics loads ``evict_last`` (the group is
#: read again soon), the elementwise pass's loads and stores ``evict_first`` (last use; outputs
#: should not push the next group out). ``False``: the hardware's default policy.
_PIPELINE_HINTS = True


def _pipeline_policies() -> dict[str, str]:
    return {"KEEP": "evict_last", "DROP": "evict_first"} if _PIPELINE_HINTS else {"KEEP": "", "DROP": ""}


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when dense with a single channel stride (contiguous/channels_last), else a copy."""
    if x.is_contiguous():
        return x
    for fmt, nd in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == nd and x.is_contiguous(memory_format=fmt):
            return x
    return x.contiguous()


def _like_layout(t: Tensor, x: Tensor) -> Tensor:
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a constexpr function: ~3 us a call on the host)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << (max(n, 1) - 1).bit_length()))


def _plane_chunks(N: int, C: int, L: int, q: int, target: int) -> tuple[int, int, int, int]:
    """``(NB, LSEG, GL, G)``: each of ``C`` channels' planes split into ``G`` chunks of ``NB``
    samples times ``LSEG`` positions (``GL`` chunks along the positions), about ``target``
    statistics programs in all."""
    want = max(1, _cdiv(target, C))
    gn = min(N, want)
    nb = _cdiv(N, gn)
    gn = _cdiv(N, nb)
    gl = max(1, min(want // gn, _cdiv(L, q)))
    lseg = _cdiv(_cdiv(L, gl), q) * q
    gl = _cdiv(L, lseg)
    return nb, lseg, gl, gn * gl


class _Pipeline:
    """The plan of :func:`_pipelined` for planes: ``K`` groups of ``cg`` channels (a power of two),
    each small enough to stay in L2 between its statistics and its elementwise pass; ``S``
    statistics chunks (``G`` per channel) and ``A`` elementwise tiles per group. Small groups
    give chunks of a few samples, so the statistics tile is no taller than a chunk (``p_stats``)."""

    def __init__(self, geo: _Geometry, channel_bytes: int, group_bytes: int, target: int) -> None:
        cg = 1
        while cg < geo.C and 2 * cg * channel_bytes <= group_bytes:
            cg *= 2
        self.cg, self.K = cg, _cdiv(geo.C, cg)
        self.nb, self.lseg, self.gl, self.G = _plane_chunks(geo.N, cg, geo.L, geo.q, target)
        self.p_stats = min(geo.p_stats, _pow2(self.nb, 1, geo.p_stats))
        self.S = self.G * cg
        self.A = _cdiv(geo.N * cg, geo.p_apply) * _cdiv(geo.L, geo.q)
        self.grid = (self.K * (self.S + self.A),)


class _Geometry:
    """How a dense ``x`` is tiled: rows (channel stride 1) or planes, and the launch grids."""

    def __init__(self, N: int, C: int, L: int, rows: bool, target: int, l2_bytes: int) -> None:
        self.N, self.C, self.L, self.rows = N, C, L, rows
        self.target, self.l2_bytes = target, l2_bytes
        self._pipelines: dict[tuple[int, int], _Pipeline] = {}
        M = self.count = N * L
        if rows:
            self.q = _pow2(C, 16, 128)
            self.p_stats = max(1, _STATS_TILE // self.q)
            self.p_apply = max(1, _APPLY_TILE // self.q)
            cblocks = _cdiv(C, self.q)
            chunks = max(1, min(_cdiv(target, cblocks), _cdiv(M, self.p_stats)))
            self.nb = _cdiv(_cdiv(M, chunks), self.p_stats) * self.p_stats
            self.lseg, self.gl = 1, 1
            self.G = _cdiv(M, self.nb)
            self.stats_grid = (self.G * cblocks,)
            self.apply_grid = (_cdiv(M, self.p_apply) * cblocks,)
        else:
            self.q = _pow2(L, 16, 1024)
            self.p_stats = max(1, _STATS_TILE // self.q)
            self.p_apply = max(1, _APPLY_TILE // self.q)
            self.nb, self.lseg, self.gl, self.G = _plane_chunks(N, C, L, self.q, target)
            self.stats_grid = (self.G * C,)
            self.apply_grid = (_cdiv(N * C, self.p_apply) * _cdiv(L, self.q),)

    def pipeline(self, bytes_per_value: int) -> _Pipeline:
        """The (cached) :class:`_Pipeline` for planes when each position of a channel brings
        ``bytes_per_value`` bytes into the statistics pass (the input's, plus ``dy``'s, ...)."""
        group = _GROUP_BYTES if _GROUP_BYTES is not None else self.l2_bytes // _GROUP_L2_SHARE
        key = (bytes_per_value, group)
        plan = self._pipelines.get(key)
        if plan is None:
            plan = self._pipelines[key] = _Pipeline(self, self.N * self.L * bytes_per_value, group, self.target)
        return plan


_GEOMETRIES: dict[tuple, _Geometry] = {}


def _geometry(x: Tensor) -> _Geometry:
    """The (cached) :class:`_Geometry` of a dense ``x``."""
    n, c = x.shape[0], x.shape[1]
    L = x.numel() // (n * c)
    rows = L == 1 or x.stride(1) == 1
    key = (n, c, L, rows, x.device, _STATS_TILE, _APPLY_TILE, _PROGRAMS_PER_SM)
    geo = _GEOMETRIES.get(key)
    if geo is None:
        if x.device.type == "cuda":
            props = torch.cuda.get_device_properties(x.device)
            sms, l2 = props.multi_processor_count, props.L2_cache_size
        else:  # the interpreter: one "SM", no L2
            sms, l2 = 1, 0
        if len(_GEOMETRIES) >= 4096:  # many shapes (varying batch sizes): start over
            _GEOMETRIES.clear()
        geo = _GEOMETRIES[key] = _Geometry(n, c, L, rows, _PROGRAMS_PER_SM * sms, l2)
    return geo


def _vec(t: Tensor | None) -> Tensor | None:
    """A per-channel tensor as a contiguous 1-D view (any float dtype: the kernels convert)."""
    if t is None:
        return None
    t = t.detach().reshape(-1)
    return t if t.is_contiguous() else t.contiguous()


def _residual(r: Tensor | None, x: Tensor) -> Tensor | None:
    return None if r is None else _like_layout(r.to(x.dtype), x)


# ---------------------------------------------------------------------------- entry points


def forward_train_act(x, weight, bias, residual, mask, eps, vbs, act, slope, running=None):
    """``y = act(bn(x) [+ residual])`` in training mode: ``(y, mean, var, count)``; ``running``
    (:class:`~batchnorm.kernels.reference.Running`) moves in the same call."""
    x = _dense(x)
    geo = _geometry(x)
    C, dev, M = geo.C, x.device, geo.count
    w, b, r = _vec(weight), _vec(bias), _residual(residual, x)
    mean = torch.empty((1, C), dtype=torch.float32, device=dev)
    var = torch.empty((1, C), dtype=torch.float32, device=dev)
    count = torch.empty((1,), dtype=torch.float32, device=dev)
    update = ref.kernel_can_update(running, x.device, torch.float32)
    rm, rv = (running.mean, running.var) if update else (mean, var)  # type: ignore[union-attr]
    momentum = float(running.momentum) if update else 0.0  # type: ignore[union-attr]
    unbias = M / (M - 1) if M > 1 else float("inf")
    y = torch.empty_like(x)
    wx, bx, rx = (w if w is not None else x), (b if b is not None else x), (r if r is not None else x)
    flags = dict(HAS_R=r is not None, HAS_W=w is not None, HAS_B=b is not None, ACT=_ACT_CODES[act])
    if _PIPELINE and not geo.rows:
        plan = geo.pipeline(x.element_size() * (1 if r is None else 2))
        scratch = torch.empty(C + 2 * plan.G * C, dtype=torch.float32, device=dev)
        _pipelined[plan.grid](
            x, y, x, rx, x, mean, var, scratch[:C], count, rm, rv, wx, bx, x, x, x, scratch[C:],
            torch.zeros(1 + 2 * plan.K, dtype=torch.int32, device=dev), geo.N, C, geo.L, plan.nb, plan.lseg,
            plan.gl, plan.G, plan.K, plan.S, plan.A, float(M), float(eps), momentum, unbias, float(slope),
            BACKWARD=False, TRAIN=False, UPDATE=update, NEED_DX=False, NEED_DR=False, CG=plan.cg,
            BLOCK_G=_pow2(plan.G, 1, _FINISH_CHUNKS), BLOCK_PS=plan.p_stats, BLOCK_PA=geo.p_apply, BLOCK_Q=geo.q,
            **_pipeline_policies(), **flags)
        ref.finish_running(running, update, mean, var, M)
        return y, mean, var, count
    scratch = torch.empty(C + 2 * geo.G * C, dtype=torch.float32, device=dev)
    invstd, part = scratch[:C], scratch[C:]
    _stats[geo.stats_grid](
        x, x, x, x, x, x, x, part, geo.N, C, geo.L, geo.nb, geo.lseg, geo.gl, geo.G, 0.0,
        ROWS=geo.rows, BACKWARD=False, HAS_R=False, HAS_W=False, HAS_B=False, ACT=0,
        BLOCK_P=geo.p_stats, BLOCK_Q=geo.q)
    _finish_fwd[(_cdiv(C, _FINISH_BLOCK),)](
        part, x, mean, var, invstd, count, rm, rv, geo.G, C, 1 if geo.rows else geo.L, float(M), float(eps),
        momentum, unbias, UPDATE=update, BLOCK=_FINISH_BLOCK, BLOCK_G=_pow2(geo.G, 1, _FINISH_CHUNKS))
    _apply[geo.apply_grid](
        x, y, x, rx, x, mean, invstd, wx, bx, x, geo.N, C, geo.L, float(slope), ROWS=geo.rows, BACKWARD=False,
        TRAIN=False, NEED_DX=False, NEED_DR=False, BLOCK_P=geo.p_apply, BLOCK_Q=geo.q, **flags)
    ref.finish_running(running, update, mean, var, M)
    return y, mean, var, count


def forward_train(x, weight, bias, mask, eps, vbs, running=None):
    return forward_train_act(x, weight, bias, None, mask, eps, vbs, "identity", 0.0, running)


def forward_apply_act(x, mean, var, eps, weight, bias, residual, act, slope):
    """``y = act(bn(x; mean, var) [+ residual])`` with given ``(C,)`` statistics."""
    x = _dense(x)
    geo = _geometry(x)
    w, b, r = _vec(weight), _vec(bias), _residual(residual, x)
    y = torch.empty_like(x)
    _apply[geo.apply_grid](
        x, y, x, r if r is not None else x, x, _vec(mean), _vec(ref.inverse_std(var, eps)), w if w is not None else x,
        b if b is not None else x, x, geo.N, geo.C, geo.L, float(slope), ROWS=geo.rows, BACKWARD=False,
        TRAIN=False, HAS_R=r is not None, HAS_W=w is not None, HAS_B=b is not None, ACT=_ACT_CODES[act],
        NEED_DX=False, NEED_DR=False, BLOCK_P=geo.p_apply, BLOCK_Q=geo.q)
    return y


def forward_apply(x, mean, var, eps, weight, bias):
    return forward_apply_act(x, mean, var, eps, weight, bias, None, "identity", 0.0)


def _backward(dy, x, residual, mean, var, eps, weight, bias, act, slope, train, need_dx, need_dr):
    x = _dense(x)
    dy = _like_layout(dy, x)
    geo = _geometry(x)
    C, dev = geo.C, x.device
    w, b, r = _vec(weight), _vec(bias), _residual(residual, x)
    m, inv = _vec(mean), _vec(ref.inverse_std(var, eps))
    dw = torch.empty(C, dtype=torch.float32, device=dev)
    db = torch.empty(C, dtype=torch.float32, device=dev)
    dx = torch.empty_like(x) if need_dx else None
    dr = torch.empty_like(x) if need_dr else None
    wx, bx, rx = (w if w is not None else x), (b if b is not None else x), (r if r is not None else x)
    dxx, drx = (dx if dx is not None else x), (dr if dr is not None else x)
    flags = dict(HAS_R=r is not None, HAS_W=w is not None, HAS_B=b is not None, ACT=_ACT_CODES[act])
    outs = dict(TRAIN=train, NEED_DX=need_dx, NEED_DR=need_dr)
    if _PIPELINE and not geo.rows and (need_dx or need_dr):
        plan = geo.pipeline(x.element_size() * (2 if r is None else 3))
        scratch = torch.empty(2 * C + 2 * plan.G * C, dtype=torch.float32, device=dev)
        _pipelined[plan.grid](
            x, dxx, dy, rx, drx, m, x, inv, x, x, x, wx, bx, dw, db, scratch[:2 * C], scratch[2 * C:],
            torch.zeros(1 + 2 * plan.K, dtype=torch.int32, device=dev), geo.N, C, geo.L, plan.nb, plan.lseg,
            plan.gl, plan.G, plan.K, plan.S, plan.A, float(geo.count), 0.0, 0.0, 0.0, float(slope),
            BACKWARD=True, UPDATE=False, CG=plan.cg, BLOCK_G=_pow2(plan.G, 1, _FINISH_CHUNKS),
            BLOCK_PS=plan.p_stats, BLOCK_PA=geo.p_apply, BLOCK_Q=geo.q, **_pipeline_policies(), **flags,
            **outs)
        return dx, dw, db, dr
    scratch = torch.empty(2 * C + 2 * geo.G * C, dtype=torch.float32, device=dev)
    kbc, part = scratch[:2 * C], scratch[2 * C:]
    _stats[geo.stats_grid](
        x, dy, rx, m, inv, wx, bx, part, geo.N, C, geo.L, geo.nb, geo.lseg, geo.gl, geo.G, float(slope),
        ROWS=geo.rows, BACKWARD=True, BLOCK_P=geo.p_stats, BLOCK_Q=geo.q, **flags)
    _finish_bwd[(_cdiv(C, _FINISH_BLOCK),)](
        part, inv, wx, dw, db, kbc, geo.G, C, float(geo.count), TRAIN=train, HAS_W=w is not None,
        BLOCK=_FINISH_BLOCK, BLOCK_G=_pow2(geo.G, 1, _FINISH_CHUNKS))
    if need_dx or need_dr:
        _apply[geo.apply_grid](
            x, dxx, dy, rx, drx, m, inv, wx, bx, kbc, geo.N, C, geo.L, float(slope), ROWS=geo.rows,
            BACKWARD=True, BLOCK_P=geo.p_apply, BLOCK_Q=geo.q, **flags, **outs)
    return dx, dw, db, dr


def backward_train_act(dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    return _backward(dy, x, residual, mean, var, eps, weight, bias, act, slope, True,
                     need_input_grad, need_residual_grad)


def backward_apply_act(dy, x, residual, mean, var, eps, weight, bias, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    return _backward(dy, x, residual, mean, var, eps, weight, bias, act, slope, False, need_input_grad,
                     need_residual_grad)


def backward_train(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad=True):
    return _backward(dy, x, None, mean, var, eps, weight, None, "identity", 0.0, True,
                     need_input_grad, False)[:3]


def backward_apply(dy, x, mean, var, eps, weight, need_input_grad=True):
    return _backward(dy, x, None, mean, var, eps, weight, None, "identity", 0.0, False, need_input_grad,
                     False)[:3]


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """CUDA (or, interpreted, CPU) float32/float16/bfloat16 tensors without mask or ghost batches."""
    if op not in _OPS or x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        return False
    if x.device.type != "cuda" and not (_INTERPRET and x.device.type == "cpu"):
        return False
    return mask is None and not (0 < vbs < x.shape[0])


register_backend(name, __import__(__name__, fromlist=["name"]), priority=40)
