"""The numba CPU backend against the float64 reference backend."""

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm.kernels import reference as ref

pytest.importorskip("numba")

SHAPES = [
    (4, 6, 5, 7),  # odd sizes
    (3, 1, 33, 17),  # C = 1 (split path)
    (5, 3, 11, 13),  # C not a multiple of the thread count (split path)
    (64, 7),  # 2D: rows
    (2, 5, 9),  # 3D
    (2, 4, 3, 5, 6),  # 5D
    (2, 16, 1, 1),  # one position per sample (rows)
    (40, 9, 1),  # 3D with one position (rows)
    (1, 8, 40, 41),  # N = 1
    (70, 3, 2, 3),  # small planes as rows, several blocks of rows
    (9, 2, 17, 19),  # planes: a channel's sums flushed to float64 mid-channel
]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


def make(shape, layout, dtype):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    if layout == "channels_last":
        if x.dim() not in (4, 5):
            pytest.skip("channels_last needs 4D/5D")
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.to(dtype).contiguous(memory_format=fmt)
    if layout == "noncontiguous":
        return torch.cat([x, x], dim=-1).to(dtype)[..., ::2]
    return x.to(dtype)


def tol(dtype):
    return {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-11, "rtol": 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_vs_reference(cpu_backend, shape, layout, dtype):
    cpu = cpu_backend
    x = make(shape, layout, dtype)
    c = x.shape[1]
    w = torch.randn(c, dtype=dtype)
    b = torch.randn(c, dtype=dtype)
    eps = 1e-5
    y, mean, var, count = cpu.forward_train(x, eps, w, b, None, 0)
    y64, mean64, var64, count64 = ref.forward_train(x.double(), eps, w.double(), b.double(), None, 0)
    t = tol(dtype)
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.shape == (1, c) and var.shape == (1, c) and count.shape == (1,)
    torch.testing.assert_close(y.double(), y64, **t)
    torch.testing.assert_close(mean.double(), mean64, **t)
    torch.testing.assert_close(var.double(), var64, **t)
    assert count.item() == count64.item()
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)  # keeps the layout

    dy = torch.randn(x.shape, dtype=dtype)
    dx, dw, db = cpu.backward_train(dy, x, mean, var, eps, w, None, count, 0, True)
    dx64, dw64, db64 = ref.backward_train(dy.double(), x.double(), mean64, var64, eps, w.double(), None, count64, 0)
    torch.testing.assert_close(dx.double(), dx64, **t)
    torch.testing.assert_close(dw.double(), dw64, **t)
    torch.testing.assert_close(db.double(), db64, **t)
    dx_none, dw2, _ = cpu.backward_train(dy, x, mean, var, eps, w, None, count, 0, False)
    assert dx_none is None
    torch.testing.assert_close(dw2.double(), dw64, **t)

    ya = cpu.forward_apply(x, mean[0], var[0], eps, w, b)
    ya64 = ref.forward_apply(x.double(), mean64[0], var64[0], eps, w.double(), b.double())
    torch.testing.assert_close(ya.double(), ya64, **t)
    dxa, dwa, dba = cpu.backward_apply(dy, x, mean[0], var[0], eps, w, True)
    dxa64, dwa64, dba64 = ref.backward_apply(dy.double(), x.double(), mean64[0], var64[0], eps, w.double())
    torch.testing.assert_close(dxa.double(), dxa64, **t)
    torch.testing.assert_close(dwa.double(), dwa64, **t)
    torch.testing.assert_close(dba.double(), dba64, **t)


