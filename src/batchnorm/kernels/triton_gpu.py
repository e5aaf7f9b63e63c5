"""GPU backend: batch norm (and the fused activation/residual ops) as Triton kernels.

Registered when a CUDA device is present, or on the CPU when both ``TRITON_INTERPRET=1`` and
``BATCHNORM_TRITON=1`` are set (Triton's interpreter runs the kernels on CPU tensors; the tests use
it on tiny shapes). Otherwise importing this module raises ``ImportError`` and the dispatcher
skips it.

Three kernels cover every op, for NCHW and channels_last (any dense layout where the channel has
one stride), float32/float16/bfloat16 with float32 statistics:

* ``_partial_sums``: a 2D grid ``(P, ceil(C / BLOCK_C))`` whose first axis splits the ``N * L``
  positions into ``P`` chunks chosen from the device's SM count, *not* from ``C``: with ``C = 64``
  a 132-SM H100 still gets a few hundred programs. Each program writes per-chunk float32 sums
  (shifted by a per-channel pilot value for the forward, so the one-pass variance has no
  cancellation; ``sum(g)``, ``sum(g * (x - mean))`` with ``g = dy * act'(z)`` for the backward).
  The ``(P, C)`` partials are merged in float64.
* ``_elementwise_fwd``: ``y = act((x - mean) * scale + shift [+ residual])`` over the flat storage.
* ``_elementwise_bwd``: ``g`` recomputed from ``x`` (and the residual), ``dx = g * ka + (x - mean)
  * kb + kc`` and ``dresidual = g``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("BATCHNORM_TRITON") == "1"
if not torch.cuda.is_available() and not _INTERPRET:
    raise ImportError("triton backend: no CUDA device (set TRITON_INTERPRET=1 BATCHNORM_TRITON=1 to interpret)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import reference as ref  # noqa: E402
from . import register_backend  # noqa: E402

name = "triton"

_ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OPS = frozenset({"forward_train", "forward_apply", "backward_train", "backward_apply", "forward_train_act",
                  "forward_apply_act", "backward_train_act", "backward_apply_act"})


@triton.jit
def _act(z, slope, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 4:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _dact(z, slope, ACT: tl.constexpr):
    if ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(z > 0, 1.0, slope)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def _partial_sums(x_ptr, dy_ptr, r_ptr, shift_ptr, mean_ptr, scale_ptr, bias_ptr, out1_ptr, out2_ptr,
                  M, C, L, sN, sC, sL, rows_per_prog, slope,
                  BACKWARD: tl.constexpr, HAS_R: tl.constexpr, ACT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per chunk of positions and block of channels: forward ``sum(x - k)``, ``sum((x - k)^2)``;
    backward ``sum(g)``, ``sum(g * (x - mean))``."""
    p = tl.program_id(0)
    cb = tl.program_id(1)
    cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    k = tl.load(shift_ptr + cs, mask=cmask, other=0.0)
    if BACKWARD:
        a = tl.load(scale_ptr + cs, mask=cmask, other=0.0)
        b = tl.load(bias_ptr + cs, mask=cmask, other=0.0)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    m0 = p * rows_per_prog
    m_end = tl.minimum(m0 + rows_per_prog, M)
    for start in range(m0, m_end, BLOCK_M):
        ms = start + tl.arange(0, BLOCK_M)
        mmask = ms < m_end
        n = ms // L
        l_ = ms % L
        off = n[:, None] * sN + cs[None, :] * sC + l_[:, None] * sL
        msk = mmask[:, None] & cmask[None, :]
        d = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32) - k[None, :]
        if BACKWARD:
            z = d * a[None, :] + b[None, :]
            if HAS_R:
                z += tl.load(r_ptr + off, mask=msk, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + off, mask=msk, other=0.0).to(tl.float32) * _dact(z, slope, ACT)
            g = tl.where(msk, g, 0.0)
            acc1 += g
            acc2 += g * d
        else:
            d = tl.where(msk, d, 0.0)
            acc1 += d
            acc2 += d * d
    tl.store(out1_ptr + p * C + cs, tl.sum(acc1, 0), mask=cmask)
    tl.store(out2_ptr + p * C + cs, tl.sum(acc2, 0), mask=cmask)


