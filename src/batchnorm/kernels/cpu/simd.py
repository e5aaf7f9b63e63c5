"""32-byte SIMD vectors for the numba kernels, for one purpose: non-temporal (streaming) stores.

A batch-norm kernel writes a tensor-sized output that nothing reads back soon. A plain store
first reads the output's cache line from memory (write-allocate) and then evicts a line of the
input the kernel is about to read again; a non-temporal store writes the line to memory
directly. LLVM emits vector non-temporal stores only for aligned vector values, which numba code
never has, so this module gives the kernels a vector type:

* :class:`Pos` -- an index whose lanes are ``i .. i+W-1`` (``W`` = 32 bytes of the dtype).
  The kernels' element formulas read their operands through :func:`at` (tensors) and
  :func:`atc` (per-channel values), which give one element for an ``int`` index and ``W``
  lanes for a :class:`Pos`, so each formula is written once and compiles to both forms.
* arithmetic (``+ - *``, vector with vector or scalar) and the selects :func:`where_gt`,
  :func:`where_le`, :func:`where_lt` (ordered compares: NaN picks the second value, as Python's
  ``a if z > t else b`` does); :func:`lanewise` applies a scalar function lane by lane.
* :func:`store_span` / :func:`store_rows` -- ``out[i] = f(args, i)`` over a span of a flat
  tensor, ``W`` lanes at a time; with ``stream`` the whole cache lines go out as non-temporal
  stores. The formula's tensor operands are raw pointers (:func:`pointers`): no reference
  counting in the loop. A pointer does not hold its array: see the lifetime rule under
  :func:`pointers` and :func:`keep`.
* :func:`vfill`, :func:`hsum`, :func:`lanes` and :func:`widen` let a reduction keep vector
  accumulators (in the input dtype, flushed to float64 vectors).

Measured on the 2-core EPYC (2026-11-30, (32, 64, 56, 56) float32, caches flushed before each
call): normalizing a tensor 1.6-2.1 -> 1.3-1.5 ms; the whole training forward (stats sweep and
normalize) 2.4-2.7 -> 1.8-2.0 ms; the backward's two sweeps 3.35-3.67 -> 2.8-2.9 ms.

The vector type and its arithmetic are in :mod:`.vector`, the pointers in :mod:`.pointers`; this
module holds the loads and stores and gives the kernels every name in one place.

Editing any module of this package but ``__init__.py`` recompiles every kernel (see
:func:`.primitives.decorated`).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload

from .pointers import address, keep, pointers, voidptr
from .vector import (
    WIDTH_BYTES,
    Pos,
    Vec,
    hsum,
    lanes,
    lanewise,
    pos_index,
    vfill,
    vpos,
    where_gt,
    where_le,
    where_lt,
    widen,
)

__all__ = ["LINE_BYTES", "WIDTH_BYTES", "Pos", "Vec", "add_at", "address", "at", "atc", "hsum", "keep", "lanes",
           "lanewise", "pointers", "pos_index", "span", "store_rows", "store_span", "vfill", "vload", "voidptr",
           "vpos", "vstore", "vstream", "where_gt", "where_le", "where_lt", "widen"]


def _lane_count(ary: types.Array) -> int:
    return WIDTH_BYTES // (ary.dtype.bitwidth // 8)


def _vector_ptr(context, builder, aryty, ary_val, idx_vals, idx_types):  # type: ignore[no-untyped-def]
    """Pointer to ``ary[idx]`` as a pointer to ``W`` lanes."""
    ary = context.make_array(aryty)(context, builder, ary_val)
    idx = [context.cast(builder, v, t, types.intp) for v, t in zip(idx_vals, idx_types)]
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
    vt = ir.VectorType(context.get_data_type(aryty.dtype), _lane_count(aryty))
    return builder.bitcast(ptr, vt.as_pointer())


def add_at(a, i, v):  # type: ignore[no-untyped-def]
    """``a[i] += v`` for an int ``i``; the ``W`` lanes from ``a[i]`` on for a :class:`Pos`."""
    raise NotImplementedError  # only called from numba


@overload(add_at, inline="always")
def _add_at_ov(a, i, v):
    if isinstance(i, Pos):
        def impl(a, i, v):  # type: ignore[no-untyped-def]
            k = pos_index(i)
            vstore(a, k, vload(a, k) + v)

        return impl

    def impl1(a, i, v):  # type: ignore[no-untyped-def]
        a[i] += v

    return impl1


def _flat_access(ary: types.Type, idx: types.Type, v: types.Type | None = None) -> bool:
    """Whether ``(ary, idx[, v])`` is a 1D C-contiguous float array, an int and a vector of its dtype."""
    ok = isinstance(ary, types.Array) and ary.ndim == 1 and ary.layout == "C" and isinstance(ary.dtype, types.Float)
    return ok and isinstance(idx, types.Integer) and (v is None or (isinstance(v, Vec) and v.dtype == ary.dtype))


@intrinsic
def vload(typingctx, ary, idx):
    """The ``W`` lanes of a 1D contiguous array from ``ary[idx]`` on (unaligned)."""
    if not _flat_access(ary, idx):
        return None

    def codegen(context, builder, sig, args):
        ptr = _vector_ptr(context, builder, sig.args[0], args[0], [args[1]], [sig.args[1]])
        return builder.load(ptr, align=sig.args[0].dtype.bitwidth // 8)

    return Vec(ary.dtype)(ary, idx), codegen


def _vector_store(nontemporal: bool):  # type: ignore[no-untyped-def]
    @intrinsic
    def store(typingctx, ary, idx, v):
        if not _flat_access(ary, idx, v):
            return None

        def codegen(context, builder, sig, args):
            ptr = _vector_ptr(context, builder, sig.args[0], args[0], [args[1]], [sig.args[1]])
            st = builder.store(args[2], ptr, align=WIDTH_BYTES if nontemporal else sig.args[0].dtype.bitwidth // 8)
            if nontemporal:
                st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
            return context.get_dummy_value()

        return types.void(ary, idx, v), codegen

    return store


vstream = _vector_store(True)
vstream.__doc__ = "Non-temporal store of ``v`` to ``ary[idx]`` on; ``&ary[idx]`` must be 32-byte aligned."
vstore = _vector_store(False)
vstore.__doc__ = "Store of ``v`` to ``ary[idx]`` on (unaligned, through the cache)."


def _load(context, builder, ptrty, ptr, idxty, idx):  # type: ignore[no-untyped-def]
    """``ptr[idx]``: one element for an integer index, the ``W`` lanes from it on for a :class:`Pos`."""
    k = idx if isinstance(idxty, Pos) else context.cast(builder, idx, idxty, types.intp)
    p = builder.gep(ptr, [k], inbounds=True)
    if isinstance(idxty, Pos):
        p = builder.bitcast(p, ir.VectorType(context.get_data_type(ptrty.dtype), Vec(ptrty.dtype).count).as_pointer())
    return builder.load(p, align=ptrty.dtype.bitwidth // 8)


def _index_ok(i: types.Type) -> bool:
    return isinstance(i, (Pos, types.Integer))


def _loaded(ptrty: types.Type, idxty: types.Type) -> types.Type:
    return Vec(ptrty.dtype) if isinstance(idxty, Pos) else ptrty.dtype


# at/atc are typed and lowered directly (see _VecArith for why not an inlined overload).
@intrinsic
def at(typingctx, t, i):
    """A tensor operand (a pointer, see :func:`pointers`) at flat element ``i``: ``t[i]``
    for an int, the ``W`` lanes from ``t[i]`` on for a :class:`Pos`. For rows ``i`` is a pair
    ``(flat index, channel)``."""
    if not (isinstance(t, types.CPointer) and isinstance(t.dtype, types.Float)):
        return None
    it = i.types[0] if isinstance(i, types.BaseTuple) else i
    if not _index_ok(it):
        return None

    def codegen(context, builder, sig, args):
        idx = builder.extract_value(args[1], 0) if isinstance(sig.args[1], types.BaseTuple) else args[1]
        return _load(context, builder, sig.args[0], args[0], it, idx)

    return _loaded(t, it)(t, i), codegen


@intrinsic
def atc(typingctx, p, i):
    """A per-channel operand at element ``i``: ``p`` itself for a scalar (a plane has one
    channel); for rows (``i = (flat, c)``) ``p[c]``, or the ``W`` lanes from ``p[c]`` on (``p``
    tiled: ``p[k] == p[k % C]`` up to ``C + W``, so the lanes wrap around the channels)."""
    if isinstance(p, types.Number):
        return p(p, i), lambda context, builder, sig, args: args[0]
    if not (isinstance(p, types.CPointer) and isinstance(p.dtype, types.Float)):
        return None
    if not (isinstance(i, types.BaseTuple) and len(i) == 2 and _index_ok(i.types[1])):
        return None
    ct = i.types[1]

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig.args[0], args[0], ct, builder.extract_value(args[1], 1))

    return _loaded(p, ct)(p, i), codegen


LINE_BYTES = 64  # a cache line: non-temporal stores write whole lines only


def span(out, f0, f1):  # type: ignore[no-untyped-def]
    """``(h, e)`` for writing ``out[f0:f1]`` (1D): ``out[h:e]`` is the run of whole cache lines
    that may be streamed, ``h == e`` when there is none."""
    raise NotImplementedError  # only called from numba


def _itemsize(ary: types.Array) -> int:
    return ary.dtype.bitwidth // 8


# The loops below take their sizes (item, vector, cache line) from the array's type, as
# compile-time constants: as run-time values every span paid integer divisions, which on short
# spans (a 64-value plane) cost as much as the arithmetic.


@overload(span, inline="always")
def _span_ov(out, f0, f1):
    isz = _itemsize(out)
    per = LINE_BYTES // isz

    def impl(out, f0, f1):  # type: ignore[no-untyped-def]
        h = min(f1, f0 + ((-(address(out) + f0 * isz)) % LINE_BYTES) // isz)
        e = h + (f1 - h) // per * per
        return h, e

    return impl


def store_span(out, f0, f1, off, stream, f, args):  # type: ignore[no-untyped-def]
    """``out[i - off] = f(args, i)`` for ``i`` in ``f0:f1`` (``out`` 1D; ``off`` 0 when ``out`` is
    the flat output tensor, ``f0`` for a buffer holding one span; ``args`` the formula's operands,
    tensors as pointers, see :func:`pointers`), ``W`` lanes at a time (``f``
    gets a :class:`Pos`) and the ends one by one; with ``stream``, the whole cache lines go out
    as non-temporal stores. ``f`` must be an ``inline="always"`` jitted function: it is spliced
    into the loop (a call per vector would cost more than the arithmetic)."""
    raise NotImplementedError  # only called from numba


def store_rows(out, m0, m1, ch, stream, f, args):  # type: ignore[no-untyped-def]
    """``out[m*ch + c] = f(args, (m*ch + c, c))`` for rows ``m0:m1`` of ``ch`` channels (``out``
    the flat rows), ``W`` lanes at a time with the lanes wrapping across rows (per-channel
    operands must be tiled, see :func:`atc`); ``stream``, ``f`` and ``args`` as in :func:`store_span`."""
    raise NotImplementedError  # only called from numba


def _inlined(f: types.Type, args: types.Type):  # type: ignore[no-untyped-def]
    if not isinstance(f, types.Dispatcher):
        raise TypeError("store_span/store_rows take a jitted formula")
    if isinstance(args, types.BaseTuple) and any(isinstance(t, types.Array) for t in args.types):
        raise TypeError("store_span/store_rows take the formula's operands as pointers (see pointers)")
    return f.dispatcher


@overload(store_span, inline="always")
def _store_span_ov(out, f0, f1, off, stream, f, args):
    fn = _inlined(f, args)
    w = WIDTH_BYTES // _itemsize(out)

    def impl(out, f0, f1, off, stream, f, args):  # type: ignore[no-untyped-def]
        j0 = f0 - off
        j1 = f1 - off
        if stream:
            h, e = span(out, j0, j1)
        else:
            h = j0
            e = j0 + (j1 - j0) // w * w
        for j in range(h, e, w):
            v = fn(args, vpos(j + off))
            if stream:
                vstream(out, j, v)
            else:
                vstore(out, j, v)
        for k in range(h - j0 + j1 - e):  # the head and the tail, one element at a time
            j = j0 + k if j0 + k < h else e + k - (h - j0)
            out[j] = fn(args, j + off)

    return impl


@overload(store_rows, inline="always")
def _store_rows_ov(out, m0, m1, ch, stream, f, args):
    fn = _inlined(f, args)
    w = WIDTH_BYTES // _itemsize(out)

    def impl(out, m0, m1, ch, stream, f, args):  # type: ignore[no-untyped-def]
        f0 = m0 * ch
        f1 = m1 * ch
        if stream:
            h, e = span(out, f0, f1)
        else:
            h = f0
            e = f0 + (f1 - f0) // w * w
        c = 0
        for i in range(f0, h):
            out[i] = fn(args, (i, c))
            c = c + 1 if c + 1 < ch else 0
        for i in range(h, e, w):
            v = fn(args, (vpos(i), vpos(c)))
            if stream:
                vstream(out, i, v)
            else:
                vstore(out, i, v)
            c += w
            if c >= ch:
                c -= ch
                while c >= ch:  # fewer channels than lanes
                    c -= ch
        for i in range(e, f1):
            out[i] = fn(args, (i, c))
            c = c + 1 if c + 1 < ch else 0

    return impl
