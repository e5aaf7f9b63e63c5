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
than L2, so those three launches read it twice from memory. ``_pipelined`` (planes only, opt-in
with ``BATCHNORM_TRITON_PIPELINE=1`` or ``_PIPELINE``, until a GPU has measured it) runs a whole
training forward or backward as one launch over groups of channels each small enough to stay in
L2: the group's statistics chunks, then, when the last of them has merged the group's sums, its
elementwise tiles, while the next group is being read. Programs take tickets in the order they
start and only wait for lower tickets, so no program waits for one that has not started.
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
from .triton_kernels import _apply, _finish_bwd, _finish_fwd, _pipelined, _stats  # noqa: E402

name = "triton"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------- geometry

#: Elements per tile of the statistics and elementwise kernels; channels and chunks per finish step.
_STATS_TILE, _APPLY_TILE, _FINISH_BLOCK, _FINISH_CHUNKS = 4096, 2048, 16, 128
#: Statistics programs per SM (the chunk count ``G`` per channel follows from it).
_PROGRAMS_PER_SM = 8
#: Whether training forwards and backwards on planes run as one pipelined launch (:func:`_pipelined`)
#: instead of three: ``BATCHNORM_TRITON_PIPELINE=1``. Off by default until a GPU has measured it
#: (docs/performance.md, "How the GPU kernels work").
_PIPELINE = os.environ.get("BATCHNORM_TRITON_PIPELINE") == "1"
#: A pipelined channel group's data fills at most ``1 / _GROUP_L2_SHARE`` of L2 (the group being
#: normalized shares L2 with the next group being read and the outputs being written).
_GROUP_L2_SHARE = 4
#: Bytes of one channel group, ``None``: from the device's L2 (the checks set it to force groups).
_GROUP_BYTES: int | None = None
#: L2 eviction policies of the pipelined launch: its statistics loads ``evict_last`` (the group is
#: read again soon), the elementwise pass's loads and stores ``evict_first`` (last use; outputs
#: should not push the next group out). ``False``: the hardware's default policy.
_PIPELINE_HINTS = True


def _pipeline_policies() -> dict[str, str]:
    return {"KEEP": "evict_last", "DROP": "evict_first"} if _PIPELINE_HINTS else {"KEEP": "", "DROP": ""}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a constexpr function: ~3 us a call on the host)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << (max(n, 1) - 1).bit_length()))


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


class _Pipeline:
    """The plan of :func:`_pipelined` for planes: ``K`` groups of ``cg`` channels (a power of two),
    each small enough to stay in L2 between its statistics and its elementwise pass; ``S``
    statistics chunks (``G`` per channel) and ``A`` elementwise tiles per group. Small groups
    give chunks of a few samples, so the statistics tile is no taller than a chunk (``p_stats``)."""

    def __init__(self, geo: _Geometry, channel_bytes: int, group_bytes: int, target: int) -> None:
        cg = 1
        while cg < geo.C and 2 * cg * channel_bytes <= group_bytes:
            cg *= 2
        self.cg, self.K = cg, _cdiv(geo.C, cg)
        self.nb, self.lseg, self.gl, self.G = _plane_chunks(geo.N, cg, geo.L, geo.q, target)
        self.p_stats = min(geo.p_stats, _pow2(self.nb, 1, geo.p_stats))
        self.S = self.G * cg
        self.A = _cdiv(geo.N * cg, geo.p_apply) * _cdiv(geo.L, geo.q)
        self.grid = (self.K * (self.S + self.A),)


