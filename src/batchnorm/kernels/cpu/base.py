"""The numba options every CPU kernel compiles with, and the small array functions they share.

``inline="always"`` splices a function into its caller's numba IR before compilation, so a kernel
compiles to the same loops as if they were written out in it, and arguments the caller passes as
constants fold away.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .primitives import CACHE, decorating, pointers

decorating()  # the first kernel module: numba's cache directory for this mode (see .primitives)

# Reassociation lets LLVM vectorize the reductions; no "nnan"/"ninf": NaN/inf must propagate
# (the layers detect non-finite batches from the statistics).
_FM = {"reassoc", "contract", "arcp", "nsz"}
# Numpy's error model: a division by zero gives inf/NaN as in torch (IEEE), not Python's
# ZeroDivisionError (``eps = 0`` with a zero variance); it also drops the divisor checks.
_NJ = {"cache": CACHE, "error_model": "numpy"}
_JIT = {**_NJ, "parallel": True, "fastmath": _FM, "nogil": True}
# Planes: values summed in input-dtype vectors before they are added to float64 ones (a multiple
# of two vectors of float32); rows: rows summed in the input dtype before a float64 flush.
_VBLK = 512
_RBLK = 64

_INL = {**_NJ, "fastmath": _FM, "inline": "always"}

# Each formula's loop is compiled once per signature in these (not inlined) functions and
# called once per plane or block of rows, with flat outputs and pointer operands (no reference
# counting): inlined at every call site, the backward alone took 150 s to compile.
_LINE = {**_NJ, "fastmath": _FM}


@njit(**_INL)
def _as(x, v):
    """``v`` rounded to ``x``'s dtype (a kernel's per-channel constants are rounded once)."""
    return x.dtype.type(v)


@njit(**_INL)
def _flat(t):
    return t.reshape(t.size)


@njit(**_INL)
def _eblocks(M, P):
    """Blocks for the elementwise kernels over ``M`` units (rows, planes) of ``P`` values: at
    least ~1024 values each, at most 64."""
    return max(1, min(M, M * P // 1024, 64))


@njit(**_INL)
def _ptr(t):
    """A pointer to the data of the C-contiguous ``t``, read with ``at`` at flat indices: no view
    and no reference count per plane (a plane's views cost more than its arithmetic when it is
    small: (128, 64, 8, 8) normalized in 3x the time of the flat loop). ``t`` must outlive the
    pointer: an argument of the compiled kernel, or an array it passes to ``keep`` after the
    pointer's last use (the lifetime rule of :func:`~.pointers.pointers`)."""
    return pointers((_flat(t),))[0]


@njit(**_NJ)
def _tiled(v, x, rep):
    """Per-channel ``v`` in ``x``'s dtype as column entries (channel ``c`` at columns
    ``c * rep .. c * rep + rep - 1``), repeated to ``P + W`` entries (``W`` lanes of 32 bytes)."""
    p = v.shape[0] * rep
    out = np.empty(p + 32 // x.itemsize, dtype=x.dtype)
    # no division per entry: ``v[(k % p) // rep]`` took 4 us per 1000 columns (a kernel call
    # tiles 3 to 9 vectors: 49 us at 4000 columns), this 0.4 us
    if rep == 1:
        out[:p] = v
    else:
        k = 0
        for c in range(v.shape[0]):
            for _ in range(rep):
                out[k] = v[c]
                k += 1
    for k in range(p, out.shape[0]):  # the wrap: out[k] == out[k % p]
        out[k] = out[k - p]
    return out


@njit(**_NJ)
def _fold(ps, rep):
    """Per-column partial sums ``(nb, P)`` to per-channel ones ``(nb, P // rep)``."""
    if rep == 1:
        return ps
    nb, p = ps.shape
    out = np.zeros((nb, p // rep))
    for j in range(nb):
        for k in range(p):
            out[j, k // rep] += ps[j, k]
    return out

