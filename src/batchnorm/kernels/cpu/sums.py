"""Reductions: float64 sums of input-dtype partials over bounded blocks, for planes (spans of a
flat tensor) and for rows (per-column accumulators)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .base import _INL, _LINE, _RBLK, _VBLK, _as
from .formulas import _g_spans, _grad_at, with_cases
from .primitives import add_at, at, atc, hsum, lanes, pointers, vfill, vpos, widen


@njit(**_INL)
def _pair_step(xp, g, goff, i, w, center, use_g, acc):
    """Two vectors from ``i`` into the accumulators ``acc = (vs0, vt0, vs1, vt1)`` (see :func:`_span_sums`)."""
    vs0, vt0, vs1, vt1 = acc
    d0 = at(xp, vpos(i)) - center
    d1 = at(xp, vpos(i + w)) - center
    g0 = at(g, vpos(i - goff)) if use_g else d0
    g1 = at(g, vpos(i + w - goff)) if use_g else d1
    return vs0 + g0, vt0 + g0 * d0, vs1 + g1, vt1 + g1 * d1


@njit(**_INL)
def _span_sums(g, goff, xp, f0, n, step, count, center, use_g, zero):
    """Float64 ``sum(g)`` and ``sum(g * (x - center))`` over ``count`` spans of ``n`` values of ``x``
    from ``f0``, ``f0 + step``, ... (``xp`` a pointer; ``g`` at ``i`` is the pointer ``g`` at
    ``i - goff``); ``g = x - center`` when not ``use_g`` (the shifted moments).

    Summed in 32-byte vectors of the input dtype, two per step, which are added to float64 vectors
    (:func:`~.vector.widen`, no horizontal sum) after each whole block of
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
                acc = _pair_step(xp, g, goff, i, w, center, use_g, acc)
            ws += widen(acc[0] + acc[2])
            wt += widen(acc[1] + acc[3])
            acc = (z, z, z, z)
        for i in range(eb, e2, 2 * w):
            acc = _pair_step(xp, g, goff, i, w, center, use_g, acc)
        vs0, vt0, vs1, vt1 = acc
        for i in range(e2, e1, w):
            d0 = at(xp, vpos(i)) - center
            g0 = at(g, vpos(i - goff)) if use_g else d0
            vs0 += g0
            vt0 += g0 * d0
        for i in range(e1, a + n):
            d = at(xp, i) - center
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
def _plane_sums(x, xp, n0, n1, c, center):
    """Float64 ``sum(x - center)`` and ``sum((x - center)**2)`` over the planes ``x[n0:n1, c]``."""
    _, C, L = x.shape
    return _span_sums(xp, 0, xp, (n0 * C + c) * L, L, C * L, n1 - n0, center, False, _as(x, 0))


@njit(**_INL)
def _moments(x, xp, n0, n1, c):
    """Planes ``x[n0:n1, c]`` (``xp`` = ``_ptr(x)``): their mean rounded to the input dtype
    ``center``, then float64 ``sum(x - center)`` and ``sum((x - center)**2)`` in a second sweep while they are
    hot (the shift keeps the one-pass variance free of cancellation)."""
    center = _as(x, _plane_sums(x, xp, n0, n1, c, _as(x, 0))[0] / ((n1 - n0) * x.shape[2]))
    sd, sq = _plane_sums(x, xp, n0, n1, c, center)
    return center, sd, sq


