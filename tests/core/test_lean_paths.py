"""The layers' lean eager paths (batchnorm._lean) against torch's layers: the cpu backend's
one-call training forward and its backward, ATen's kernel for small (N, C) training calls and
small inference calls (the ``aten`` backend), with the dispatcher choosing as in normal use."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm import kernels


@pytest.fixture
def cpu_ready():
    if "cpu" not in bn.available_backends():
        pytest.fail("the cpu backend is not available (numba missing?)")
    from batchnorm.kernels import cpu

    for dtype in ("float32", "float64"):
        for entry in cpu.KERNELS.entries:
            cpu.KERNELS.ready(entry, dtype, wait=True)


@pytest.fixture(params=["native", "python"])
def guard(request, monkeypatch):
    """Each guarded small-row test runs twice: with the guard inside the native training call
    (kernels/native.py, built here if this machine has not built it) and with the guard in Python
    (what runs until it is loaded, or where it cannot be built)."""
    from batchnorm.kernels.native import NATIVE

    if request.param == "native":
        if NATIVE.wait(timeout=600) is None:
            pytest.fail(f"the native training call is not available: {NATIVE.state} ({NATIVE.reason})")
    else:
        monkeypatch.setattr(NATIVE, "train", None)
        monkeypatch.setattr(NATIVE, "state", "off")
    return request.param


def _pair(shape, dtype, **kw):
    torch.manual_seed(0)
    cls_ours = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}[len(shape)]
    cls_torch = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    theirs = cls_torch(shape[1], dtype=dtype, **kw)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
    ours = cls_ours(shape[1], dtype=dtype, **kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


CASES = [((256, 100), torch.contiguous_format), ((64, 16, 8, 8), torch.contiguous_format),
         ((8, 6, 5, 5), torch.channels_last), ((5, 7, 9), torch.contiguous_format),
         ((2, 3, 4, 5, 6), torch.contiguous_format)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, fmt", CASES)
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"momentum": 0.3}])
def test_training_steps_and_eval_equal_torch(cpu_ready, shape, fmt, dtype, kw):
    """Three training steps (outputs, input and parameter gradients, running statistics, batch
    count) and an eval call, with the backend the dispatcher picks."""
    ours, theirs = _pair(shape, dtype, **kw)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for step in range(3):
        x = (torch.randn(shape, dtype=dtype) * (step + 1) + step).contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert kernels.select("forward_train", x).name == "cpu"
        lean = "NativeBatchNormBackward0" if kernels.aten.trains(x) else "_TrainLeanBackward"
        assert type(ya.grad_fn).__name__ == lean
        assert ya.is_contiguous(memory_format=fmt)
        dy = torch.randn_like(yb)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
        if theirs.weight is not None:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=tol["rtol"], atol=tol["atol"] * 100)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=tol["rtol"], atol=tol["atol"] * 100)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == step + 1
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    small = x.numel() <= kernels.aten.MAX_NUMEL
    assert kernels.select("forward_apply", x).name == ("aten" if small else "cpu")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, **tol)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **tol)


def test_nonfinite_batch_on_the_lean_path(cpu_ready):
    """nonfinite='skip' (the default) leaves the running statistics and the batch count alone with
    a warning pointing at the caller's layer; 'raise' raises; 'propagate' writes like torch."""
    x = torch.randn(64, 10)
    x[3, 2] = float("nan")
    layer = bn.BatchNorm1d(10)
    layer(torch.randn(64, 10))
    before = layer.running_mean.clone(), layer.running_var.clone()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        layer(x)
    assert [str(m.message) for m in w] == [
        "batch statistics are not finite (NaN or inf in the batch): running statistics keep their last good "
        "values (nonfinite='skip')"]
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == 1
    with pytest.raises(FloatingPointError, match="batch statistics are not finite"):
        bn.BatchNorm1d(10, nonfinite="raise")(x)
    ours, theirs = bn.BatchNorm1d(10, nonfinite="propagate"), nn.BatchNorm1d(10)
    ours(x), theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, equal_nan=True)
    assert int(ours.num_batches_tracked) == 1