class _Geometry:
    """How a dense ``x`` is tiled: rows (channel stride 1) or planes, and the launch grids."""

    def __init__(self, N: int, C: int, L: int, rows: bool, target: int, l2_bytes: int) -> None:
        self.N, self.C, self.L, self.rows = N, C, L, rows
        self.target, self.l2_bytes = target, l2_bytes
        self._pipelines: dict[tuple[int, int], _Pipeline] = {}
        M = self.count = N * L
        if rows:
            self.q = _pow2(C, 16, 128)
            self.p_stats = max(1, _STATS_TILE // self.q)
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
            self.p_stats = max(1, _STATS_TILE // self.q)
            self.p_apply = max(1, _APPLY_TILE // self.q)
            self.nb, self.lseg, self.gl, self.G = _plane_chunks(N, C, L, self.q, target)
            self.stats_grid = (self.G * C,)
            self.apply_grid = (_cdiv(N * C, self.p_apply) * _cdiv(L, self.q),)

    def pipeline(self, bytes_per_value: int) -> _Pipeline:
        """The (cached) :class:`_Pipeline` for planes when each position of a channel brings
        ``bytes_per_value`` bytes into the statistics pass (the input's, plus ``dy``'s, ...)."""
        group = _GROUP_BYTES if _GROUP_BYTES is not None else self.l2_bytes // _GROUP_L2_SHARE
        key = (bytes_per_value, group)
        plan = self._pipelines.get(key)
        if plan is None:
            plan = self._pipelines[key] = _Pipeline(self, self.N * self.L * bytes_per_value, group, self.target)
        return plan


_GEOMETRIES: dict[tuple, _Geometry] = {}


def _geometry(x: Tensor) -> _Geometry:
    """The (cached) :class:`_Geometry` of a dense ``x``."""
    n, c = x.shape[0], x.shape[1]
    L = x.numel() // (n * c)
    rows = L == 1 or x.stride(1) == 1
    key = (n, c, L, rows, x.device, _STATS_TILE, _APPLY_TILE, _PROGRAMS_PER_SM)
    geo = _GEOMETRIES.get(key)
    if geo is None:
        if x.device.type == "cuda":
            props = torch.cuda.get_device_properties(x.device)
            sms, l2 = props.multi_processor_count, props.L2_cache_size
        else:  # the interpreter: one "SM", no L2
            sms, l2 = 1, 0
        if len(_GEOMETRIES) >= 4096:  # many shapes (varying batch sizes): start over
            _GEOMETRIES.clear()
        geo = _GEOMETRIES[key] = _Geometry(n, c, L, rows, _PROGRAMS_PER_SM * sms, l2)
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
    if _PIPELINE and not geo.rows:
        plan = geo.pipeline(x.element_size() * (1 if r is None else 2))
        scratch = torch.empty(C + 2 * plan.G * C, dtype=torch.float32, device=dev)
        _pipelined[plan.grid](
            x, y, x, rx, x, mean, var, scratch[:C], count, rm, rv, wx, bx, x, x, x, scratch[C:],
            torch.zeros(1 + 2 * plan.K, dtype=torch.int32, device=dev), geo.N, C, geo.L, plan.nb, plan.lseg,
            plan.gl, plan.G, plan.K, plan.S, plan.A, float(M), float(eps), momentum, unbias, float(slope),
            BACKWARD=False, TRAIN=False, UPDATE=update, NEED_DX=False, NEED_DR=False, CG=plan.cg,
            BLOCK_G=_pow2(plan.G, 1, _FINISH_CHUNKS), BLOCK_PS=plan.p_stats, BLOCK_PA=geo.p_apply, BLOCK_Q=geo.q,
            **_pipeline_policies(), **flags)
        ref.finish_running(running, update, mean, var, M)
        return y, mean, var, count
    scratch = torch.empty(C + 2 * geo.G * C, dtype=torch.float32, device=dev)
    invstd, part = scratch[:C], scratch[C:]
    _stats[geo.stats_grid](
        x, x, x, x, x, x, x, part, geo.N, C, geo.L, geo.nb, geo.lseg, geo.gl, geo.G, 0.0,
        ROWS=geo.rows, BACKWARD=False, HAS_R=False, HAS_W=False, HAS_B=False, ACT=0,
        BLOCK_P=geo.p_stats, BLOCK_Q=geo.q)
    _finish_fwd[(_cdiv(C, _FINISH_BLOCK),)](
        part, x, mean, var, invstd, count, rm, rv, geo.G, C, 1 if geo.rows else geo.L, float(M), float(eps),
        momentum, unbias, UPDATE=update, BLOCK=_FINISH_BLOCK, BLOCK_G=_pow2(geo.G, 1, _FINISH_CHUNKS))
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
    if _PIPELINE and not geo.rows and (need_dx or need_dr):
        plan = geo.pipeline(x.element_size() * (2 if r is None else 3))
        scratch = torch.empty(2 * C + 2 * plan.G * C, dtype=torch.float32, device=dev)
        _pipelined[plan.grid](
            x, dxx, dy, rx, drx, m, x, inv, x, x, x, wx, bx, dw, db, scratch[:2 * C], scratch[2 * C:],
            torch.zeros(1 + 2 * plan.K, dtype=torch.int32, device=dev), geo.N, C, geo.L, plan.nb, plan.lseg,
            plan.gl, plan.G, plan.K, plan.S, plan.A, float(geo.count), 0.0, 0.0, 0.0, float(slope),
            BACKWARD=True, UPDATE=False, CG=plan.cg, BLOCK_G=_pow2(plan.G, 1, _FINISH_CHUNKS),
            BLOCK_PS=plan.p_stats, BLOCK_PA=geo.p_apply, BLOCK_Q=geo.q, **_pipeline_policies(), **flags,
            **outs)
        return dx, dw, db, dr
    scratch = torch.empty(2 * C + 2 * geo.G * C, dtype=torch.float32, device=dev)
    kbc, part = scratch[:2 * C], scratch[2 * C:]
    _stats[geo.stats_grid](
        x, dy, rx, m, inv, wx, bx, part, geo.N, C, geo.L, geo.nb, geo.lseg, geo.gl, geo.G, float(slope),
        ROWS=geo.rows, BACKWARD=True, BLOCK_P=geo.p_stats, BLOCK_Q=geo.q, **flags)
    _finish_bwd[(_cdiv(C, _FINISH_BLOCK),)](
        part, inv, wx, dw, db, kbc, geo.G, C, float(geo.count), TRAIN=train, HAS_W=w is not None,
        BLOCK=_FINISH_BLOCK, BLOCK_G=_pow2(geo.G, 1, _FINISH_CHUNKS))
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
