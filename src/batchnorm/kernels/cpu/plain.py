"""The primitives of :mod:`.simd` as plain scalar loops (``BATCHNORM_CPU_SIMD=0``, see
:mod:`.primitives`).

Same names and semantics, one element at a time: :func:`vpos` is the index itself, :func:`lanes`
is 1, a "vector" is a scalar (:func:`vfill`, :func:`widen`, :func:`hsum` convert it), and
:func:`store_span` / :func:`store_rows` are ``for`` loops that LLVM vectorizes on its own (no
non-temporal stores: ``stream`` is ignored). Only numba's public extension API
(``njit``, ``overload``) and the pointers of :mod:`.pointers`: the fallback for a numba release
whose internals the vector type (:mod:`.vector`) relies on have changed.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import njit, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload
from numba.np.numpy_support import as_dtype

from .pointers import keep, pointers, voidptr

__all__ = ["LINE_BYTES", "add_at", "at", "atc", "hsum", "keep", "lanes", "lanewise", "pointers", "store_rows",
           "store_span", "vfill", "voidptr", "vpos", "where_gt", "where_le", "where_lt", "widen"]

LINE_BYTES = 64  # a cache line (the planes kernels' streaming threshold reads it)

# The pedantic SSA check that :mod:`.vector` silences for its loops trips on these the same way.
warnings.filterwarnings("ignore", message=r"variable '_(store_span|store_rows|lanewise)_ov",
                        category=NumbaIRAssumptionWarning)

_INL = {"inline": "always"}


@njit(**_INL)
def vpos(i):
    """The index itself (a vector's first lane in :mod:`.simd`)."""
    return i


@njit(**_INL)
def lanes(v):
    """One lane."""
    return 1


@njit(**_INL)
def vfill(v):
    """``v`` itself (a vector of ``v`` in :mod:`.simd`)."""
    return v


@njit(**_INL)
def widen(v):
    """``v`` in float64."""
    return np.float64(v)


@njit(**_INL)
def hsum(v):
    """``v`` in float64 (the sum of a vector's lanes in :mod:`.simd`)."""
    return np.float64(v)


@njit(**_INL)
def where_gt(z, t, a, b):
    """``a if z > t else b``."""
    return a if z > t else b


@njit(**_INL)
def where_le(z, t, a, b):
    """``a if z <= t else b``."""
    return a if z <= t else b


@njit(**_INL)
def where_lt(z, t, a, b):
    """``a if z < t else b``."""
    return a if z < t else b


def at(t, i):  # type: ignore[no-untyped-def]
    """``t[i]`` for a pointer ``t``; for rows ``i`` is ``(flat index, channel)``."""
    raise NotImplementedError  # only called from numba


@overload(at, inline="always")
def _at_ov(t, i):
    if isinstance(i, types.BaseTuple):
        return lambda t, i: t[i[0]]
    return lambda t, i: t[i]


def atc(p, i):  # type: ignore[no-untyped-def]
    """A per-channel operand: ``p`` itself for a scalar, ``p[channel]`` for rows (``i = (flat, channel)``)."""
    raise NotImplementedError  # only called from numba


@overload(atc, inline="always")
def _atc_ov(p, i):
    if isinstance(p, types.Number):
        return lambda p, i: p
    return lambda p, i: p[i[1]]


def add_at(a, i, v):  # type: ignore[no-untyped-def]
    """``a[i] += v``."""
    raise NotImplementedError  # only called from numba


@overload(add_at, inline="always")
def _add_at_ov(a, i, v):
    def impl(a, i, v):  # type: ignore[no-untyped-def]
        a[i] += v

    return impl


def lanewise(f, z, a, b):  # type: ignore[no-untyped-def]
    """``f(z, a, b)`` rounded to ``z``'s dtype."""
    raise NotImplementedError  # only called from numba


@overload(lanewise, inline="always")
def _lanewise_ov(f, z, a, b):
    if isinstance(z, types.Float):
        ctor = as_dtype(z).type
        return lambda f, z, a, b: ctor(f(z, a, b))
    return None


def _formula(f: types.Type, args: types.Type):  # type: ignore[no-untyped-def]
    if not isinstance(f, types.Dispatcher):
        raise TypeError("store_span/store_rows take a jitted formula")
    if isinstance(args, types.BaseTuple) and any(isinstance(t, types.Array) for t in args.types):
        raise TypeError("store_span/store_rows take the formula's operands as pointers (see pointers)")
    return f.dispatcher


def store_span(out, f0, f1, off, stream, f, args):  # type: ignore[no-untyped-def]
    """``out[i - off] = f(args, i)`` for ``i`` in ``f0:f1`` (``f`` spliced into the loop)."""
    raise NotImplementedError  # only called from numba


@overload(store_span, inline="always")
def _store_span_ov(out, f0, f1, off, stream, f, args):
    fn = _formula(f, args)

    def impl(out, f0, f1, off, stream, f, args):  # type: ignore[no-untyped-def]
        for i in range(f0, f1):
            out[i - off] = fn(args, i)

    return impl


def store_rows(out, m0, m1, ch, stream, f, args):  # type: ignore[no-untyped-def]
    """``out[m*ch + c] = f(args, (m*ch + c, c))`` for rows ``m0:m1`` of ``ch`` channels."""
    raise NotImplementedError  # only called from numba


@overload(store_rows, inline="always")
def _store_rows_ov(out, m0, m1, ch, stream, f, args):
    fn = _formula(f, args)

    def impl(out, m0, m1, ch, stream, f, args):  # type: ignore[no-untyped-def]
        for m in range(m0, m1):
            for c in range(ch):
                i = m * ch + c
                out[i] = fn(args, (i, c))

    return impl
