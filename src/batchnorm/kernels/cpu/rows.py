"""The rows kernels.

They see the tensors as ``M`` rows of ``P`` columns, each channel ``rep`` consecutive columns:
channels_last ``(N, *S, C)`` and 2D ``(N, C)`` are ``(N * L, C)`` with ``rep = 1``; contiguous
``(N, C, *S)`` with small planes is ``(N, C * L)`` with ``rep = L`` (a plane is then too short for
the planes kernels' per-plane loop, see ``ROWS_MAX_PLANE`` in :mod:`batchnorm.kernels.cpu`). They
index the flat tensors ``(m * P + j, j)``; per-channel values are tiled to ``P + W`` column
entries (:func:`~.base._tiled`) so that a vector of ``W`` lanes starting at any column reads
consecutive entries. Threads take blocks of rows and keep per-block partial sums (shifted by a
per-channel pilot mean, so the one-pass variance has no cancellation; summed in the input dtype
over :data:`~.base._RBLK` rows, then in float64), merged in float64.
"""

from __future__ import annotations

from numba import njit, prange

from .base import _INL, _JIT, _RBLK, _as, _eblocks, _flat, _tiled
from .formulas import _dx_rows, _forward_operands, _g_rows, _gate_operands, _with_input_grad, _y_rows
from .sums import _g_block_sums, _moment_block_sums


def _row_blocks(m: int, threads: int) -> int:
    """Blocks of rows that the reductions split ``m`` rows into: at least 32 rows each, since a
    block's partial sums cost as much as 32 rows' arithmetic (measured with 4096-column rows:
    blocks of 8 rows took the training forward 1.6-2x longer)."""
    return max(1, min(m // 32, 8 * threads))


@njit(**_INL)
def _row_forward(x, r, has_r, mean, scale, shift, code, slope, rep):
    """The forward's :class:`~.formulas.Operands` for flat rows (per-channel values tiled)."""
    return _forward_operands(_flat(x), _flat(r), has_r, _tiled(mean, x, rep), _tiled(scale, x, rep),
                             _tiled(shift, x, rep), code, _as(x, slope), _as(x, 0))


@njit(**_INL)
def _row_gate(dy, x, r, has_r, mean, scale, shift, code, slope, rep):
    """The gradient's :class:`~.formulas.Operands` for flat rows (per-channel values tiled)."""
    return _gate_operands(_flat(dy), _flat(x), _flat(r), has_r, _tiled(mean, x, rep), _tiled(scale, x, rep),
                          _tiled(shift, x, rep), code, _as(x, slope), _as(x, 0))


@njit(**_JIT)
def _rows_moments(x, pilot, nb, psum, psq, rep):
    """Per block of rows: float64 per-column sums of ``x - pilot`` and ``(x - pilot)**2``."""
    M, P = x.shape
    gate = _row_gate(x, x, x, False, pilot, pilot, pilot, 0, 0.0, rep)
    for bi in prange(nb):
        _moment_block_sums(gate, P, bi * M // nb, (bi + 1) * M // nb, bi, psum, psq)


@njit(**_JIT)
def _act_apply_rows(x, r, has_r, mean, scale, shift, code, slope, y, stream, rep):
    """``y = act((x - mean) * scale + shift [+ r])`` on ``(M, P)`` rows."""
    M, P = x.shape
    nb = _eblocks(M, P)
    ops = _row_forward(x, r, has_r, mean, scale, shift, code, slope, rep)
    yf = _flat(y)
    for bi in prange(nb):
        _y_rows(yf, bi * M // nb, (bi + 1) * M // nb, P, stream, ops)


@njit(**_JIT)
def _act_bwd_reduce_rows(dy, x, r, has_r, mean, scale, shift, code, slope, nb, psum, pdot, rep):
    """Per block of rows: float64 per-column ``sum(g)`` and ``sum(g * (x - mean))``,
    ``g = dy * act'(z)``."""
    M, P = x.shape
    gate = _row_gate(dy, x, r, has_r, mean, scale, shift, code, slope, rep)
    for bi in prange(nb):
        _g_block_sums(gate, P, bi * M // nb, (bi + 1) * M // nb, bi, psum, pdot)


@njit(**_JIT)
def _act_bwd_elemt_rows(dy, x, r, has_r, mean, scale, shift, code, slope, g_scale, x_scale, dx_shift,
                        need_dx, need_dr, dx, dr, stream, rep):
    """``dx = g * g_scale + (x - mean) * x_scale + dx_shift`` and ``dr = g`` on ``(M, P)`` rows."""
    M, P = x.shape
    nb = _eblocks(M, P)
    gate = _row_gate(dy, x, r, has_r, mean, scale, shift, code, slope, rep)
    dx_ops = _with_input_grad(gate, _tiled(g_scale, x, rep), _tiled(x_scale, x, rep), _tiled(dx_shift, x, rep))
    dxf = _flat(dx)
    drf = _flat(dr)
    for bi in prange(nb):
        m1 = (bi + 1) * M // nb
        # with both outputs, _RBLK rows at a time: the second pass finds them in cache
        step = _RBLK if need_dx and need_dr else M
        for m0 in range(bi * M // nb, m1, step):
            if need_dx:
                _dx_rows(dxf, m0, min(m0 + step, m1), P, stream, dx_ops)
            if need_dr:
                _g_rows(drf, m0, min(m0 + step, m1), P, stream, gate)
