"""The numba vector primitives of ``batchnorm.kernels.cpu.simd`` against numpy and Python semantics.

The kernels' tests cover these through the batch-norm formulas; these check the primitives one by
one, including what the kernels do not use today (mixed scalar types, NaN in a select)."""

import math

import numpy as np
import pytest

numba = pytest.importorskip("numba")
simd = pytest.importorskip("batchnorm.kernels.cpu.simd")


@numba.njit
def _where_scalar(z, t, a, b):
    return simd.where_gt(z, t, a, b), simd.where_le(z, t, a, b), simd.where_lt(z, t, a, b)


@pytest.mark.parametrize("z", [-1.5, 0.0, 2.0, math.nan])
def test_where_on_scalars_is_pythons_conditional(z):
    # same and mixed float types: compared as Python compares them (NaN: every comparison false)
    for zz, t in ((np.float32(z), np.float32(0.0)), (np.float32(z), 0.0), (z, np.float32(0.0)), (z, 0.0)):
        expected = (1.0 if zz > t else -1.0, 1.0 if zz <= t else -1.0, 1.0 if zz < t else -1.0)
        assert _where_scalar(zz, t, 1.0, -1.0) == expected


@numba.njit
def _vector_formula(x, y, out):
    """``out[:W] = where(x > y, x * y + 1, x - y)``, ``out[W:2W] = where(x <= 0, 0, x)`` on the
    first ``W`` lanes, read through pointers with ``at`` (flat index) and ``atc`` (a scalar and a
    tiled per-channel array read at a ``(flat, channel)`` pair)."""
    p = simd.pointers((x, y))
    v = simd.at(p[0], simd.vpos(0))
    w = simd.at(p[1], (simd.vpos(0), simd.vpos(0)))
    simd.vstore(out, 0, simd.where_gt(v, w, v * w + simd.atc(1.0, 0), v - w))
    n = simd.lanes(x[0])
    simd.vstore(out, n, simd.where_le(v, x.dtype.type(0), x.dtype.type(0), v))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_operators_and_selects_match_numpy(dtype):
    rng = np.random.default_rng(0)
    w = 32 // np.dtype(dtype).itemsize
    x = rng.standard_normal(w).astype(dtype)
    y = rng.standard_normal(w).astype(dtype)
    x[1] = np.nan
    out = np.zeros(2 * w, dtype)
    _vector_formula(x, y, out)
    with np.errstate(invalid="ignore"):
        expected = np.concatenate([np.where(x > y, x * y + 1, x - y), np.where(x <= 0, 0, x)]).astype(dtype)
    np.testing.assert_allclose(out, expected, rtol=2 * np.finfo(dtype).eps, equal_nan=True)


@numba.njit
def _widened_sum(x):
    """``x`` (W lanes of its dtype) added twice to float64 lanes through :func:`widen`; ``keep`` of
    the input is a no-op that only holds it."""
    p = simd.pointers((x,))
    v = simd.at(p[0], simd.vpos(0))
    acc = simd.widen(simd.vfill(x.dtype.type(0)))
    acc += simd.widen(v)
    acc += simd.widen(v)
    simd.keep(x)
    return simd.hsum(acc)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_widen_adds_lanes_in_float64(dtype):
    w = 32 // np.dtype(dtype).itemsize
    # lanes whose total needs more bits than float32 has: exact only if summed in float64
    x = (np.arange(w) + 1.0 + 2.0 ** -23 * np.arange(w)).astype(dtype)
    assert _widened_sum(x) == 2 * float(np.sum(x.astype(np.float64)))