@njit(**_INL)
def _pilot_moments(x, xp, c):
    """All planes of channel ``c`` in one sweep: a pilot mean ``center`` (in the input dtype, from
    the first planes, at least ~1024 values, which are then hot), then float64 ``sum(x - center)`` and
    ``sum((x - center)**2)`` over the channel. It saves :func:`_moments`' second sweep over the
    channel; the caller falls back to :func:`_moments` when the pilot is far from the mean (in
    units of the standard deviation), where the one-pass variance would cancel."""
    N, L = x.shape[0], x.shape[2]
    npl = min(N, max(1, (1024 + L - 1) // L))
    center = _as(x, _plane_sums(x, xp, 0, npl, c, _as(x, 0))[0] / (npl * L))
    sd, sq = _plane_sums(x, xp, 0, N, c, center)
    return center, sd, sq


@njit(**_INL)
def _grad(gp, buf, bp, f0, f1):
    """``g`` (:func:`~.formulas._grad_at` of the operands ``gp``) on the span ``f0:f1`` as ``(pointer, offset)``, ``g``
    at ``i`` being the pointer at ``i - offset``: ``dy`` itself for the identity (no copy), else
    computed into ``buf`` (``bp`` its pointer, at least ``f1 - f0`` long)."""
    if gp.code == 0:
        return gp.dy, 0
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
def _grad_and_centered(ops, moments, i):
    """``(g, x - center)`` at ``i`` (one element or ``W`` lanes): ``g = x - center`` for the
    ``moments``, else ``g`` of :func:`~.formulas._grad_at`."""
    d = at(ops.x, i) - atc(ops.center, i)
    return (d if moments else _grad_at(ops, i)), d


@njit(**_INL)
def _sums_step(ops, moments, i, c, accs, acct):
    """Add ``g`` and ``g * (x - center)`` at ``i`` (:func:`_grad_and_centered`) to the accumulators at channel ``c``."""
    g, d = _grad_and_centered(ops, moments, i)
    add_at(accs, c, g)
    add_at(acct, c, g * d)


@njit(**_INL)
def _rows_block_sums(ops, moments, ch, r0, r1, bi, psum, pdot):
    """Rows ``r0:r1`` of the flat ``(M, ch)`` tensors of ``ops`` (:class:`~.formulas.Operands`,
    tensors as pointers) into ``psum[bi]``, ``pdot[bi]``: float64 ``sum(g)`` and
    ``sum(g * (x - center))``, with ``g = x - center`` (``moments``) or ``g`` of
    :func:`~.formulas._grad_at`; ``W`` channels at a time, two rows per step (one accumulator
    update for both). The per-channel accumulators, in the input dtype,
    are flushed to float64 every :data:`_RBLK` rows."""
    accs = np.full(ch, ops.zero)
    acct = np.full(ch, ops.zero)
    w = lanes(ops.zero)
    cv = ch // w * w
    for s0 in range(r0, r1, _RBLK):
        s1 = min(s0 + _RBLK, r1)
        for m in range(s0, s1 - 1, 2):
            for c in range(0, cv, w):
                g0, d0 = _grad_and_centered(ops, moments, (vpos(m * ch + c), vpos(c)))
                g1, d1 = _grad_and_centered(ops, moments, (vpos((m + 1) * ch + c), vpos(c)))
                add_at(accs, vpos(c), g0 + g1)
                add_at(acct, vpos(c), g0 * d0 + g1 * d1)
            for c in range(cv, ch):
                _sums_step(ops, moments, (m * ch + c, c), c, accs, acct)
                _sums_step(ops, moments, ((m + 1) * ch + c, c), c, accs, acct)
        if (s1 - s0) % 2:
            m = s1 - 1
            for c in range(0, cv, w):
                _sums_step(ops, moments, (vpos(m * ch + c), vpos(c)), vpos(c), accs, acct)
            for c in range(cv, ch):
                _sums_step(ops, moments, (m * ch + c, c), c, accs, acct)
        _flush(accs, acct, psum, pdot, bi)


@njit(**_INL)
def _block_sums(loop, ops):
    ch, r0, r1, bi, psum, pdot = loop
    _rows_block_sums(ops, False, ch, r0, r1, bi, psum, pdot)


@njit(**_LINE)
def _g_block_sums(gp, ch, r0, r1, bi, psum, pdot):
    """:func:`_rows_block_sums` of ``g`` (the backward's reduction), per case
    (:func:`~.formulas.with_cases`)."""
    with_cases(_block_sums, (ch, r0, r1, bi, psum, pdot), pointers(gp))


@njit(**_LINE)
def _moment_block_sums(gate, ch, r0, r1, bi, psum, psq):
    """:func:`_rows_block_sums` of ``x - center`` (the statistics' shifted moments)."""
    _rows_block_sums(pointers(gate), True, ch, r0, r1, bi, psum, psq)
