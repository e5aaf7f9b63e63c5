"""The element formulas (forward, gradient at the pre-activation, input gradient), written once
and compiled to scalar and 32-byte vector code, and the compiled loops that run them over spans
of a flat tensor, runs of planes and blocks of rows.

Activation codes (see :mod:`batchnorm.kernels.reference_act`): 0 identity, 1 relu, 2 leaky_relu,
3 silu, 4 gelu (erf form); plain batch norm is code 0 of the fused kernels.
"""

from __future__ import annotations

import math

from numba import njit

from .base import _FM, _INL, _LINE, _NJ
from .simd import at, atc, lanewise, pointers, store_rows, store_span, where_gt, where_le, where_lt

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


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
