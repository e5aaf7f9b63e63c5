"""The 32-byte vector type of the numba kernels (see :mod:`.simd`): :class:`Vec`, the index
:class:`Pos` of a vector's first lane, arithmetic and selects on vectors and scalars, and the lane
operations a reduction needs (:func:`vfill`, :func:`lanes`, :func:`hsum`, :func:`widen`)."""

from __future__ import annotations

import operator
import warnings

from llvmlite import ir
from numba import types
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


@intrinsic
def pos_index(typingctx, p):
    """A :class:`Pos` as its ``intp`` index."""
    if not isinstance(p, Pos):
        return None

    def codegen(context, builder, sig, args):
        return args[0]

    return types.intp(p), codegen

