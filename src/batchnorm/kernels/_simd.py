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

Numba's on-disk cache keys a kernel on its own source file only: after editing this module,
delete ``src/batchnorm/kernels/__pycache__/*.nb[ic]`` so that the kernels recompile.
"""

from __future__ import annotations

import operator
import warnings

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.datamodel import models
from numba.core.errors import NumbaIRAssumptionWarning
from numba.core.extending import intrinsic, overload, register_model
from numba.core.imputils import lower_builtin
from numba.core.typing.templates import AbstractTemplate, infer_global, signature
from numba.np.numpy_support import as_dtype

WIDTH_BYTES = 32

# Inlining a formula with branches into these loops trips a pedantic internal check of numba's
# SSA pass ("variable ... is not in scope"); the compiled code is right (the kernels are tested
# against the float64 reference), so the check's warning is silenced for these helpers only.
warnings.filterwarnings("ignore", message=r"variable '_(store_span|store_rows|lanewise)_ov",
                        category=NumbaIRAssumptionWarning)


class Vec(types.Type):
    """``count`` lanes of a float dtype in one LLVM vector: by default ``W`` (``W * itemsize ==
    32``); :func:`widen` makes float64 vectors with the lanes of a float32 one."""

    def __init__(self, dtype: types.Float, count: int | None = None) -> None:
        self.dtype = dtype
        self.count = WIDTH_BYTES // (dtype.bitwidth // 8) if count is None else count
        super().__init__(name=f"Vec({dtype} x {self.count})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # type: ignore[no-untyped-def]
        elt = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elt, fe_type.count))


class Pos(types.Type):
    """The index of a vector's first lane (an ``intp`` at run time)."""

    def __init__(self) -> None:
        super().__init__(name="Pos")


pos_type = Pos()


@register_model(Pos)
class _PosModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # type: ignore[no-untyped-def]
        super().__init__(dmm, fe_type, ir.IntType(64))


_FLAGS = ("reassoc", "contract", "arcp", "nsz")  # the kernels' fastmath set (no nnan/ninf)


@intrinsic
def vpos(typingctx, i):
    """A :class:`Pos` at element ``i``."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[0], sig.args[0], types.intp)

    return pos_type(i), codegen


def _lane_count(ary: types.Array) -> int:
    return WIDTH_BYTES // (ary.dtype.bitwidth // 8)


def _vector_ptr(context, builder, aryty, ary_val, idx_vals, idx_types):  # type: ignore[no-untyped-def]
    """Pointer to ``ary[idx]`` as a pointer to ``W`` lanes."""
    ary = context.make_array(aryty)(context, builder, ary_val)
    idx = [context.cast(builder, v, t, types.intp) for v, t in zip(idx_vals, idx_types)]
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
    vt = ir.VectorType(context.get_data_type(aryty.dtype), _lane_count(aryty))
    return builder.bitcast(ptr, vt.as_pointer())


@intrinsic
def pointers(typingctx, tup):
    """``tup`` with every array replaced by a pointer to its data. A formula that reads its
    operands through pointers costs no reference counting: numba increfs an array taken out of a
    tuple, and inside a loop with branches its pruning pass leaves those atomics in (measured:
    the normalize loop 2x slower).

    **Lifetime rule.** A pointer does not hold its array: numba frees an array right after the
    last statement that reads the array's *variable*, which is the one taking the pointer when
    only the pointer is read later. A ``prange`` loop then reads freed memory, garbage once an
    allocation reuses it (the planes inference kernel's per-channel values: NaN or ~1e7 outputs
    with two threads). So take pointers only of

    * the arguments of the compiled (not inlined) function that takes them: its caller holds
      them for the call (an ``inline="always"`` helper's parameters are its caller's variables,
      so inlined helpers take no pointers: they receive them), or
    * arrays passed to :func:`keep` after the last use of their pointers (after the loop that
      reads them; at the end of the iteration for an array made in the loop body).

    ``tests/kernels/test_cpu_regressions.py`` checks the rule on the CPU backend's source and runs
    the kernels with glibc poisoning freed memory."""
    if not isinstance(tup, types.BaseTuple):
        return None
    if any(isinstance(t, types.Array) and t.layout != "C" for t in tup.types):
        return None  # flat indexing through the pointer needs C-contiguous arrays
    outs = [types.CPointer(t.dtype) if isinstance(t, types.Array) else t for t in tup.types]
    retty = types.Tuple(outs)

    def codegen(context, builder, sig, args):
        vals = []
        for k, t in enumerate(sig.args[0].types):
            v = builder.extract_value(args[0], k)
            if isinstance(t, types.Array):
                v = context.make_array(t)(context, builder, v).data
            vals.append(v)
        return context.make_tuple(builder, sig.return_type, vals)

    return retty(tup), codegen


@intrinsic
def keep(typingctx, obj):
    """Hold ``obj`` (an array or a tuple of them) alive up to this point: compiles to nothing,
    but it is a use of the variable, so numba frees the arrays only after it (see :func:`pointers`)."""
    if not isinstance(obj, (types.Array, types.BaseTuple)):
        return None

    def codegen(context, builder, sig, args):
        return context.get_dummy_value()

    return types.void(obj), codegen


@intrinsic
def widen(typingctx, v):
    """The lanes of the vector ``v`` in float64 (a float32 vector gives twice its 32 bytes): a
    reduction adds its input-dtype accumulators to float64 ones without a horizontal sum."""
    if not isinstance(v, Vec):
        return None
    wt = Vec(types.float64, v.count)

    def codegen(context, builder, sig, args):
        if sig.args[0].dtype == types.float64:
            return args[0]
        return builder.fpext(args[0], ir.VectorType(ir.DoubleType(), wt.count))

    return wt(v), codegen


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


@intrinsic
def address(typingctx, ary):
    """The address of an array's first element."""
    if not isinstance(ary, types.Array):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return types.intp(ary), codegen


@intrinsic
def voidptr(typingctx, addr):
    """An integer address (``Tensor.data_ptr()``) as a ``void*``, for ``numba.carray``."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(addr), codegen


def _splat(context, builder, val, fromty, vecty: Vec):  # type: ignore[no-untyped-def]
    """``val`` (a scalar of ``fromty``) in every lane of ``vecty``."""
    s = context.cast(builder, val, fromty, vecty.dtype)
    vt = ir.VectorType(s.type, vecty.count)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32),
                                  vecty.count), [0] * vecty.count))


def _operands(context, builder, sig, args):  # type: ignore[no-untyped-def]
    """Both operands as vectors of the result's type."""
    vecty = sig.return_type
    return [a if isinstance(t, Vec) else _splat(context, builder, a, t, vecty) for a, t in zip(args, sig.args)]


def _vec_of(*tys: types.Type) -> Vec | None:
    """The vector type of a vector/scalar operation, or ``None`` when it is not one."""
    vecs = [t for t in tys if isinstance(t, Vec)]
    if not vecs or any(not isinstance(t, (Vec, types.Number)) for t in tys):
        return None
    if any(v != vecs[0] for v in vecs):
        return None
    return vecs[0]


# The vector operators are typed by a template and lowered straight to LLVM (no numba function
# and no IR inlining per use): inlining a tiny overload at every ``+`` of every formula copy
# made numba's front end (IR deep copies and re-analysis) most of the kernels' compile time.
class _VecArith(AbstractTemplate):
    def generic(self, args, kws):  # type: ignore[no-untyped-def]
        vt = _vec_of(*args) if len(args) == 2 and not kws else None
        return None if vt is None else signature(vt, *args)


def _lower_binary(pyop, method: str) -> None:  # type: ignore[no-untyped-def]
    infer_global(pyop)(type(f"_VecArith_{pyop.__name__}", (_VecArith,), {"key": pyop}))

    def lower(context, builder, sig, args):  # type: ignore[no-untyped-def]
        x, y = _operands(context, builder, sig, args)
        return getattr(builder, method)(x, y, flags=_FLAGS)

    for tys in ((Vec, Vec), (Vec, types.Number), (types.Number, Vec)):
        lower_builtin(pyop, *tys)(lower)


for _pyop, _method in ((operator.add, "fadd"), (operator.iadd, "fadd"), (operator.sub, "fsub"),
                       (operator.isub, "fsub"), (operator.mul, "fmul"), (operator.imul, "fmul")):
    _lower_binary(_pyop, _method)


def _make_where(predicate: str, pyop):  # type: ignore[no-untyped-def]
    """``where(z, t, a, b) = a if z <predicate> t else b``, for scalars and lane by lane for
    vectors (an ordered compare: false for NaN, as in Python)."""

    @intrinsic
    def where(typingctx, z, t, a, b):
        vt = _vec_of(z, t, a, b)
        if vt is not None:
            def codegen(context, builder, sig, args):
                vz, vt_, va, vb = _operands(context, builder, sig, args)
                return builder.select(builder.fcmp_ordered(predicate, vz, vt_), va, vb)

            return vt(z, t, a, b), codegen
        if not all(isinstance(x, types.Number) for x in (z, t, a, b)):
            return None
        rt = typingctx.unify_types(a, b)
        ct = typingctx.unify_types(z, t)  # compared in one type, as Python compares mixed numbers

        def codegen_scalar(context, builder, sig, args):
            cz = context.cast(builder, args[0], sig.args[0], ct)
            ctt = context.cast(builder, args[1], sig.args[1], ct)
            cond = context.get_function(pyop, signature(types.boolean, ct, ct))(builder, [cz, ctt])
            va = context.cast(builder, args[2], sig.args[2], sig.return_type)
            vb = context.cast(builder, args[3], sig.args[3], sig.return_type)
            return builder.select(cond, va, vb)

        return rt(z, t, a, b), codegen_scalar

    return where


where_gt = _make_where(">", operator.gt)
where_le = _make_where("<=", operator.le)
where_lt = _make_where("<", operator.lt)
where_gt.__doc__ = "``a if z > t else b`` for scalars and, lane by lane, for vectors."
where_le.__doc__ = "``a if z <= t else b`` for scalars and, lane by lane, for vectors."
where_lt.__doc__ = "``a if z < t else b`` for scalars and, lane by lane, for vectors."


@intrinsic
def _lane(typingctx, v, k):
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], sig.args[1], types.int32))

    return v.dtype(v, k), codegen


@intrinsic
def _with_lane(typingctx, v, k, s):
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[2], sig.args[2], sig.args[0].dtype)
        return builder.insert_element(args[0], s, context.cast(builder, args[1], sig.args[1], types.int32))

    return v(v, k, s), codegen


@intrinsic
def vfill(typingctx, v):
    """A vector with the float ``v`` in every lane (32 bytes of ``v``'s type)."""
    if not isinstance(v, types.Float):
        return None
    vt = Vec(v)

    def codegen(context, builder, sig, args):
        return _splat(context, builder, args[0], sig.args[0], vt)

    return vt(v), codegen


@intrinsic
def lanes(typingctx, v):
    """The number of lanes of a vector of ``v``'s float type (a compile-time constant)."""
    if not isinstance(v, types.Float):
        return None
    n = WIDTH_BYTES // (v.bitwidth // 8)

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, n)

    return types.intp(v), codegen


@intrinsic
def hsum(typingctx, v):
    """The sum of a vector's lanes, in float64 (lane by lane, in order)."""
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        dbl = ir.DoubleType()
        total = ir.Constant(dbl, 0.0)
        for k in range(sig.args[0].count):
            lane = builder.extract_element(args[0], ir.Constant(ir.IntType(32), k))
            if lane.type != dbl:
                lane = builder.fpext(lane, dbl)
            total = builder.fadd(total, lane)
        return total

    return types.float64(v), codegen


def lanewise(f, z, a, b):  # type: ignore[no-untyped-def]
    """``f(z, a, b)`` for a scalar ``z``; for a vector, ``f`` on each lane."""
    raise NotImplementedError  # only called from numba


@overload(lanewise, inline="always")
def _lanewise_ov(f, z, a, b):
    if isinstance(z, Vec):
        n = z.count

        def impl(f, z, a, b):
            out = z
            for k in range(n):
                out = _with_lane(out, k, f(_lane(z, k), a, b))
            return out

        return impl
    if isinstance(z, types.Float):
        ctor = as_dtype(z).type  # the result in z's dtype, as each lane of a vector is

        return lambda f, z, a, b: ctor(f(z, a, b))
    return None


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


@intrinsic
def pos_index(typingctx, p):
    """A :class:`Pos` as its ``intp`` index."""
    if not isinstance(p, Pos):
        return None

    def codegen(context, builder, sig, args):
        return args[0]

    return types.intp(p), codegen


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
