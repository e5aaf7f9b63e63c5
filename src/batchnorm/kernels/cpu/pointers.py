"""Raw pointers for the numba kernels: an array's data as a typed pointer (:func:`pointers`), the
intrinsic that keeps an array alive while pointers into it are read (:func:`keep`), and an integer
address as a ``void*`` (:func:`voidptr`, for ``numba.carray``). Public numba extension API only
(``intrinsic`` and plain LLVM instructions): the plain-loop kernels use these too."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic


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
    if isinstance(tup, types.BaseNamedTuple):  # a named tuple stays one, with the same fields
        same = all(t == outs[0] for t in outs)
        retty = (types.NamedUniTuple(outs[0], len(outs), tup.instance_class) if same
                 else types.NamedTuple(outs, tup.instance_class))
    else:
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