@triton.jit
def _elementwise_fwd(x_ptr, r_ptr, y_ptr, mean_ptr, scale_ptr, shift_ptr, total, C, stride_c, slope,
                     HAS_R: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = (offs // stride_c) % C
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mean_ptr + c, mask=mask, other=0.0)
    a = tl.load(scale_ptr + c, mask=mask, other=0.0)
    b = tl.load(shift_ptr + c, mask=mask, other=0.0)
    z = (x - m) * a + b
    if HAS_R:
        z += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _act(z, slope, ACT)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _elementwise_bwd(dy_ptr, x_ptr, r_ptr, dx_ptr, dr_ptr, mean_ptr, scale_ptr, shift_ptr, ka_ptr, kb_ptr,
                     kc_ptr, total, C, stride_c, slope, HAS_R: tl.constexpr, ACT: tl.constexpr,
                     NEED_DX: tl.constexpr, NEED_DR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    c = (offs // stride_c) % C
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(mean_ptr + c, mask=mask, other=0.0)
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        z = d * tl.load(scale_ptr + c, mask=mask, other=0.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
        if HAS_R:
            z += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = g * _dact(z, slope, ACT)
    if NEED_DX:
        ka = tl.load(ka_ptr + c, mask=mask, other=0.0)
        kb = tl.load(kb_ptr + c, mask=mask, other=0.0)
        kc = tl.load(kc_ptr + c, mask=mask, other=0.0)
        tl.store(dx_ptr + offs, (g * ka + d * kb + kc).to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DR:
        tl.store(dr_ptr + offs, g.to(dr_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- helpers


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when dense with a single channel stride (contiguous/channels_last), else a copy."""
    if x.is_contiguous():
        return x
    for fmt, nd in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == nd and x.is_contiguous(memory_format=fmt):
            return x
    return x.contiguous()


def _like_layout(t: Tensor, x: Tensor) -> Tensor:
    if t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _dims(x: Tensor) -> tuple[int, int, int, int, int, int]:
    """``(M, C, L, sN, sC, sL)`` of ``x`` seen as ``(N, C, L)`` positions."""
    n, c = x.shape[0], x.shape[1]
    L = x.numel() // max(n * c, 1)
    sL = x.stride(-1) if x.dim() > 2 else 1
    if x.dim() > 2 and not x.is_contiguous():
        sL = c  # channels_last: the spatial positions are C apart
    return n * L, c, L, x.stride(0), x.stride(1), sL


def _programs(m: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """Number of chunks of positions and rows per chunk (from the SM count, not from C)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    chunks = max(1, min(triton.cdiv(m, block_m), target))
    rows = triton.cdiv(triton.cdiv(m, chunks), block_m) * block_m
    return triton.cdiv(m, rows), rows


def _f32(t: Tensor | None, c: int, fill: float, device: torch.device) -> Tensor:
    if t is None:
        return torch.full((c,), fill, dtype=torch.float32, device=device)
    return t.detach().reshape(-1).to(device=device, dtype=torch.float32).contiguous()


_BLOCK_M, _BLOCK_C, _BLOCK = 64, 32, 1024


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 mean and biased variance per channel."""
    M, C, L, sN, sC, sL = _dims(x)
    P, rows = _programs(M, _BLOCK_M, x.device)
    pilot = x.select(0, 0).reshape(C, -1)[:, 0].float().contiguous()
    s = torch.empty((P, C), dtype=torch.float32, device=x.device)
    q = torch.empty_like(s)
    dummy = pilot
    _partial_sums[(P, triton.cdiv(C, _BLOCK_C))](
        x, x, x, pilot, dummy, dummy, dummy, s, q, M, C, L, sN, sC, sL, rows, 0.0,
        BACKWARD=False, HAS_R=False, ACT=0, BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C)
    md = s.double().sum(0) / M
    var = (q.double().sum(0) / M - md * md).clamp_min(0)
    return pilot.double() + md, var


def _apply(x: Tensor, r: Tensor | None, mean: Tensor, scale: Tensor, shift: Tensor, act: int, slope: float
           ) -> Tensor:
    y = torch.empty_like(x)
    total = x.numel()
    _elementwise_fwd[(triton.cdiv(total, _BLOCK),)](
        x, r if r is not None else x, y, mean.float().contiguous(), scale.float().contiguous(),
        shift.float().contiguous(), total, x.shape[1], x.stride(1), float(slope),
        HAS_R=r is not None, ACT=act, BLOCK=_BLOCK)
    return y


def _residual(r: Tensor | None, x: Tensor) -> Tensor | None:
    return None if r is None else _like_layout(r.to(x.dtype), x)


# ---------------------------------------------------------------------------- entry points


def forward_train_act(x, weight, bias, residual, mask, eps, vbs, act, slope, running=None):
    x = _dense(x)
    c = x.shape[1]
    mean, var = _moments(x)
    scale = _f32(weight, c, 1.0, x.device).double() * torch.rsqrt(var + eps)
    y = _apply(x, _residual(residual, x), mean, scale, _f32(bias, c, 0.0, x.device), _ACT_CODES[act], slope)
    count = torch.full((1,), float(x.numel() // c), dtype=torch.float32, device=x.device)
    if running is not None:
        ref.update_running(running, mean, var, x.numel() // c)
    return y, mean.float().unsqueeze(0), var.float().unsqueeze(0), count


def forward_train(x, weight, bias, mask, eps, vbs, running=None):
    return forward_train_act(x, weight, bias, None, mask, eps, vbs, "identity", 0.0, running)


def forward_apply_act(x, mean, invstd, weight, bias, residual, act, slope):
    x = _dense(x)
    c = x.shape[1]
    scale = _f32(invstd, c, 1.0, x.device) * _f32(weight, c, 1.0, x.device)
    return _apply(x, _residual(residual, x), _f32(mean, c, 0.0, x.device), scale, _f32(bias, c, 0.0, x.device),
                  _ACT_CODES[act], slope)


def forward_apply(x, mean, invstd, weight, bias):
    return forward_apply_act(x, mean, invstd, weight, bias, None, "identity", 0.0)


def _backward(dy, x, residual, mean, invstd, weight, bias, act, slope, train, need_dx, need_dr):
    x = _dense(x)
    dy = _like_layout(dy, x)
    r = _residual(residual, x)
    M, C, L, sN, sC, sL = _dims(x)
    dev = x.device
    m32 = _f32(mean, C, 0.0, dev)
    inv = _f32(invstd, C, 1.0, dev).double()
    scale = _f32(weight, C, 1.0, dev).double() * inv
    b = _f32(bias, C, 0.0, dev)
    code = _ACT_CODES[act]
    P, rows = _programs(M, _BLOCK_M, dev)
    s1 = torch.empty((P, C), dtype=torch.float32, device=dev)
    s2 = torch.empty_like(s1)
    scale32 = scale.float()
    _partial_sums[(P, triton.cdiv(C, _BLOCK_C))](
        x, dy, r if r is not None else x, m32, m32, scale32, b, s1, s2, M, C, L, sN, sC, sL, rows, float(slope),
        BACKWARD=True, HAS_R=r is not None, ACT=code, BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C)
    s = s1.double().sum(0)
    t = s2.double().sum(0)
    dx = torch.empty_like(x) if need_dx else None
    dr = torch.empty_like(x) if need_dr else None
    if need_dx or need_dr:
        if train:
            kb = -scale * inv * inv * t / M
            kc = -scale * s / M
        else:
            kb = torch.zeros_like(scale)
            kc = torch.zeros_like(scale)
        total = x.numel()
        _elementwise_bwd[(triton.cdiv(total, _BLOCK),)](
            dy, x, r if r is not None else x, dx if dx is not None else x, dr if dr is not None else x,
            m32, scale32, b, scale32, kb.float().contiguous(), kc.float().contiguous(), total, C, x.stride(1),
            float(slope), HAS_R=r is not None, ACT=code, NEED_DX=need_dx, NEED_DR=need_dr, BLOCK=_BLOCK)
    return dx, (t * inv).float(), s.float(), dr


def backward_train_act(dy, x, residual, mean, invstd, weight, bias, mask, count, vbs, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    return _backward(dy, x, residual, mean, invstd, weight, bias, act, slope, True, need_input_grad,
                     need_residual_grad)


def backward_apply_act(dy, x, residual, mean, invstd, weight, bias, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    return _backward(dy, x, residual, mean, invstd, weight, bias, act, slope, False, need_input_grad,
                     need_residual_grad)


def backward_train(dy, x, mean, invstd, weight, mask, count, vbs, need_input_grad=True):
    dx, dw, db, _ = _backward(dy, x, None, mean, invstd, weight, None, "identity", 0.0, True, need_input_grad,
                              False)
    return dx, dw, db


def backward_apply(dy, x, mean, invstd, weight, need_input_grad=True):
    dx, dw, db, _ = _backward(dy, x, None, mean, invstd, weight, None, "identity", 0.0, False, need_input_grad,
                              False)
    return dx, dw, db


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """CUDA (or, interpreted, CPU) float32/float16/bfloat16 tensors without mask or ghost batches."""
    if op not in _OPS or x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        return False
    if x.device.type != "cuda" and not (_INTERPRET and x.device.type == "cpu"):
        return False
    return mask is None and not (0 < vbs < x.shape[0])


register_backend(name, __import__(__name__, fromlist=["name"]), priority=40)
