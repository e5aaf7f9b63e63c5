"""The element formulas (forward, gradient at the pre-activation, input gradient), written once
and compiled to scalar and 32-byte vector code, and the compiled loops that run them over spans
of a flat tensor, runs of planes and blocks of rows.

Activation codes (see :mod:`batchnorm.kernels.reference_act`): 0 identity, 1 relu, 2 leaky_relu,
3 silu, 4 gelu (erf form); plain batch norm is code 0 of the fused kernels.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from numba import njit

from .base import _FM, _INL, _LINE, _NJ
from .primitives import at, atc, lanewise, pointers, store_rows, store_span, where_gt, where_le, where_lt

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# ------------------------------------------------------------------ element formulas
#
# Each formula is written once, as a function of its :class:`Operands` and an index ``i``: a flat
# index (an int, or a :class:`~.vector.Pos`: the formula then computes 32 bytes of lanes), or for
# rows ``(flat index, column)``. Tensors are pointers read with ``at``, per-channel values (a
# plane's scalars, a row's tiled arrays) with ``atc``; :func:`~.simd.store_span` and
# ``store_rows`` run a formula over a span of a flat output and stream large outputs past the
# cache.


class Operands(NamedTuple):
    """What the element formulas read: tensors as pointers (:func:`~.pointers.pointers`), the
    per-channel values as scalars (one plane) or tiled arrays (rows, see :func:`~.base._tiled`),
    all in the input dtype. One tuple for the three formulas (not nested: a tuple in a tuple trips
    numba's parfor array analysis); a formula ignores the fields it does not read."""

    dy: Any  # the output gradient (the forward: unread)
    x: Any
    r: Any  # the residual, read when ``has_r``
    has_r: Any
    center: Any  # subtracted from ``x``: the mean (or a pilot mean) rounded to the input dtype
    scale: Any  # weight * invstd
    shift: Any  # so that (x - center) * scale + shift is the normalization with the exact mean
    code: Any  # the activation code (see batchnorm.kernels.common)
    slope: Any  # leaky_relu's negative slope
    zero: Any
    g_scale: Any  # the input gradient: g * g_scale + (x - center) * x_scale + dx_shift
    x_scale: Any
    dx_shift: Any


@njit(**_INL)
def _forward_operands(x, r, has_r, center, scale, shift, code, slope, zero):
    """:class:`Operands` of the forward formula."""
    return Operands(x, x, r, has_r, center, scale, shift, code, slope, zero, zero, zero, zero)


@njit(**_INL)
def _gate_operands(dy, x, r, has_r, center, scale, shift, code, slope, zero):
    """:class:`Operands` of the gradient at the pre-activation (:func:`_grad_at`)."""
    return Operands(dy, x, r, has_r, center, scale, shift, code, slope, zero, zero, zero, zero)


@njit(**_INL)
def _with_input_grad(ops, g_scale, x_scale, dx_shift):
    """``ops`` with the input gradient's coefficients (:func:`_input_grad_at`)."""
    return Operands(ops.dy, ops.x, ops.r, ops.has_r, ops.center, ops.scale, ops.shift, ops.code, ops.slope,
                    ops.zero, g_scale, x_scale, dx_shift)


@njit(**_INL)
def _preact_at(ops, i):
    """The pre-activation ``z = (x - center) * scale + shift [+ r]`` at ``i``."""
    z = (at(ops.x, i) - atc(ops.center, i)) * atc(ops.scale, i) + atc(ops.shift, i)
    if ops.has_r:
        z += at(ops.r, i)
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
def _forward_at(ops, i):
    """The forward: ``act(z)``."""
    z = _preact_at(ops, i)
    code, zero = ops.code, ops.zero
    if code == 0:
        return z
    if code == 1:
        return where_le(z, zero, zero, z)
    if code == 2:
        return where_lt(z, zero, z * ops.slope, z)
    return lanewise(_act_scalar, z, code, ops.slope)


@njit(**_INL)
def _grad_at(ops, i):
    """The gradient at the pre-activation, ``g = dy * act'(z)``."""
    gy = at(ops.dy, i)
    code, zero = ops.code, ops.zero
    if code == 0:
        return gy
    z = _preact_at(ops, i)
    if code == 1:
        return where_gt(z, zero, gy, zero)
    if code == 2:
        return where_gt(z, zero, gy, gy * ops.slope)
    return gy * lanewise(_dact_scalar, z, code, ops.slope)


@njit(**_INL)
def _input_grad_at(ops, i):
    """The input gradient ``g * g_scale + (x - center) * x_scale + dx_shift``."""
    return (_grad_at(ops, i) * atc(ops.g_scale, i) + (at(ops.x, i) - atc(ops.center, i)) * atc(ops.x_scale, i)
            + atc(ops.dx_shift, i))


# Two common cases run their own copy of each loop, with the activation and the residual flag as
# compile-time constants: the plain batch norm (the identity) and BN + ReLU, both without a
# residual. As run-time values every vector tested them (LLVM does not unswitch a loop this
# large), which made a (128, 64, 8, 8) inference 2.5x slower. Every other case runs the general
# loop. The copies add a quarter to the cold compile (docs/results/2026-12-01-cpu-loop-copies.md).


@njit(**_INL)
def _case(ops):
    """The case of ``ops``: the activation code 0 (identity) or 1 (ReLU) without a residual, else
    -1 (the general loop)."""
    if ops.has_r or ops.code > 1:
        return -1
    return ops.code


@njit(**_INL)
def _fixed(ops, code):
    """``ops`` with no residual and the activation ``code`` as constants."""
    return Operands(ops.dy, ops.x, ops.r, False, ops.center, ops.scale, ops.shift, code, ops.slope, ops.zero,
                    ops.g_scale, ops.x_scale, ops.dx_shift)


@njit(**_INL)
def with_cases(run, loop, ops):
    """``run(loop, ops)``, with the constants of the case of ``ops`` (see above)."""
    k = _case(ops)
    if k == 0:
        run(loop, _fixed(ops, 0))
    elif k == 1:
        run(loop, _fixed(ops, 1))
    else:
        run(loop, ops)


# The loops, as ``run(loop, ops)`` for :func:`with_cases`: ``loop`` the loop's arguments and
# formula. A ``_spans`` loop writes ``count`` spans of ``n`` values starting at ``f0``,
# ``f0 + step``, ... (a plane: ``count = 1``; a channel's planes, last first: ``step = -C * L``).


@njit(**_INL)
def _spans(loop, ops):
    out, f0, n, step, count, off, stream, formula = loop
    for k in range(count):
        store_span(out, f0 + k * step, f0 + k * step + n, off, stream, formula, ops)


@njit(**_INL)
def _rows(loop, ops):
    out, m0, m1, ch, stream, formula = loop
    store_rows(out, m0, m1, ch, stream, formula, ops)


@njit(**_INL)
def _at_channel(ops, c):
    """``ops`` with the per-channel arrays (pointers) of the forward read at channel ``c``."""
    return Operands(ops.dy, ops.x, ops.r, ops.has_r, at(ops.center, c), at(ops.scale, c), at(ops.shift, c),
                    ops.code, ops.slope, ops.zero, ops.g_scale, ops.x_scale, ops.dx_shift)


@njit(**_INL)
def _planes(loop, ops):
    out, k0, k1, C, L, stream = loop
    c = k0 % C
    f0 = k0 * L
    for _ in range(k0, k1):
        store_span(out, f0, f0 + L, 0, stream, _forward_at, _at_channel(ops, c))
        f0 += L
        c = c + 1 if c + 1 < C else 0


@njit(**_LINE)
def _y_spans(out, f0, n, step, count, off, stream, ops):
    with_cases(_spans, (out, f0, n, step, count, off, stream, _forward_at), pointers(ops))


@njit(**_LINE)
def _g_spans(out, f0, n, step, count, off, stream, ops):
    with_cases(_spans, (out, f0, n, step, count, off, stream, _grad_at), pointers(ops))


@njit(**_LINE)
def _dx_spans(out, f0, n, step, count, off, stream, ops):
    with_cases(_spans, (out, f0, n, step, count, off, stream, _input_grad_at), pointers(ops))


@njit(**_LINE)
def _y_planes(out, k0, k1, C, L, stream, ops):
    """Planes ``k0:k1`` of the flat ``(N, C, L)`` tensors with the per-channel values of ``ops``
    (arrays, read at each plane's channel): one call for a run of planes, as a call per short
    plane costs as much as its arithmetic."""
    with_cases(_planes, (out, k0, k1, C, L, stream), pointers(ops))


@njit(**_LINE)
def _y_rows(out, m0, m1, ch, stream, ops):
    with_cases(_rows, (out, m0, m1, ch, stream, _forward_at), pointers(ops))


@njit(**_LINE)
def _g_rows(out, m0, m1, ch, stream, ops):
    with_cases(_rows, (out, m0, m1, ch, stream, _grad_at), pointers(ops))


@njit(**_LINE)
def _dx_rows(out, m0, m1, ch, stream, ops):
    with_cases(_rows, (out, m0, m1, ch, stream, _input_grad_at), pointers(ops))