def test_no_affine_and_large_mean(cpu_backend):
    """No weight/bias; a mean far from zero (the one-pass variance would cancel)."""
    cpu = cpu_backend
    x = torch.randn(8, 3, 20, 20) * 0.01 + 1000.0
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        y, mean, var, _ = cpu.forward_train(xx, 1e-5, None, None, None, 0)
        _, mean64, var64, _ = ref.forward_train(xx.double(), 1e-5, None, None, None, 0)
        torch.testing.assert_close(var.double(), var64, rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("shape, first, offset", [((64, 4, 6, 6), 1, 0.0), ((64, 4, 6, 6), 1, 1e4),
                                                  ((8192, 2, 8, 8), 16, 100.0), ((64, 4, 3, 3), 1, 1e4),
                                                  ((8192, 2, 3, 3), 16, 100.0)])
def test_variance_with_misleading_first_values(cpu_backend, shape, first, offset):
    """Both training forwards shift their sums by a pilot mean (planes: the first ~1024 values
    of a channel; rows: 16 rows spread over the tensor): when the first values sit far from the
    rest in units of the channel's std (the (8192, 2, ...) cases: ~23 std off, where the one-pass
    variance is ~5e-7 off) the statistics must still match float64 to float32 rounding. The
    3x3 planes run as rows (as planes in the "planes" variants). channels_last: rows of one
    value per channel, summed 64 rows at a time in float32, so a block holding a whole sample
    10^4 off rounds the rest to ~1e-6 (it was 2e-6 for the variance and 1e-6 for the mean when
    the rows' pilot was the first 16 rows and the mean added back the pilot unrounded)."""
    x = torch.randn(shape) * 0.01 + 3.0
    x[:first] += offset
    _, mean, var, _ = cpu_backend.forward_train(x, 1e-5, None, None, None, 0)
    _, mean64, var64, _ = ref.forward_train(x.double(), 1e-5, None, None, None, 0)
    torch.testing.assert_close(var.double(), var64, rtol=2e-7, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=2e-7, atol=0)
    _, mean, var, _ = cpu_backend.forward_train(x.contiguous(memory_format=torch.channels_last), 1e-5, None, None,
                                                None, 0)
    torch.testing.assert_close(var.double(), var64, rtol=2e-6, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)


def test_small_planes_run_on_the_rows_kernels():
    """Contiguous input with planes shorter than ROWS_MAX_PLANE (and samples of at most
    ROWS_MAX_COLUMNS values) runs as (N, C * L) rows, each channel L columns; the rest on planes."""
    cpu = pytest.importorskip("batchnorm.kernels.cpu")

    def rep(*shape, cl=False):
        x = torch.empty(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return cpu._view(x, cpu._shape_kind(x))[1]

    assert rep(8, 4, 3, 5) == 15
    assert rep(8, 4, 4, 4) == 0  # L = 16: planes
    assert rep(8, 1024, 2, 2) == 4 and rep(8, 2048, 2, 2) == 0  # C * L = 4096 / 8192 columns
    assert rep(8, 4, 5, 5, cl=True) == 1 and rep(8, 4) == 1 and rep(8, 4, 1, 1) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels, rep", [(1, 1), (3, 1), (2, 3), (64, 1), (100, 1), (64, 9), (5, 16)])
def test_tiled_per_channel_columns(channels, rep, dtype):
    """The rows kernels' per-channel operand: channel c at columns c*rep .. c*rep+rep-1, repeated
    past the last column so that W lanes from any column read on (entry k is entry k % P)."""
    base = pytest.importorskip("batchnorm.kernels.cpu.base")
    v = np.random.default_rng(0).standard_normal(channels)
    got = base._tiled(v, np.empty(0, dtype), rep)
    p = channels * rep
    lanes = 32 // np.dtype(dtype).itemsize
    expected = np.array([v[(k % p) // rep] for k in range(p + lanes)], dtype=dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


def test_streaming_needs_size_and_planes_of_whole_lines(monkeypatch):
    """Outputs stream from the size thresholds on, and on the planes kernels only for planes of
    whole 64-byte lines or of at least STREAM_MIN_PLANE_BYTES (short unaligned planes do not)."""
    cpu = pytest.importorskip("batchnorm.kernels.cpu")
    monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(cpu, "STREAM_MIN_BYTES_BACKWARD", 1 << 20)

    def stream(*shape, cl=False, dtype=torch.float32):
        x = torch.empty(shape, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        dims, rep, _ = cpu._view(x, cpu._shape_kind(x))
        return cpu._stream(x, dims, rep), cpu._stream(x, dims, rep, backward=True)

    assert stream(128, 64, 7, 7) == (False, False)  # 196-byte planes
    assert stream(128, 64, 7, 7, dtype=torch.float64) == (False, False)  # 392 bytes
    assert stream(128, 64, 8, 8) == (True, True)  # 4 whole lines
    assert stream(128, 64, 14, 14) == (True, True)  # 784 bytes
    assert stream(128, 64, 7, 7, cl=True) == (True, True)  # rows: one contiguous span
    assert stream(8, 64, 7, 7, cl=True) == (False, False)  # under the size threshold
    monkeypatch.setattr(cpu, "STREAM_MIN_PLANE_BYTES", 0)
    assert stream(128, 64, 7, 7) == (True, True)


def test_nan_propagates(cpu_backend):
    x = torch.randn(4, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    _, mean, var, _ = cpu_backend.forward_train(x, 1e-5, None, None, None, 0)
    assert torch.isnan(mean[0, 2]) and torch.isnan(var[0, 2])
    assert torch.isfinite(mean[0, :2]).all()


def test_dispatch_picks_cpu_where_it_can_and_reference_otherwise(monkeypatch):
    from batchnorm import kernels

    cpu = pytest.importorskip("batchnorm.kernels.cpu")
    big = torch.randn(8, 16, 32, 32)
    assert kernels.select("forward_train", big) is cpu
    assert kernels.select("forward_train", torch.randn(2, 3)) is cpu  # no size is left out by default
    assert kernels.select("forward_train", big.half()) is kernels.reference
    monkeypatch.setattr(cpu, "MIN_NUMEL", 1 << 14)
    assert kernels.select("forward_train", torch.randn(2, 3, 4, 4)) is kernels.reference
    mask = torch.ones(8, 1, 32, 32, dtype=torch.bool)
    assert kernels.select("forward_train", big, mask) is kernels.reference
    assert kernels.select("forward_train", big, None, 4) is kernels.reference
    with batchnorm.use_backend("reference"):
        assert kernels.select("forward_train", big) is kernels.reference
    with batchnorm.use_backend("cpu"):
        assert kernels.select("forward_train", big, mask) is kernels.reference  # falls back


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_through_cpu_backend_matches_torch(channels_last):
    pytest.importorskip("batchnorm.kernels.cpu")
    torch.manual_seed(1)
    x = torch.randn(8, 16, 24, 24, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours = batchnorm.BatchNorm2d(16).double()
    theirs = torch.nn.BatchNorm2d(16).double()
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 2, 16))
            m.bias.copy_(torch.linspace(-1, 1, 16))
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    with batchnorm.use_backend("cpu"):
        ya = ours(xa)
        (ya * torch.arange(ya.numel(), dtype=ya.dtype).reshape(ya.shape).sin()).sum().backward()
    yb = theirs(xb)
    (yb * torch.arange(yb.numel(), dtype=yb.dtype).reshape(yb.shape).sin()).sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    with batchnorm.use_backend("cpu"):
        torch.testing.assert_close(ours(x), theirs(x))


def test_gradcheck_through_cpu_backend(cpu_backend):
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    with batchnorm.use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: torch.ops.batchnorm.train_forward(x, 1e-5, w, b, None, 0)[0], (x, w, b)
        )
        mean = torch.randn(2, dtype=torch.float64)
        var = torch.rand(2, dtype=torch.float64) + 0.5
        assert torch.autograd.gradcheck(
            lambda x, w, b: torch.ops.batchnorm.apply_forward(x, mean, var, 1e-5, w, b), (x, w, b)
        )


def test_calls_leave_torch_thread_count_alone():
    cpu = pytest.importorskip("batchnorm.kernels.cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cpu.forward_train(torch.randn(8, 16, 32, 32), 1e-5, None, None, None, 0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 1, 33, 17), (64, 7), (2, 4, 3, 5, 6)])
def test_split_and_fused_channel_paths(cpu_backend, monkeypatch, shape, layout, dtype, fused):
    """Both the one-channel-per-thread and the split-across-the-batch kernels, plain and fused-act."""
    cpu = cpu_backend
    monkeypatch.setattr(cpu, "_fused_channels", lambda c, threads: fused)
    x = make(shape, layout, dtype)
    c = x.shape[1]
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    dy = torch.randn(x.shape, dtype=dtype)
    t = tol(dtype)
    y, mean, var, count = cpu.forward_train(x, 1e-5, w, b, None, 0)
    y64, mean64, var64, count64 = ref.forward_train(x.double(), 1e-5, w.double(), b.double(), None, 0)
    torch.testing.assert_close(y.double(), y64, **t)
    torch.testing.assert_close(var.double(), var64, **t)
    got = cpu.backward_train(dy, x, mean64, var64, 1e-5, w, None, count64, 0, True)
    exp = ref.backward_train(dy.double(), x.double(), mean64, var64, 1e-5, w.double(), None, count64, 0)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.double(), e, **t)
    got = cpu.backward_apply(dy, x, mean64[0], var64[0], 1e-5, w, True)
    exp = ref.backward_apply(dy.double(), x.double(), mean64[0], var64[0], 1e-5, w.double())
    for a, e in zip(got, exp):
        torch.testing.assert_close(a.double(), e, **t)
    from batchnorm.kernels import reference_act as ra

    r = make(shape, layout, dtype)
    for act in ("identity", "relu", "leaky_relu", "silu"):
        for res in (None, r):
            ya = cpu.forward_train_act(x, res, 1e-5, w, b, None, 0, act, 0.1)[0]
            ya64 = ra.forward_train_act(x.double(), None if res is None else res.double(), 1e-5, w.double(),
                                        b.double(), None, 0, act, 0.1)[0]
            torch.testing.assert_close(ya.double(), ya64, **t)
            for train, fn in ((True, cpu.backward_train_act), (False, cpu.backward_apply_act)):
                rr = None if res is None else res.double()
                if train:
                    got = fn(dy, x, res, mean64, var64, 1e-5, w, b, None, count64, 0, act, 0.1, True, res is not None)
                    exp = ra.backward_train_act(dy.double(), x.double(), rr, mean64, var64, 1e-5, w.double(),
                                                b.double(), None, count64, 0, act, 0.1, True, res is not None)
                else:
                    got = fn(dy, x, res, mean64[0], var64[0], 1e-5, w, b, act, 0.1, True, res is not None)
                    exp = ra.backward_apply_act(dy.double(), x.double(), rr, mean64[0], var64[0], 1e-5, w.double(),
                                                b.double(), act, 0.1, True, res is not None)
                for a, e in zip(got, exp):
                    if e is None:
                        assert a is None
                    else:
                        torch.testing.assert_close(a.double(), e.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("buffers", ["acc", "float64"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (3, 1, 33, 17), (64, 7)])
def test_training_forward_moves_running_statistics(cpu_backend, monkeypatch, shape, layout, dtype, fused, buffers):
    """``forward_train(..., running=)`` moves the running statistics towards the float64 batch
    statistics (the variance unbiased) and bumps their autograd versions; its outputs are those
    of the call without it. Buffers in another dtype than the statistics' take the torch update."""
    cpu = cpu_backend
    monkeypatch.setattr(cpu, "_fused_channels", lambda c, threads: fused)
    x = make(shape, layout, dtype)
    c = x.shape[1]
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    bdt = ref.acc_dtype(dtype) if buffers == "acc" else torch.float64
    rm, rv = torch.randn(c, dtype=bdt), torch.rand(c, dtype=bdt) + 0.5
    rm0, rv0 = rm.double().clone(), rv.double().clone()
    versions = rm._version, rv._version
    got = cpu.forward_train(x, 1e-5, w, b, None, 0, ref.Running(rm, rv, 0.3))
    plain = cpu.forward_train(x, 1e-5, w, b, None, 0)
    for a, e in zip(got, plain):
        assert torch.equal(a, e)
    _, mean64, var64, count64 = ref.forward_train(x.double(), 1e-5, w.double(), b.double(), None, 0)
    n = count64.item()
    t = tol(dtype)
    torch.testing.assert_close(rm.double(), rm0 + 0.3 * (mean64[0] - rm0), **t)
    torch.testing.assert_close(rv.double(), rv0 + 0.3 * (var64[0] * n / (n - 1) - rv0), **t)
    assert rm._version > versions[0] and rv._version > versions[1]
    ya = cpu.forward_train_act(x, None, 1e-5, w, b, None, 0, "relu", 0.0, ref.Running(rm, rv, 1.0))[0]
    torch.testing.assert_close(ya, plain[0].clamp_min(0))
    torch.testing.assert_close(rm.double(), mean64[0], **t)  # momentum 1: the batch's statistics
    torch.testing.assert_close(rv.double(), var64[0] * n / (n - 1), **t)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_skip_nonfinite_leaves_running_statistics_alone(cpu_backend, layout, bad):
    """``Running(skip_nonfinite=True)``: a batch with a non-finite mean or variance (a NaN, an
    inf, or finite values whose variance overflows float32) leaves the buffers and their autograd
    versions as they were and sets ``accepted`` to False; a finite batch moves them exactly as
    without the flag. The outputs are those of the call without ``running``."""
    cpu = cpu_backend
    x = make((6, 3, 4, 5), layout, torch.float32)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    moved = ref.Running(rm.clone(), rv.clone(), 0.3)
    cpu.forward_train(x, 1e-5, None, None, None, 0, moved)
    skipping = ref.Running(rm.clone(), rv.clone(), 0.3, skip_nonfinite=True)
    cpu.forward_train(x, 1e-5, None, None, None, 0, skipping)
    assert skipping.accepted and moved.accepted
    assert torch.equal(skipping.mean, moved.mean) and torch.equal(skipping.var, moved.var)

    x[2, 1, 3, 0] = bad
    if bad == 3e38:
        x[3, 1, 0, 0] = -bad
    running = ref.Running(rm.clone(), rv.clone(), 0.3, skip_nonfinite=True)
    versions = running.mean._version, running.var._version
    got = cpu.forward_train(x, 1e-5, None, None, None, 0, running)
    assert not running.accepted
    assert torch.equal(running.mean, rm) and torch.equal(running.var, rv)
    assert (running.mean._version, running.var._version) == versions
    for a, e in zip(got, cpu.forward_train(x, 1e-5, None, None, None, 0)):
        torch.testing.assert_close(a, e, equal_nan=True, rtol=0, atol=0)
