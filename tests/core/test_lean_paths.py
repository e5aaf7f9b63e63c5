"""The layers' lean eager paths (batchnorm._lean.layer_call_lean) against torch's layers:
the cpu backend's one-call training forward and its backward, and ATen's kernel for small
inference calls (the ``aten`` backend), with the dispatcher choosing as in normal use."""

from __future__ import annotations

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
        assert type(ya.grad_fn).__name__ == "_TrainLeanBackward"
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
