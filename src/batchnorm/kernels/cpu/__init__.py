"""CPU backend: fused batch-norm kernels compiled by numba (``parallel=True``, disk cache).

The kernels see a dense input in one of two views, both without copies: **planes**, contiguous
``(N, C, *S)`` as ``(N, C, L)`` (:mod:`.planes`), and **rows**, channels_last ``(N, *S, C)`` and
2D ``(N, C)`` as ``(M, C)``, and contiguous input with short planes as ``(N, C * L)``
(:mod:`.rows`, see :data:`ROWS_MAX_PLANE`).

Every kernel takes an activation (and optional residual): ``y = act(bn(x) [+ residual])``; plain
batch norm is the identity, for which the backward uses ``dy`` itself (no gradient buffer), and
its element loops (like BN + ReLU's) are compiled separately with the activation as a constant
(:func:`.formulas.with_cases`), so it costs what a kernel written for it would.

The modules, from the element up:

* :mod:`.primitives` -- what the kernels are written in: by default :mod:`.simd` (a 32-byte
  vector type, :mod:`.vector`, and non-temporal stores), with ``BATCHNORM_CPU_SIMD=0``
  :mod:`.plain` (scalar loops, numba's public API only); raw pointers in :mod:`.pointers`;
  :mod:`.base` -- numba options and the array functions every kernel uses;
* :mod:`.formulas` -- the element formulas (forward, gradient at the pre-activation, input
  gradient), written once and compiled to scalar and vector code, and the loops that run them;
  outputs of at least :data:`STREAM_MIN_BYTES` (backward: :data:`STREAM_MIN_BYTES_BACKWARD`) are
  written with non-temporal stores, which skip the write-allocate read and leave the cache to the
  input; :mod:`.sums` -- the reductions;
* :mod:`.planes`, :mod:`.rows` -- the parallel kernels of each view;
* :mod:`.drivers` -- per op a serial driver that runs the parallel kernels and the per-channel
  arithmetic between them (the training forward also moves the running statistics when it is
  given them); :mod:`.entries` -- the three compiled entries (``_train``, ``_apply``, ``_bwd``)
  that Python calls with tensors passed by address;
* this module -- the functions the dispatcher calls.

Statistics and the backward's sums are float64 sums of input-dtype partials over bounded blocks,
so their error does not grow with the tensor (float64 throughout for float64 input). Kernels read
tensors through raw pointers, which do not keep arrays alive: see the lifetime rule of
:func:`batchnorm.kernels.cpu.simd.pointers`. Divisions follow IEEE (numpy's error model: ``eps =
0`` with a zero variance gives inf/NaN, as in torch). Masks, ghost batches and half precision go to
the reference backend (:func:`supports`). Numba uses ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numba
import numpy as np
import torch
from torch import Tensor

from .. import _jit, register_backend
from .. import reference as ref
from ..common import ACT_CODES, OPS, channels_last_format
from ..reference import acc_dtype
from .entries import (
    ENTRIES,
    ENTRY_OF,
    NUMPY_DTYPES,
    PROTOTYPES,
    _apply,
    _bwd,
    _train,
    address,
    addresses,
    channel_vector,
    dims_of,
    entry_signature,
    launch_pool,
)
from .primitives import LINE_BYTES
from .primitives import SIMD as SIMD  # whether the kernels use 32-byte vectors (BATCHNORM_CPU_SIMD)
from .rows import _row_blocks

name = "cpu"

# Below this many elements the reference path would run. Since each op is one driver call (and
# small tensors run on one thread, see PARALLEL_MIN), this backend is faster than the reference
# path's ~10 torch calls at every size measured (layer forward, forward+backward and eval,
# (8, 16) to (32, 16, 8, 8), interleaved repeats on the 2-core EPYC: 1.12x-1.73x), so no size is
# left out; the constant stays for tests and for machines where launching numba costs more.
MIN_NUMEL = 1
# Outputs of at least this many bytes are written with non-temporal (streaming) stores, which
# skip reading the output's lines and keep it from evicting the input the kernel reads again
# (see :mod:`.simd`); smaller ones stay in cache for whatever reads them next.
# Measured on the 2-core EPYC, (N, 64, H, W) float32, kernel time plain/streamed: forward
# 0.87-0.99 up to 6 MiB, 1.09-1.13 at 12.5 MiB; backward 1.08-1.22 from 1.5 MiB on. In a network
# the next layer reads the output at once: a streamed 1 MiB backward output made the backward
# kernel 143 us against 98-111 us plain inside a conv-BN-ReLU stack ((64, 64, 8, 8); the step
# 1.5 ms slower), so the backward streams from 2 MiB (docs/results/2026-12-01-cpu-compile-time-streaming-network.md).
STREAM_MIN_BYTES = 8 << 20
STREAM_MIN_BYTES_BACKWARD = 2 << 20
# ... and on the planes kernels only when a plane is a whole number of 64-byte lines or at least
# this many bytes: a plane's partial lines at both ends take plain stores between streamed ones,
# and short unaligned planes lost (7x7 float32, 6 MiB, plain/streamed time: inference 0.27-0.51,
# backward 0.69-0.80, training forward 0.79-1.09; 14x14 backward 1.08-1.18, 8x8 0.98-1.21).
STREAM_MIN_PLANE_BYTES = 512
# Contiguous (N, C, *S) input whose planes hold fewer than ROWS_MAX_PLANE values (and whose
# samples at most ROWS_MAX_COLUMNS) runs on the rows kernels as (N, C * L) rows, each channel L
# consecutive columns: below that the planes kernels' per-plane work (loop setup, horizontal sums)
# costs more than the rows kernels' per-column accumulators. Measured on the 2-core EPYC, 2 MiB
# float32, time of forward_apply + forward_train + backward_train, planes / rows (us), since the
# plain batch norm has its own loops (see .formulas): C = 64: L = 4 2623/502, 9 1450/546, 16 701/676,
# 25 739/746, 36 611/876, 49 486/1003; C = 256: L = 4 2754/702, 9 1417/843, 16 639/1087.
ROWS_MAX_PLANE = 16
ROWS_MAX_COLUMNS = 4096
# Below this many elements one thread does the work: waking a second thread costs more than it
# saves, and much more when the machine is busy (the join waits for a time slice).
PARALLEL_MIN = 1 << 16

launch_pool()

# The wrappers below run once per call, often right after a large kernel or convolution has
# flushed the caches, where each torch call costs tens of microseconds: they convert the small
# per-channel tensors with numpy and make as few torch calls as they can.

_MAX_THREADS = numba.config.NUMBA_NUM_THREADS
_tls = threading.local()  # numba's thread count is per calling thread


def _threads(numel: int = 1 << 30) -> int:
    """Set numba's thread count for this call: torch's, or 1 below :data:`PARALLEL_MIN` elements."""
    t = 1 if numel < PARALLEL_MIN else max(1, min(torch.get_num_threads(), _MAX_THREADS))
    if getattr(_tls, "threads", 0) != t:
        numba.set_num_threads(t)
        _tls.threads = t
    return t


def _shape_kind(x: Tensor) -> str:
    """How the kernels see ``x``: ``"rows"`` for (N, C), (N, C, 1, ...) and channels_last;
    ``"planes"`` for contiguous (N, C, *S) (which may still run as rows, see :func:`_view`)."""
    if x.dim() == 2 or (x.is_contiguous() and x.numel() == x.shape[0] * x.shape[1]):
        return "rows"
    if x.is_contiguous():
        return "planes"
    if channels_last_format(x) is not None:
        return "rows"
    return "planes"  # made contiguous by _prepare


def _prepare(t: Tensor, x: Tensor, kind: str) -> Tensor:
    """``t`` (the input, a gradient or a residual, shaped like ``x``) in the memory format the
    kernels read for ``x`` of shape kind ``kind``: contiguous, or channels_last when ``x`` is."""
    if kind == "planes" or x.dim() == 2 or x.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=channels_last_format(x))  # type: ignore[arg-type]


def _view(x: Tensor, kind: str, threads: int = 1) -> tuple[tuple[int, int, int], int, int]:
    """``(dims, rep, nb)`` of the prepared ``x``: :func:`.entries.dims_of`; ``rep = 0`` for the planes
    kernels, else the rows kernels on ``(N * L / rep, C * rep)`` -- channels_last and 2D with
    ``rep = 1``, contiguous input with planes shorter than :data:`ROWS_MAX_PLANE` with
    ``rep = L``; ``nb`` the rows reductions' blocks."""
    n, c, l = dims = dims_of(x)
    if kind == "rows":
        rep = 1
    else:
        rep = l if l < ROWS_MAX_PLANE and c * l <= ROWS_MAX_COLUMNS else 0
    return dims, rep, (_row_blocks(n * l // rep, threads) if rep else 1)


def _stream(x: Tensor, dims: tuple[int, int, int], rep: int, backward: bool = False) -> bool:
    """Whether the outputs (each the size of ``x``; ``dims``, ``rep`` from :func:`_view`) go out
    with non-temporal stores: from :data:`STREAM_MIN_BYTES` (:data:`STREAM_MIN_BYTES_BACKWARD`)
    on, and on the planes kernels (``rep == 0``) for planes of whole cache lines or of at least
    :data:`STREAM_MIN_PLANE_BYTES`."""
    size = x.element_size()
    if x.numel() * size < (STREAM_MIN_BYTES_BACKWARD if backward else STREAM_MIN_BYTES):
        return False
    plane = dims[2] * size
    return rep != 0 or plane % LINE_BYTES == 0 or plane >= STREAM_MIN_PLANE_BYTES


def _fused_channels(c: int, threads: int) -> bool:
    """Whether one-channel-per-thread keeps every thread busy (else split across the batch)."""
    return threads == 1 or c % threads == 0 or c >= 8 * threads


# --------------------------------------------------------- plain batch norm: the identity activation


def forward_train(x, eps, weight, bias, mask, vbs, running=None):
    """Training forward on the whole batch (one group): ``(y, mean, var, count)``."""
    return forward_train_act(x, None, eps, weight, bias, mask, vbs, "identity", 0.0, running)


def forward_apply(x, mean, var, eps, weight, bias):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` with given ``(C,)`` statistics."""
    return forward_apply_act(x, None, mean, var, eps, weight, bias, "identity", 0.0)


def backward_train(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad=True):
    """Closed-form training backward: ``(dx, dweight, dbias)`` (see the reference backend)."""
    return _backward_act(dy, x, None, mean, var, eps, weight, None, "identity", 0.0, True, need_input_grad,
                         False)[:3]


def backward_apply(dy, x, mean, var, eps, weight, need_input_grad=True):
    """Backward with constant ``(C,)`` statistics: ``(dx, dweight, dbias)``."""
    return _backward_act(dy, x, None, mean, var, eps, weight, None, "identity", 0.0, False, need_input_grad,
                         False)[:3]


# ------------------------------------------------------ plain batch norm: the layers' lean calls
#
# The layers' common training call (no mask, one group, no activation, no residual) with the
# fewest Python steps: the per-shape decisions are cached (:func:`_plan`), the statistics stay in
# the numpy array the kernel wrote (the backward reads it by address), and the backward returns
# the parameter gradients as views of one array. Same kernels and arguments as above.

_PLANS: dict[tuple, tuple] = {}


def _plan(x: Tensor, threads: int) -> tuple:
    """``(prepared x, dims, rep, nb, stream, stream_backward, fused)`` for ``x``, cached per shape,
    strides, dtype and thread count."""
    key = (x.shape, x.stride(), x.dtype, threads)
    plan = _PLANS.get(key)
    if plan is None:
        kind = _shape_kind(x)
        xp = _prepare(x, x, kind)
        dims, rep, nb = _view(xp, kind, threads)
        plan = (xp is x, kind, dims, rep, nb, _stream(xp, dims, rep), _stream(xp, dims, rep, backward=True),
                _fused_channels(dims[1], threads))
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plan
    same, kind, *rest = plan
    return (x if same else _prepare(x, x, kind), *rest)


def train_lean(x, eps, weight, bias, running):
    """:func:`forward_train` of the whole batch, plain batch norm: ``(y, stats)`` with ``stats``
    the ``(3, 1, C)`` numpy array of mean, variance and count (:func:`_finish`) that
    :func:`backward_lean` takes; ``running`` (or ``None``) as :func:`forward_train_act`'s."""
    threads = _threads(x.numel())
    x, dims, rep, nb, stream, _, fused = _plan(x, threads)
    y = torch.empty_like(x)
    acc = acc_dtype(x.dtype)
    out = np.empty((3, 1, dims[1]), dtype=NUMPY_DTYPES[acc])
    w, b = channel_vector(weight, x), channel_vector(bias, x)
    update = ref.kernel_can_update(running, x.device, acc, checks_finite=True)
    o = out.ctypes.data
    rm, rv = (running.mean.data_ptr(), running.var.data_ptr()) if update else (o, o)  # type: ignore[union-attr]
    xa = x.data_ptr()
    ok = _train(addresses(xa, xa, y.data_ptr(), address(w), address(b), o, rm, rv, *dims), PROTOTYPES[x.dtype], rep,
                False, float(eps), 0, 0.0, float(running.momentum) if update else 0.0, update,  # type: ignore[union-attr]
                update and running.skip_nonfinite, stream, fused, nb)  # type: ignore[union-attr]
    if update:
        running.accepted = ok  # type: ignore[union-attr]
        if ok:
            torch.autograd.graph.increment_version((running.mean, running.var))  # type: ignore[union-attr]
    elif running is not None:
        mean, var, _ = lean_stats(out)
        ref.update_running(running, mean, var, dims[0] * dims[2])
    return y, out


def lean_stats(stats: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, count)`` as :func:`forward_train` returns them, from :func:`train_lean`'s array."""
    return torch.from_numpy(stats[0]), torch.from_numpy(stats[1]), torch.from_numpy(stats[2, 0, :1])


def backward_lean(dy, x, stats, eps, weight, need_input_grad):
    """:func:`backward_train` from :func:`train_lean`'s statistics: ``(dx or None, dweight, dbias)``."""
    threads = _threads(x.numel())
    x, dims, rep, nb, _, stream, fused = _plan(x, threads)
    dy = _prepare(dy, x, "rows" if rep else "planes") if dy.stride() != x.stride() else dy
    dx = torch.empty_like(x) if need_input_grad else None
    sums = np.empty((2, dims[1]), dtype=stats.dtype)  # sum(g), sum(g * xhat)
    w = channel_vector(weight, x)
    xa = x.data_ptr()
    o = stats.ctypes.data
    _bwd(addresses(dy.data_ptr(), xa, xa, address(dx, xa), xa, o, o + stats.strides[0], address(w), 0, sums.ctypes.data,
               *dims), PROTOTYPES[x.dtype], rep, False, 0, 0.0, float(eps), True, bool(need_input_grad), False, stream,
         fused, nb)
    return dx, torch.from_numpy(sums[1]), torch.from_numpy(sums[0])  # (own storages, as _backward_act's)


# ------------------------------------------------------------------ fused activation wrappers


def _residual(r: Tensor | None, x: Tensor, kind: str) -> Tensor | None:
    """The residual in ``x``'s dtype and the memory format the kernels read."""
    return None if r is None else _prepare(r.to(x.dtype), x, kind)


def forward_train_act(x, residual, eps, weight, bias, mask, vbs, act, slope, running=None):
    """``y = act(bn(x) [+ residual])`` in training mode: ``(y, mean, var, count)``; ``running``
    (:class:`~batchnorm.kernels.reference.Running`) is moved by the same call."""
    threads = _threads(x.numel())
    kind = _shape_kind(x)
    x = _prepare(x, x, kind)
    dims, rep, nb = _view(x, kind, threads)
    y = torch.empty_like(x)
    r = _residual(residual, x, kind)
    acc = acc_dtype(x.dtype)
    # mean, var, count (see _finish) in one buffer; separate tensors, as a custom op's outputs
    # must not share storage
    out = np.empty((3, 1, dims[1]), dtype=NUMPY_DTYPES[acc])
    mean, var, count = torch.from_numpy(out[0]), torch.from_numpy(out[1]), torch.from_numpy(out[2, 0, :1])
    w, b = channel_vector(weight, x), channel_vector(bias, x)
    update = ref.kernel_can_update(running, x.device, acc, checks_finite=True)
    o = mean.data_ptr()
    rm, rv = (running.mean.data_ptr(), running.var.data_ptr()) if update else (o, o)  # type: ignore[union-attr]
    xa = x.data_ptr()
    ok = _train(addresses(xa, address(r, xa), y.data_ptr(), address(w), address(b), o, rm, rv, *dims),
                PROTOTYPES[x.dtype], rep, r is not None, float(eps), ACT_CODES[act], float(slope),
                float(running.momentum) if update else 0.0, update,  # type: ignore[union-attr]
                update and running.skip_nonfinite, _stream(x, dims, rep), _fused_channels(dims[1], threads), nb)  # type: ignore[union-attr]
    if update:
        running.accepted = ok  # type: ignore[union-attr]
    ref.finish_running(running, update, mean, var, dims[0] * dims[2])
    return y, mean, var, count


def forward_apply_act(x, residual, mean, var, eps, weight, bias, act, slope):
    """``y = act(bn(x; mean, var) [+ residual])`` with given ``(C,)`` statistics."""
    _threads(x.numel())
    kind = _shape_kind(x)
    x = _prepare(x, x, kind)
    y = torch.empty_like(x)
    r = _residual(residual, x, kind)
    vecs = channel_vector(mean, x), channel_vector(var, x), channel_vector(weight, x), channel_vector(bias, x)
    xa = x.data_ptr()
    dims, rep, _ = _view(x, kind)
    _apply(addresses(xa, address(r, xa), y.data_ptr(), *[address(v) for v in vecs], *dims), PROTOTYPES[x.dtype], rep,
           r is not None, float(eps), ACT_CODES[act], float(slope), _stream(x, dims, rep))
    return y


def _backward_act(dy, x, residual, mean, var, eps, weight, bias, act, slope, train, need_dx, need_dr):
    """Both backwards: ``(mean, var)`` the training forward's batch statistics (``train``) or the
    given ones."""
    threads = _threads(x.numel())
    kind = _shape_kind(x)
    x = _prepare(x, x, kind)
    dy = _prepare(dy, x, kind)
    dims, rep, nb = _view(x, kind, threads)
    r = _residual(residual, x, kind)
    dx = torch.empty_like(x) if need_dx else None
    dr = torch.empty_like(x) if need_dr else None
    sums = np.empty((2, dims[1]), dtype=NUMPY_DTYPES[acc_dtype(x.dtype)])  # sum(g), sum(g * xhat)
    sum_dy, sum_dot = torch.from_numpy(sums[0]), torch.from_numpy(sums[1])  # (not sharing a storage)
    vecs = channel_vector(mean, x), channel_vector(var, x), channel_vector(weight, x), channel_vector(bias, x)
    xa = x.data_ptr()
    _bwd(addresses(dy.data_ptr(), xa, address(r, xa), address(dx, xa), address(dr, xa), *[address(v) for v in vecs],
               sum_dy.data_ptr(), *dims), PROTOTYPES[x.dtype], rep, r is not None, ACT_CODES[act], float(slope),
         float(eps), bool(train), bool(need_dx), bool(need_dr), _stream(x, dims, rep, backward=True),
         _fused_channels(dims[1], threads), nb)
    return dx, sum_dot, sum_dy, dr


def backward_train_act(dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    """Backward of :func:`forward_train_act` from its statistics: ``(dx, dweight, dbias, dresidual)``."""
    return _backward_act(dy, x, residual, mean, var, eps, weight, bias, act, slope, True,
                         need_input_grad, need_residual_grad)


def backward_apply_act(dy, x, residual, mean, var, eps, weight, bias, act, slope,
                       need_input_grad=True, need_residual_grad=False):
    """Backward of :func:`forward_apply_act` (statistics constant): ``(dx, dweight, dbias, dresidual)``."""
    return _backward_act(dy, x, residual, mean, var, eps, weight, bias, act, slope, False,
                         need_input_grad, need_residual_grad)


_DTYPES = (torch.float32, torch.float64)
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
#: The kernels of this backend, got without blocking a call (see :mod:`batchnorm.kernels._jit`).
KERNELS = _jit.Kernels(__name__, ENTRIES, entry_signature, sorted(Path(__file__).parent.glob("*.py")))


def prepared(op: str, x: Tensor, wait: bool = False) -> bool:
    """Whether the compiled driver of ``op`` for ``x``'s dtype is loaded in this process; if not,
    it is being got in the background (see :mod:`batchnorm.kernels._jit`), or, with ``wait``,
    waited for. The dispatcher asks this after :func:`supports` said yes."""
    entry = ENTRY_OF[op]
    dtype = _DTYPE_NAMES[x.dtype]
    return (entry, dtype) in KERNELS._ready or KERNELS.ready(entry, dtype, wait)


def supports(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
    """Dense float32/float64 CPU tensors (of at least :data:`MIN_NUMEL` elements), no mask, one group."""
    if op not in OPS:
        return False
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2:
        return False
    if mask is not None or (0 < vbs < x.shape[0]):
        return False
    if x.numel() < MIN_NUMEL or x.shape[1] == 0:
        return False
    return True


register_backend(name, __import__(__name__, fromlist=["name"]), priority=50)
