"""The Triton kernels of the GPU backend (:mod:`batchnorm.kernels.triton_gpu` launches them and
describes the design): the activation and its derivative, the statistics pass, the per-channel
finish steps and the elementwise pass."""

from __future__ import annotations

import triton
import triton.language as tl


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
def _params(c, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel ``(mean, invstd * weight, bias)`` in float32 for channel index(es) ``c``."""
    m = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    a = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
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
        k, a, b = _params(c, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
    else:
        k = tl.load(x_ptr + pilot_off, mask=cmask, other=0.0).to(tl.float32)
        a = k
        b = k
    return k, a, b


@triton.jit
def _accumulate(x_ptr, dy_ptr, r_ptr, off, msk, k, a, b, slope, acc1, acc2,
                BACKWARD: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr):
    """One tile's contribution: forward ``x - k`` and its square (``k`` the pilot); backward
    ``g`` and ``g * (x - k)`` (``k`` the mean, ``a``/``b`` scale and shift for ``act'``)."""
    d = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32) - k
    if BACKWARD:
        r = 0.0
        if HAS_R:
            r = tl.load(r_ptr + off, mask=msk, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + off, mask=msk, other=0.0).to(tl.float32)
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
                 BLOCK_Q: tl.constexpr):
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
                                     HAS_R, ACT)
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
                                     acc1, acc2, BACKWARD, HAS_R, ACT)
        tl.store(part_ptr + g * C + cs, tl.sum(acc1, 0), mask=cmask)
        tl.store(part_ptr + (G + g) * C + cs, tl.sum(acc2, 0), mask=cmask)
    else:
        _plane_chunk(x_ptr, dy_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr, pid % C, pid // C,
                     N, C, L, NB, LSEG, GL, G, slope, BACKWARD, HAS_R, HAS_W, HAS_B, ACT, BLOCK_P, BLOCK_Q)


@triton.jit
def _merge(part_ptr, G, C, cs, cmask, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
    """Float64 sums over the ``G`` chunks of ``part[0]`` and ``part[1]`` for channels ``cs``
    (``[BLOCK_G, channels]`` tiles: a thousand chunks take one or two steps, not a thousand)."""
    s = tl.zeros([BLOCK_G, BLOCK], dtype=tl.float64)
    q = tl.zeros([BLOCK_G, BLOCK], dtype=tl.float64)
    gs = tl.arange(0, BLOCK_G)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + gs
        msk = (g < G)[:, None] & cmask[None, :]
        off = g[:, None] * C + cs[None, :]
        s += tl.load(part_ptr + off, mask=msk, other=0.0).to(tl.float64)
        q += tl.load(part_ptr + G * C + off, mask=msk, other=0.0).to(tl.float64)
    return tl.sum(s, 0), tl.sum(q, 0)


@triton.jit
def _fwd_channels(part_ptr, x_ptr, mean_ptr, var_ptr, invstd_ptr, count_ptr, rm_ptr, rv_ptr, cs, cmask, G, C,
                  k_stride, count, eps, momentum, unbias, UPDATE: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_G: tl.constexpr):
    """Mean, biased variance, ``1/sqrt(var + eps)`` (and the running statistics) of channels ``cs``."""
    s, q = _merge(part_ptr, G, C, cs, cmask, BLOCK_G, BLOCK)
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
                  TRAIN: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
    """``dweight = sum(g * xhat)``, ``dbias = sum(g)`` of channels ``cs``; training: ``kb``, ``kc`` of ``dx``."""
    s, t = _merge(part_ptr, G, C, cs, cmask, BLOCK_G, BLOCK)
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
                  k_stride, count, eps, momentum, unbias, UPDATE, BLOCK, BLOCK_G)


@triton.jit
def _finish_bwd(part_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, k_ptr, G, C, count,
                TRAIN: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_G: tl.constexpr):
    """:func:`_bwd_channels` for one block of ``BLOCK`` channels per program."""
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _bwd_channels(part_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, k_ptr, cs, cs < C, G, C, count, TRAIN, HAS_W,
                  BLOCK, BLOCK_G)


@triton.jit
def _tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, off, msk, m, a, b, kb, kc, slope,
          BACKWARD: tl.constexpr, TRAIN: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
          NEED_DX: tl.constexpr, NEED_DR: tl.constexpr):
    """The elementwise formulas on one tile."""
    d = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32) - m
    r = 0.0
    if HAS_R:
        r = tl.load(r_ptr + off, mask=msk, other=0.0).to(tl.float32)
    if BACKWARD:
        dy = tl.load(dy_ptr + off, mask=msk, other=0.0).to(tl.float32)
        g = _grad_out(dy, d, r, a, b, slope, HAS_R, ACT)
        if NEED_DX:
            dx = g * a
            if TRAIN:
                dx += d * kb + kc
            tl.store(y_ptr + off, dx.to(y_ptr.dtype.element_ty), mask=msk)
        if NEED_DR:
            tl.store(dr_ptr + off, g.to(dr_ptr.dtype.element_ty), mask=msk)
    else:
        z = d * a + b
        if HAS_R:
            z += r
        tl.store(y_ptr + off, _act(z, slope, ACT).to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _plane_tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, k_ptr, n, c, pmask, pos,
                C, L, slope, BACKWARD: tl.constexpr, TRAIN: tl.constexpr, HAS_R: tl.constexpr,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, NEED_DX: tl.constexpr,
                NEED_DR: tl.constexpr):
    """The elementwise pass on planes ``(n, c)`` (vectors, ``pmask`` the valid ones) at positions ``pos``."""
    m, a, b = _params(c, pmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
    kb = 0.0
    kc = 0.0
    if TRAIN:
        kb = tl.load(k_ptr + c, mask=pmask, other=0.0)[:, None]
        kc = tl.load(k_ptr + C + c, mask=pmask, other=0.0)[:, None]
    off = (n.to(tl.int64) * C + c)[:, None] * L + pos[None, :]
    msk = pmask[:, None] & (pos < L)[None, :]
    _tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, off, msk, m[:, None], a[:, None], b[:, None], kb, kc, slope,
          BACKWARD, TRAIN, HAS_R, ACT, NEED_DX, NEED_DR)


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
        m, a, b = _params(cs, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
        kb = 0.0
        kc = 0.0
        if TRAIN:
            kb = tl.load(k_ptr + cs, mask=cmask, other=0.0)[None, :]
            kc = tl.load(k_ptr + C + cs, mask=cmask, other=0.0)[None, :]
        off = rows.to(tl.int64)[:, None] * C + cs[None, :]
        msk = (rows < N * L)[:, None] & cmask[None, :]
        _tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, off, msk, m[None, :], a[None, :], b[None, :], kb, kc, slope,
              BACKWARD, TRAIN, HAS_R, ACT, NEED_DX, NEED_DR)
    else:
        nblk = tl.cdiv(L, BLOCK_Q)
        planes = (pid // nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
        pos = (pid % nblk) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        _plane_tile(x_ptr, y_ptr, dy_ptr, r_ptr, dr_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, k_ptr, planes // C,
                    planes % C, planes < N * C, pos, C, L, slope, BACKWARD, TRAIN, HAS_R, HAS_W, HAS_B, ACT,
                    NEED_DX, NEED_DR)