def test_bad_parameters_keep_our_errors(cpu_ready):
    """A running buffer or parameter of the wrong size is named by our InputError on both lean
    paths (never read out of bounds by a kernel, nor reported by ATen)."""
    layer = bn.BatchNorm1d(10)
    layer.running_mean = torch.zeros(7)
    with pytest.raises(bn.InputError, match="running_mean should contain 10 elements not 7"):
        layer(torch.randn(16, 10))
    layer.eval()
    with pytest.raises(bn.InputError, match="running_mean should contain 10 elements not 7"):
        layer(torch.randn(16, 10))
    layer = bn.BatchNorm1d(10)
    layer.weight = nn.Parameter(torch.ones(12))
    with pytest.raises(bn.InputError, match="weight should contain 10 elements not 12"):
        layer(torch.randn(16, 10))
    with pytest.raises(bn.InputError, match="Expected more than 1 value per channel when training"):
        bn.BatchNorm1d(10)(torch.randn(1, 10))


def test_forward_ad_and_vmap_in_eval_equal_torch():
    """Transforms do not take the ATen shortcut's node of their own accord: jvp and vmap in eval
    mode equal torch's."""
    ours, theirs = _pair((32, 10), torch.float64)
    ours.eval()
    theirs.eval()
    x, t = torch.randn(32, 10, dtype=torch.float64), torch.randn(32, 10, dtype=torch.float64)
    ya, ja = torch.func.jvp(ours, (x,), (t,))
    yb, jb = torch.func.jvp(theirs, (x,), (t,))
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(ja, jb)
    xs = torch.randn(3, 32, 10, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(ours)(xs), torch.func.vmap(theirs)(xs))


def test_forced_backends_skip_the_aten_shortcut():
    """A forced backend computes inference itself (the ATen backend runs only when chosen)."""
    x = torch.randn(16, 4)
    with bn.use_backend("reference"):
        assert kernels.select("forward_apply", x).name == "reference"
    assert kernels.select("forward_apply", x).name == "aten"
    assert kernels.select("forward_apply", torch.randn(1024, 256)).name != "aten"
    assert kernels.select("forward_train", x).name != "aten"


def test_backend_variable_is_read_at_each_call(monkeypatch):
    """BATCHNORM_BACKEND set or removed while running takes effect at the next call."""
    x = torch.randn(16, 4)
    monkeypatch.setenv("BATCHNORM_BACKEND", "reference")
    assert kernels.get_backend() == "reference"
    assert kernels.select("forward_apply", x).name == "reference"
    monkeypatch.setenv("BATCHNORM_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown batch-norm backend 'nonsense'; available: auto"):
        kernels.get_backend()
    monkeypatch.delenv("BATCHNORM_BACKEND")
    assert kernels.get_backend() == "auto"
    assert kernels.select("forward_apply", x).name == "aten"


ROWS = [(2, 1), (2, 255), (3, 256), (64, 257), (256, 100), (128, 1024), (1024, 256), (1025, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ROWS)
def test_small_rows_train_on_aten_up_to_the_limit(cpu_ready, guard, shape, dtype):
    """(N, C) training calls up to aten.TRAIN_MAX_NUMEL values (1024 x 256 is the last, 1025 x 256
    the first beyond) run on ATen's kernel and autograd; outputs, gradients (first and second
    order), running statistics and batch count equal torch's layer's over three steps."""
    assert kernels.aten.TRAIN_MAX_NUMEL == 1024 * 256, "ROWS brackets the limit: move its last two shapes with it"
    ours, theirs = _pair(shape, dtype)
    on_aten = shape[0] * shape[1] <= kernels.aten.TRAIN_MAX_NUMEL
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for step in range(3):
        x = torch.randn(shape, dtype=dtype) * (step + 2) - step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert type(ya.grad_fn).__name__ == ("NativeBatchNormBackward0" if on_aten else "_TrainLeanBackward")
        dy = torch.randn_like(yb)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(xa.grad, xb.grad, **tol)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=tol["rtol"], atol=tol["atol"] * 100)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
        assert int(ours.num_batches_tracked) == step + 1
    if dtype == torch.float64 and shape[0] * shape[1] <= 1024:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        assert torch.autograd.gradcheck(ours, (x,)) and torch.autograd.gradgradcheck(ours, (x,))


