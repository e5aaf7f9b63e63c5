"""The compiled entries: one call from Python per op, tensors passed by address."""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit
from torch import Tensor

from .base import _INL, _NJ
from .drivers import _apply_planes, _apply_rows, _bwd_planes, _bwd_rows, _inverse_std, _train_planes, _train_rows
from .primitives import decorated, voidptr

# ========================================================== entries: tensors by address
#
# Python passes each tensor as its address (``Tensor.data_ptr()``) and the drivers see numpy
# arrays built over it here: after a large kernel has flushed the caches, ``Tensor.numpy()``
# and the reshapes around it cost tens of microseconds each in Python, ``data_ptr()`` a few.
# ``a``: one int64 array of the addresses followed by ``N, C, L`` (numba types an array in C; a
# tuple of ints and a dtype class cost ~12 us of Python typing per call); ``rep = 0``: planes
# ``(N, C, L)``, else rows ``(N * L / rep, C * rep)`` (see :mod:`.rows`); ``proto`` an empty array
# of the dtype of every tensor (input, outputs, per-channel vectors, statistics); address 0 =
# no such vector.


@njit(**_INL)
def _tensor(addr, shape, dt):
    return numba.carray(voidptr(addr), shape, dt)


@njit(**_INL)
def _channel(addr, c, dt, fill):
    """A per-channel vector, or ``fill`` everywhere for address 0 (no weight, no bias)."""
    if addr == 0:
        return np.full(c, fill, dt)
    return _tensor(addr, c, dt)


