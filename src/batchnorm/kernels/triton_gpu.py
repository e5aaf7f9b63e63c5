"""GPU backend: batch norm (and the fused activation/residual ops) as Triton kernels.

Registered when a CUDA device is present, or on the CPU when both ``TRITON_INTERPRET=1`` and
``BATCHNORM_TRITON=1`` are set (Triton's interpreter runs the kernels on CPU tensors; the tests use
it on tiny shapes). Otherwise importing this module raises ``ImportError`` and the dispatcher
skips it.

A dense input (contiguous or channels_last; anything else is copied to contiguous first) is seen
in one of two geometries, like the CPU backend's:

* *planes* (NCHW, ``L > 1``): ``N * C`` contiguous planes of ``L`` values; tiles are
  ``[planes, positions in a plane]``, so every load runs along contiguous memory;
* *rows* (channels_last, or ``(N, C)``): ``N * L`` rows of ``C`` contiguous values; tiles are
  ``[rows, channels]``.

Four kernels cover every op, float32/float16/bfloat16 with float32 statistics (merged in
float64):

* ``_stats``: per-chunk partial sums on a grid that does not depend on ``C``: each channel's
  ``N * L`` positions are split into ``G`` chunks chosen from the SM count, so ``C = 64`` still
  gives a 132-SM H100/H200 about a thousand programs. Forward: ``sum(x - k)``, ``sum((x - k)^2)``
  with ``k`` the channel's first value (a shift that keeps the one-pass variance free of
  cancellation); backward: ``sum(g)``, ``sum(g * (x - mean))`` with ``g = dy * act'(z)``
  recomputed from ``x`` (and the residual).
* ``_finish_fwd`` / ``_finish_bwd``: one small program per block of channels merges the ``(G, C)``
  partials in float64 and writes the op's per-channel outputs: mean, variance, ``1/std`` and the
  count, and moves the running statistics in place (``running=``); or ``dweight``, ``dbias``
  and the backward's two per-channel coefficients.
* ``_apply``: ``y = act((x - mean) * invstd * weight + bias [+ residual])``, or, with
  ``BACKWARD``, ``dx = g * invstd * weight + (x - mean) * kb + kc`` and ``dresidual = g``. It
  walks the tensor last tile first, so the tiles the statistics pass read last are still in L2.

A training forward is three launches (statistics, finish, apply), a backward three, an
inference forward one; nothing else runs on the GPU.

Between the statistics and the elementwise pass the input leaves L2 when the tensor is larger
than L2, so those three launches read it twice from memory (the elementwise pass walks the tensor
backwards so that what is still in L2 is used). A single launch that keeps groups of channels in
L2 between the two passes (tickets, per-group counters and flags) was built and measured on an
H200 on 2026-12-04: 2.5x slower forward and 1.9x slower backward than these three launches at
(256, 64, 56, 56) bfloat16, at every group size, occupancy and L2 policy tried, so it was removed
(docs/results/2026-12-04-gpu-h200.md).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("BATCHNORM_TRITON") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    raise ImportError("triton backend: no CUDA device (set TRITON_INTERPRET=1 BATCHNORM_TRITON=1 to interpret)")

from . import reference as ref  # noqa: E402
from . import register_backend  # noqa: E402
from .common import ACT_CODES, OPS, dense, strided_like  # noqa: E402
from .triton_kernels import _apply, _finish_bwd, _finish_fwd, _stats  # noqa: E402

name = "triton"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------- geometry

#: Bytes of input per statistics tile (4096 bfloat16 or 2048 float32 values: the H200 tile sweeps of
#: 2026-11-30 and 2026-12-04 chose 4096 and 2048 values); elements per elementwise tile.
_STATS_TILE_BYTES, _APPLY_TILE = 8192, 2048
#: The finish kernels' ``[chunks, channels]`` tiles: at most ``_FINISH_BLOCK`` channels and
#: ``_FINISH_CHUNKS`` chunks, ``_FINISH_TILE`` values. Rows have ~1000 chunks per channel: with
#: 128-chunk steps each program merged them in 9 dependent steps (10.7 us forward, 16.7 us backward
#: at (256, 64, 56, 56) channels_last float32 on the H200, against 2.5 us on planes); 1024-chunk
#: tiles of 2 channels take 2 steps in 32 programs.
_FINISH_BLOCK, _FINISH_CHUNKS, _FINISH_TILE = 16, 1024, 2048
#: Statistics programs per SM (the chunk count ``G`` per channel follows from it).
_PROGRAMS_PER_SM = 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a constexpr function: ~3 us a call on the host)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << (max(n, 1) - 1).bit_length()))


def _finish_grid(G: int, C: int) -> tuple[int, int, int]:
    """``(programs, BLOCK, BLOCK_G)`` of a finish kernel merging ``G`` chunks of ``C`` channels."""
    block_g = _pow2(G, 1, _FINISH_CHUNKS)
    block = max(1, min(_FINISH_BLOCK, _FINISH_TILE // block_g))
    return _cdiv(C, block), block, block_g


def _plane_chunks(N: int, C: int, L: int, q: int, target: int) -> tuple[int, int, int, int]:
    """``(NB, LSEG, GL, G)``: each of ``C`` channels' planes split into ``G`` chunks of ``NB``
    samples times ``LSEG`` positions (``GL`` chunks along the positions), about ``target``
    statistics programs in all."""
    want = max(1, _cdiv(target, C))
    gn = min(N, want)
    nb = _cdiv(N, gn)
    gn = _cdiv(N, nb)
    gl = max(1, min(want // gn, _cdiv(L, q)))
    lseg = _cdiv(_cdiv(L, gl), q) * q
    gl = _cdiv(L, lseg)
    return nb, lseg, gl, gn * gl


class _Geometry:
    """How a dense ``x`` is tiled: rows (channel stride 1) or planes, and the launch grids."""

    def __init__(self, N: int, C: int, L: int, rows: bool, target: int, itemsize: int) -> None:
        self.N, self.C, self.L, self.rows = N, C, L, rows
        M = self.count = N * L
        stats_tile = _STATS_TILE_BYTES // itemsize
        if rows:
            self.q = _pow2(C, 16, 128)
            self.p_stats = max(1, stats_tile // self.q)
            self.p_apply = max(1, _APPLY_TILE // self.q)
            cblocks = _cdiv(C, self.q)
            chunks = max(1, min(_cdiv(target, cblocks), _cdiv(M, self.p_stats)))
            self.nb = _cdiv(_cdiv(M, chunks), self.p_stats) * self.p_stats
            self.lseg, self.gl = 1, 1
            self.G = _cdiv(M, self.nb)
            self.stats_grid = (self.G * cblocks,)
            self.apply_grid = (_cdiv(M, self.p_apply) * cblocks,)
        else:
            self.q = _pow2(L, 16, 1024)
            self.p_stats = max(1, stats_tile // self.q)
            self.p_apply = max(1, _APPLY_TILE // self.q)
            self.nb, self.lseg, self.gl, self.G = _plane_chunks(N, C, L, self.q, target)
            self.stats_grid = (self.G * C,)
            self.apply_grid = (_cdiv(N * C, self.p_apply) * _cdiv(L, self.q),)


_GEOMETRIES: dict[tuple, _Geometry] = {}


def _geometry(x: Tensor) -> _Geometry:
    """The (cached) :class:`_Geometry` of a dense ``x``."""
    n, c = x.shape[0], x.shape[1]
    L = x.numel() // (n * c)
    rows = L == 1 or x.stride(1) == 1
    key = (n, c, L, rows, x.element_size(), x.device, _STATS_TILE_BYTES, _APPLY_TILE, _PROGRAMS_PER_SM)
    geo = _GEOMETRIES.get(key)
    if geo is None:
        if x.device.type == "cuda":
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        else:  # the interpreter: one "SM"
            sms = 1
        if len(_GEOMETRIES) >= 4096:  # many shapes (varying batch sizes): start over
            _GEOMETRIES.clear()
        geo = _GEOMETRIES[key] = _Geometry(n, c, L, rows, _PROGRAMS_PER_SM * sms, x.element_size())
    return geo


def _vec(t: Tensor | None) -> Tensor | None:
    """A per-channel tensor as a contiguous 1-D view (any float dtype: the kernels convert)."""
    if t is None:
        return None
    t = t.detach().reshape(-1)
    return t if t.is_contiguous() else t.contiguous()


def _residual(r: Tensor | None, x: Tensor) -> Tensor | None:
    return None if r is None else strided_like(r.to(x.dtype), x)


# ---------------------------------------------------------------------------- entry points


def forward_train_act(x, residual, eps, weight, bias, mask, vbs, act, slope, running=None):
    """``y = act(bn(x) [+ residual])`` in training mode: ``(y, mean, var, count)``; ``running``
    (:class:`~batchnorm.kernels.reference.Running`) moves in the same call."""
    x = dense(x)
    geo = _geometry(x)
    C, dev, M = geo.C, x.device, geo.count
    w, b, r = _vec(weight), _vec(bias), _residual(residual, x)
    mean = torch.empty((1, C), dtype=torch.float32, device=dev)
    var = torch.empty((1, C), dtype=torch.float32, device=dev)
    count = torch.empty((1,), dtype=torch.float32, device=dev)
    update = ref.kernel_can_update(running, x.device, torch.float32)
    rm, rv = (running.mean, running.var) if update else (mean, var)  # type: ignore[union-attr]
    momentum = float(running.momentum) if update else 0.0  # type: ignore[union-attr]
    unbias = M / (M - 1) if M > 1 else float("inf")
    y = torch.empty_like(x)
    wx, bx, rx = (w if w is not None else x), (b if b is not None else x), (r if r is not None else x)
    flags = dict(HAS_R=r is not None, HAS_W=w is not None, HAS_B=b is not None, ACT=ACT_CODES[act])
    scratch = torch.empty(C + 2 * geo.G * C, dtype=torch.float32, device=dev)
    invstd, part = scratch[:C], scratch[C:]
    _stats[geo.stats_grid](
        x, x, x, x, x, x, x, part, geo.N, C, geo.L, geo.nb, geo.lseg, geo.gl, geo.G, 0.0,
        ROWS=geo.rows, BACKWARD=False, HAS_R=False, HAS_W=False, HAS_B=False, ACT=0,
        BLOCK_P=geo.p_stats, BLOCK_Q=geo.q)
    programs, block, block_g = _finish_grid(geo.G, C)
    _finish_fwd[(programs,)](
        part, x, mean, var, invstd, count, rm, rv, geo.G, C, 1 if geo.rows else geo.L, float(M), float(eps),
        momentum, unbias, UPDATE=update, BLOCK=block, BLOCK_G=block_g)
    _apply[geo.apply_grid](
        x, y, x, rx, x, mean, invstd, wx, bx, x, geo.N, C, geo.L, float(slope), ROWS=geo.rows, BACKWARD=False,
        TRAIN=False, NEED_DX=False, NEED_DR=False, BLOCK_P=geo.p_apply, BLOCK_Q=geo.q, **flags)
    ref.finish_running(running, update, mean, var, M)
    return y, mean, var, count


def forward_train(x, eps, weight, bias, mask, vbs, running=None):
    return forward_train_act(x, None, eps, weight, bias, mask, vbs, "identity", 0.0, running)


def forward_apply_act(x, residual, mean, var, eps, weight, bias, act, slope):
    """``y = act(bn(x; mean, var) [+ residual])`` with given ``(C,)`` statistics."""
    x = dense(x)
    geo = _geometry(x)
    w, b, r = _vec(weight), _vec(bias), _residual(residual, x)
    y = torch.empty_like(x)
    _apply[geo.apply_grid](
        x, y, x, r if r is not None else x, x, _vec(mean), _vec(ref.inverse_std(var, eps)), w if w is not None else x,
        b if b is not None else x, x, geo.N, geo.C, geo.L, float(slope), ROWS=geo.rows, BACKWARD=False,
        TRAIN=False, HAS_R=r is not None, HAS_W=w is not None, HAS_B=b is not None, ACT=ACT_CODES[act],
        NEED_DX=False, NEED_DR=False, BLOCK_P=geo.p_apply, BLOCK_Q=geo.q)
    return y


def forward_apply(x, mean, var, eps, weight, bias):
    return forward_apply_act(x, None, mean, var, eps, weight, bias, "identity", 0.0)


def _backward(dy, x, residual, mean, var, eps, weight, bias, act, slope, train, need_dx, need_dr):
    x = dense(x)
    dy = strided_like(dy, x)
    geo = _geometry(x)
    C, dev = geo.C, x.device
    w, b, r = _vec(weight), _vec(bias), _residual(residual, x)
    m, inv = _vec(mean), _vec(ref.inverse_std(var, eps))
    dw = torch.empty(C, dtype=torch.float32, device=dev)
    db = torch.empty(C, dtype=torch.float32, device=dev)
    dx = torch.empty_like(x) if need_dx else None
    dr = torch.empty_like(x) if need_dr else None
    wx, bx, rx = (w if w is not None else x), (b if b is not None else x), (r if r is not None else x)
    dxx, drx = (dx if dx is not None else x), (dr if dr is not None else x)
    flags = dict(HAS_R=r is not None, HAS_W=w is not None, HAS_B=b is not None, ACT=ACT_CODES[act])
    outs = dict(TRAIN=train, NEED_DX=need_dx, NEED_DR=need_dr)
    scratch = torch.empty(2 * C + 2 * geo.G * C, dtype=torch.float32, device=dev)
    kbc, part = scratch[:2 * C], scratch[2 * C:]
    _stats[geo.stats_grid](
        x, dy, rx, m, inv, wx, bx, part, geo.N, C, geo.L, geo.nb, geo.lseg, geo.gl, geo.G, float(slope),
        ROWS=geo.rows, BACKWARD=True, BLOCK_P=geo.p_stats, BLOCK_Q=geo.q, **flags)
    programs, block, block_g = _finish_grid(geo.G, C)
    _finish_bwd[(programs,)](
        part, inv, wx, dw, db, kbc, geo.G, C, float(geo.count), TRAIN=train, HAS_W=w is not None,
        BLOCK=block, BLOCK_G=block_g)
    if need_dx or need_dr:
        _apply[geo.apply_grid](
            x, dxx, dy, rx, drx, m, inv, wx, bx, kbc, geo.N, C, geo.L, float(slope), ROWS=geo.rows,
            BACKWARD=True, BLOCK_P=geo.p_apply, BLOCK_Q=geo.q, **flags, **outs)
    return dx, dw, db, dr


def backward_train_act(dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    return _backward(dy, x, residual, mean, var, eps, weight, bias, act, slope, True,
                     need_input_grad, need_residual_grad)


def backward_apply_act(dy, x, residual, mean, var, eps, weight, bias, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    return _backward(dy, x, residual, mean, var, eps, weight, bias, act, slope, False, need_input_grad,
                     need_residual_grad)


def backward_train(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad=True):
    return _backward(dy, x, None, mean, var, eps, weight, None, "identity", 0.0, True,
                     need_input_grad, False)[:3]


def backward_apply(dy, x, mean, var, eps, weight, need_input_grad=True):
    return _backward(dy, x, None, mean, var, eps, weight, None, "identity", 0.0, False, need_input_grad,
                     False)[:3]


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """CUDA (or, interpreted, CPU) float32/float16/bfloat16 tensors without mask or ghost batches."""
    if op not in OPS or x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        return False
    if x.device.type != "cuda" and not (_INTERPRET and x.device.type == "cpu"):
        return False
    return mask is None and not (0 < vbs < x.shape[0])


register_backend(name, __import__(__name__, fromlist=["name"]), priority=40)