OPTIONS = [{"momentum": None}, {"track_running_stats": False}, {"affine": False}, {"momentum": 0.5, "eps": 1e-3},
           {"bias": False}, {"update_running_stats": False}, {"use_running_stats": True}, {"train_affine": False},
           {"virtual_batch_size": 8}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_small_rows_with_every_option_keep_their_meaning(cpu_ready, guard, options):
    """Each layer option the ATen shortcut does not take (cumulative momentum, frozen statistics,
    frozen gamma/beta, ghost batches) sends the call down our path, and each it takes keeps its
    meaning: the result equals the same layer computed on the reference backend (forced, so no
    shortcut), step by step, including running statistics and batch count."""
    torch.manual_seed(0)
    ctor = {k: v for k, v in options.items() if k not in ("update_running_stats", "use_running_stats", "train_affine")}
    knobs = {k: v for k, v in options.items() if k not in ctor}
    layers = [bn.BatchNorm1d(16, **ctor) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    for layer in layers:
        for k, v in knobs.items():
            setattr(layer, k, v)
    for step in range(3):
        x = torch.randn(32, 16, dtype=torch.float64).float() * (step + 1)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = layers[0](xa)
        with bn.use_backend("reference"):
            yb = layers[1](xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for name, t in layers[0].state_dict().items():
            torch.testing.assert_close(t, layers[1].state_dict()[name], rtol=1e-5, atol=1e-6)
        for pa, pb in zip(layers[0].parameters(), layers[1].parameters()):
            assert (pa.grad is None) == (pb.grad is None)
            if pa.grad is not None:
                torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_small_rows_nonfinite_batch_on_aten(guard, bad):
    """The guard around ATen's update: a NaN or +-inf in a small (N, C) batch leaves the running
    statistics and the batch count as they were (a warning with 'skip', an error with 'raise'),
    while 'propagate' writes what torch's layer writes."""
    x = torch.randn(64, 10)
    x[5, 3] = bad
    assert kernels.aten.trains(x)
    for mode in ("skip", "raise"):
        layer = bn.BatchNorm1d(10, nonfinite=mode)
        layer(torch.randn(64, 10) * 3 + 1)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        if mode == "skip":
            with pytest.warns(RuntimeWarning, match="running statistics keep their last good values"):
                y = layer(x)
            assert torch.isfinite(y[:, :3]).all() and not torch.isfinite(y[:, 3]).all()
        else:
            with pytest.raises(FloatingPointError, match="running statistics were left unchanged"):
                layer(x)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), k
    ours, theirs = bn.BatchNorm1d(10, nonfinite="propagate"), nn.BatchNorm1d(10)
    torch.testing.assert_close(ours(x), theirs(x), equal_nan=True)
    torch.testing.assert_close(ours.running_var, theirs.running_var, equal_nan=True)
    assert not torch.isfinite(ours.running_var[3]) and int(ours.num_batches_tracked) == 1


def test_forced_backends_and_transforms_skip_the_aten_training_shortcut(cpu_ready):
    """A forced backend computes training itself, and torch.func transforms take the composite
    path: the ATen shortcut runs only in plain eager mode with the dispatcher choosing."""
    x = torch.randn(32, 8, requires_grad=True)
    layer = bn.BatchNorm1d(8)
    assert type(layer(x).grad_fn).__name__ == "NativeBatchNormBackward0"
    with bn.use_backend("cpu"):
        assert type(layer(x).grad_fn).__name__ == "_TrainLeanBackward"
    with bn.use_backend("reference"):
        assert type(layer(x).grad_fn).__name__ != "NativeBatchNormBackward0"
    import torch.autograd.forward_ad as fwad

    ours, theirs = _pair((32, 8), torch.float64)
    xd, t = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    with fwad.dual_level():
        ya, ja = fwad.unpack_dual(ours(fwad.make_dual(xd, t)))
        yb, jb = fwad.unpack_dual(theirs(fwad.make_dual(xd, t)))
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(ja, jb)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def _replace_buffers(layer):
    layer.running_var = torch.full((10,), 2.0)
    layer.running_mean = torch.full((10,), 0.5)
    return layer


def _swap_storage(layer):
    layer.running_var.data = torch.full((10,), 3.0)
    layer.running_mean.set_(torch.full((10,), -1.0))
    return layer


def _strided_buffers(layer):
    """Buffers that are views with a stride of 2 (the native call keeps and restores them as tensors)."""
    layer.running_mean = torch.zeros(20)[::2]
    layer.running_var = torch.ones(20)[::2]
    return layer


@pytest.mark.parametrize("change", [
    _replace_buffers, _swap_storage, _strided_buffers,
    lambda layer: layer.double(),
    lambda layer: copy.deepcopy(layer),
    lambda layer: pickle.loads(pickle.dumps(layer)),
    lambda layer: (layer.load_state_dict(bn.BatchNorm1d(10).state_dict()), layer)[1],
], ids=["replaced", "storage", "strided", "double", "deepcopy", "pickle", "load_state_dict"])
def test_small_rows_guard_follows_the_buffers_it_protects(guard, change):
    """The Python guard keeps numpy views of the running statistics between calls (kernels.aten.Guard);
    after the buffers are replaced, moved to other storage or another dtype, or the layer is
    copied, a NaN batch must still leave the *current* buffers as they were and a good batch
    must still move them as torch's layer moves its own."""
    layer = bn.BatchNorm1d(10)
    layer(torch.randn(64, 10) * 2 + 1)  # the guard's views made for the first buffers
    layer = change(layer)
    dt = layer.running_var.dtype
    bad = torch.randn(64, 10, dtype=dt)
    bad[7, 4] = float("nan")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="running statistics keep their last good values"):
        layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    theirs = nn.BatchNorm1d(10).to(dt)
    theirs.load_state_dict(layer.state_dict())
    good = torch.randn(64, 10, dtype=dt) * 3 - 1
    torch.testing.assert_close(layer(good), theirs(good))
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["enable_grad", "no_grad", "inference_mode"])
def test_small_rows_transposed_input_under_each_grad_mode(guard, mode):
    """A transposed (non-contiguous) (N, C) batch under each grad mode takes the ATen route and
    gives torch's layer's output, running statistics and batch count."""
    ours, theirs = bn.BatchNorm1d(50), nn.BatchNorm1d(50)
    x = torch.randn(50, 64).t()
    assert not x.is_contiguous() and kernels.aten.trains(x)
    with getattr(torch, mode)():
        ya, yb = ours(x), theirs(x)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 1


def test_native_and_python_guard_compute_the_same_bits(monkeypatch):
    """A process switches from the Python guard to the native call when the build is loaded, in the
    middle of a run: both must give the same bits (outputs, gradients, running statistics, count),
    or a lab run's result would depend on when the build finished."""
    from batchnorm.kernels.native import NATIVE

    if NATIVE.wait(timeout=600) is None:
        pytest.fail(f"the native training call is not available: {NATIVE.state} ({NATIVE.reason})")
    torch.manual_seed(0)
    layers = [bn.BatchNorm1d(100), bn.BatchNorm1d(100)]
    for step in range(5):
        x = torch.randn(256, 100) * (step + 1) + step
        dy = torch.randn(256, 100)
        results = []
        for native, layer in zip((True, False), layers):
            with monkeypatch.context() as m:
                if not native:
                    m.setattr(NATIVE, "train", None)
                xi = x.clone().requires_grad_()
                y = layer(xi)
                y.backward(dy)
            results.append([y, xi.grad, layer.weight.grad, layer.bias.grad, *layer.state_dict().values()])
        for a, b in zip(*results):
            assert torch.equal(a, b)