@njit(**_NJ)
def _train(a, proto, rep, has_r, eps, code, slope, momentum, update, skip, stream, fused, nb):
    """Training forward; ``a = (x, r, y, weight, bias, out, running_mean, running_var, N, C, L)``
    (see :func:`~.drivers._finish` for ``out``, ``skip`` and the result; without ``update`` the
    running statistics' addresses are unused)."""
    x_at, r_at, y_at, w_at, b_at, out_at, rm_at, rv_at, N, C, L = a
    dt = proto.dtype
    w, b = _channel(w_at, C, dt, 1.0), _channel(b_at, C, dt, 0.0)
    out = _tensor(out_at, (3, 1, C), dt)
    rm, rv = _tensor(rm_at, C, dt), _tensor(rv_at, C, dt)
    if rep:
        s = (N * L // rep, C * rep)
        x, r, y = _tensor(x_at, s, dt), _tensor(r_at, s, dt), _tensor(y_at, s, dt)
        return _train_rows(x, r, has_r, w, b, eps, code, slope, y, out, rm, rv, momentum, update, skip, stream, nb,
                           rep)
    else:
        dims = (N, C, L)
        x, r, y = _tensor(x_at, dims, dt), _tensor(r_at, dims, dt), _tensor(y_at, dims, dt)
        return _train_planes(x, r, has_r, w, b, eps, code, slope, y, out, rm, rv, momentum, update, skip, stream,
                             fused)


@njit(**_NJ)
def _apply(a, proto, rep, has_r, eps, code, slope, stream):
    """Normalization with given statistics; ``a = (x, r, y, mean, var, weight, bias, N, C, L)``
    (``invstd`` from ``var`` and ``eps`` by :func:`~.drivers._inverse_std`)."""
    x_at, r_at, y_at, mean_at, var_at, w_at, b_at, N, C, L = a
    dt = proto.dtype
    mean, inv = _channel(mean_at, C, dt, 0.0), _inverse_std(_channel(var_at, C, dt, 1.0), eps)
    w, b = _channel(w_at, C, dt, 1.0), _channel(b_at, C, dt, 0.0)
    if rep:
        s = (N * L // rep, C * rep)
        x, r, y = _tensor(x_at, s, dt), _tensor(r_at, s, dt), _tensor(y_at, s, dt)
        _apply_rows(x, r, has_r, mean, inv, w, b, code, slope, y, stream, rep)
    else:
        dims = (N, C, L)
        x, r, y = _tensor(x_at, dims, dt), _tensor(r_at, dims, dt), _tensor(y_at, dims, dt)
        _apply_planes(x, r, has_r, mean, inv, w, b, code, slope, y, stream)


@njit(**_NJ)
def _bwd(a, proto, rep, has_r, code, slope, eps, train, need_dx, need_dr, stream, fused, nb):
    """Backward; ``a = (dy, x, r, dx, dr, mean, var, weight, bias, sums, N, C, L)``: ``var`` the
    training forward's batch variance (``train``) or the given one; ``sums`` = ``(2, C)``
    (``sum(g)``, ``sum(g * xhat)``); absent outputs' addresses are unused."""
    dy_at, x_at, r_at, dx_at, dr_at, mean_at, var_at, w_at, b_at, sums_at, N, C, L = a
    dt = proto.dtype
    mean, inv = _channel(mean_at, C, dt, 0.0), _inverse_std(_channel(var_at, C, dt, 1.0), eps)
    w, b = _channel(w_at, C, dt, 1.0), _channel(b_at, C, dt, 0.0)
    sums = _tensor(sums_at, (2, C), dt)
    if rep:
        s = (N * L // rep, C * rep)
        dy, x, r = _tensor(dy_at, s, dt), _tensor(x_at, s, dt), _tensor(r_at, s, dt)
        dx, dr = _tensor(dx_at, s, dt), _tensor(dr_at, s, dt)
        _bwd_rows(dy, x, r, has_r, mean, inv, w, b, code, slope, train, need_dx, need_dr, dx, dr, sums[0], sums[1],
                  stream, nb, rep)
    else:
        dims = (N, C, L)
        dy, x, r = _tensor(dy_at, dims, dt), _tensor(x_at, dims, dt), _tensor(r_at, dims, dt)
        dx, dr = _tensor(dx_at, dims, dt), _tensor(dr_at, dims, dt)
        _bwd_planes(dy, x, r, has_r, mean, inv, w, b, code, slope, train, need_dx, need_dr, dx, dr, sums[0],
                    sums[1], stream, fused)


# ------------------------------------------------------------------ the Python side of the entries


def launch_pool() -> None:
    """Start numba's thread pool now, without letting it change torch's thread count.

    Numba's OpenMP layer can share the OpenMP runtime with torch; starting its pool sets that
    runtime's thread count, which torch then reports (and uses) as its own.
    """
    before = torch.get_num_threads()
    try:
        from numba.np.ufunc import parallel as _parallel

        _parallel._launch_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
PROTOTYPES = {t: np.empty(0, d) for t, d in NUMPY_DTYPES.items()}  # the entries take the dtype from an array


def addresses(*values: int) -> np.ndarray:
    """The entries' ``a``: addresses and sizes as one int64 array."""
    return np.array(values, dtype=np.int64)


def dims_of(x: Tensor) -> tuple[int, int, int]:
    """``(N, C, L)``: the kernels see planes ``(N, C, L)`` or rows ``(N * L / rep, C * rep)``."""
    n, c = x.shape[0], x.shape[1]
    return n, c, (x.numel() // (n * c) if n else 0)


def channel_vector(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-channel tensor contiguous in ``x``'s dtype (``None`` stays ``None``): one dtype for
    every tensor a kernel sees, so each compiles once per input dtype; for float32/float64 input
    it is the statistics' dtype, which the reference rounds parameters to as well."""
    if t is None or (t.dtype == x.dtype and t.is_contiguous()):
        return t
    return t.to(x.dtype).contiguous()


def address(t: Tensor | None, absent: int = 0) -> int:
    """``t``'s data address, ``absent`` for ``None``."""
    return absent if t is None else t.data_ptr()


#: The compiled driver each op calls.
ENTRY_OF = {"forward_train": "_train", "forward_train_act": "_train", "forward_apply": "_apply",
            "forward_apply_act": "_apply", "backward_train": "_bwd", "backward_apply": "_bwd",
            "backward_train_act": "_bwd", "backward_apply_act": "_bwd"}
ENTRIES = {"_train": _train, "_bwd": _bwd, "_apply": _apply}


def sample_args(entry: str, dtype: str) -> tuple:
    """Arguments of the Python types the wrappers above pass to ``entry`` (numba types each
    call by them, so these give the one signature per entry and dtype that the wrappers use)."""
    a, proto = addresses(0), PROTOTYPES[getattr(torch, dtype)]
    if entry == "_train":
        return a, proto, 0, False, 1e-5, 0, 0.0, 0.0, False, False, False, False, 1
    if entry == "_apply":
        return a, proto, 0, False, 1e-5, 0, 0.0, False
    return a, proto, 0, False, 0, 0.0, 1e-5, True, True, False, False, False, 1


def entry_signature(entry: str, dtype: str) -> tuple:
    """The numba types of :func:`sample_args`: the signature ``entry`` is compiled with."""
    disp = ENTRIES[entry]
    return tuple(disp.typeof_pyval(v) for v in sample_args(entry, dtype))


decorated()  # the last kernel module: numba's cache directory back (see .primitives)
