"""Drop-in behaviour that code written against ``torch.nn`` relies on, checked against torch itself.

Each test runs the same scenario on torch's layer and ours (on every CPU backend) and compares
what a caller can observe: outputs, buffers, gradients, exception classes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import batchnorm as bn
import batchnorm.functional as BF


@pytest.fixture(params=["cpu", "reference"])
def backend(request):
    with bn.use_backend(request.param):
        yield request.param


def _pair(cls_t, cls_b, *args, **kwargs):
    t, b = cls_t(*args, **kwargs), cls_b(*args, **kwargs)
    with torch.no_grad():
        for m in (t, b):
            if m.weight is not None:
                m.weight.copy_(torch.linspace(0.5, 1.5, m.num_features))
                m.bias.copy_(torch.linspace(-1, 1, m.num_features))
    return t, b


def test_size_mismatch_is_a_runtime_error_like_torch(backend):
    """torch raises RuntimeError for a wrong channel count; code catching it must catch ours."""
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError):
        nn.BatchNorm2d(3)(x)
    with pytest.raises(RuntimeError, match="num_features"):
        bn.BatchNorm2d(3)(x)
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 3"):
        BF.batch_norm(x, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError):  # and still a ValueError, this library's convention
        BF.batch_norm(x, torch.zeros(3), torch.ones(3))
    assert issubclass(bn.InputError, ValueError) and issubclass(bn.InputError, RuntimeError)


@pytest.mark.parametrize("training_first", [True, False])
def test_track_running_stats_switched_off_after_construction(backend, training_first):
    """torch reads ``track_running_stats`` at every call: in training the batch statistics are used
    and the buffers stay; in eval the buffers (which still exist) are used."""
    t, b = _pair(nn.BatchNorm2d, bn.BatchNorm2d, 3)
    for m in (t, b):
        m.track_running_stats = False
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    for training in ((True, False) if training_first else (False, True)):
        for m in (t, b):
            m.train(training)
        torch.testing.assert_close(b(x), t(x), rtol=1e-5, atol=1e-5)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(b, k), getattr(t, k))


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_like_torch(backend, cls, momentum):
    """An empty batch: empty output, zero gradients for gamma and beta, running statistics
    untouched, ``num_batches_tracked`` incremented (which changes the next cumulative average)."""
    t, b = _pair(getattr(nn, cls), getattr(bn, cls), 3, momentum=momentum)
    dims = {"BatchNorm1d": (5,), "BatchNorm2d": (2, 2), "BatchNorm3d": (2, 2, 2)}[cls]
    for m in (t, b):
        x = torch.randn(0, 3, *dims, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape
        y.sum().backward()
    torch.testing.assert_close(b.weight.grad, t.weight.grad)
    torch.testing.assert_close(b.bias.grad, t.bias.grad)
    x = torch.randn(4, 3, *dims)
    torch.testing.assert_close(b(x), t(x), rtol=1e-5, atol=1e-5)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(b, k), getattr(t, k))


def test_empty_batch_fused_layer_counts_and_has_zero_grads(backend):
    layer = bn.BatchNormAct2d(3)
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    layer(x).sum().backward()
    assert layer.num_batches_tracked.item() == 1
    assert torch.equal(layer.weight.grad, torch.zeros(3)) and torch.equal(layer.running_mean, torch.zeros(3))


def test_empty_1d_input_functional(backend):
    x = torch.empty(0)
    for training in (True, False):
        args = (x, torch.zeros(0), torch.ones(0))
        assert BF.batch_norm(*args, training=training).shape == TF.batch_norm(*args, training=training).shape


@pytest.mark.parametrize("cls", ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"])
def test_lazy_without_affine_or_running_stats(backend, cls):
    shape = {"LazyBatchNorm1d": (4, 5), "LazyBatchNorm2d": (4, 5, 2, 2), "LazyBatchNorm3d": (4, 5, 2, 2, 2)}[cls]
    t = getattr(nn, cls)(affine=False, track_running_stats=False)
    b = getattr(bn, cls)(affine=False, track_running_stats=False)
    x = torch.randn(*shape)
    torch.testing.assert_close(b(x), t(x), rtol=1e-5, atol=1e-5)
    assert b.num_features == 5 and type(b).__name__ == type(t).__name__


@pytest.mark.parametrize("training", [True, False])
def test_meta_tensors(backend, training):
    t = nn.BatchNorm2d(3, device="meta").train(training)
    b = bn.BatchNorm2d(3, device="meta").train(training)
    x = torch.empty(2, 3, 4, 4, device="meta")
    yt, yb = t(x), b(x)
    assert yb.device.type == "meta" and yb.shape == yt.shape and yb.dtype == yt.dtype
    assert b.running_mean.device.type == "meta"


def test_axis_out_of_range_is_refused():
    layer = bn.BatchNorm(3, axis=-4)
    with pytest.raises(ValueError, match="axis -4 does not exist in a 3D input"):
        layer(torch.randn(2, 3, 3))
    assert bn.BatchNorm(3, axis=-4)(torch.randn(2, 3, 2, 2, 2)).shape == (2, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="axis 3 does not exist"):
        bn.BatchNorm(3, axis=3)(torch.randn(2, 3, 3))


def test_convert_sync_batchnorm_reuses_parameters_like_torch():
    """torch's convert_sync_batchnorm keeps the Parameter objects, so an optimizer built before the
    conversion still trains the model."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    buffers = [model[1].running_mean, model[3].running_var]
    synced = bn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert synced is model and type(model[1]) is bn.SyncBatchNorm and type(model[3]) is bn.SyncBatchNorm
    assert model[1].running_mean is buffers[0] and model[3].running_var is buffers[1]
    before = model[3].weight.detach().clone()
    model(torch.randn(4, 3, 2, 2)).sum().backward()
    opt.step()
    assert not torch.equal(model[3].weight, before), "the optimizer no longer trains the converted layer"
    weight = model[1].weight
    reverted = bn.SyncBatchNorm.revert_sync_batchnorm(model)
    assert type(reverted[1]) is bn.BatchNorm2d and type(reverted[3]) is nn.BatchNorm2d
    assert reverted[1].weight is weight


def test_convert_sync_batchnorm_refuses_what_it_cannot_keep():
    model = nn.Sequential(bn.BatchNorm1d(4, virtual_batch_size=2), bn.BatchNormAct1d(4, act="relu"))
    with pytest.raises(ValueError, match=r"0 \(BatchNorm1d\): ghost batches[\s\S]*1 \(BatchNormAct1d\)"):
        bn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[0]) is bn.BatchNorm1d and type(model[1]) is bn.BatchNormAct1d  # nothing changed


def test_jit_script_says_what_to_use_and_trace_works(backend):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="torch.jit.script cannot compile BatchNorm2d.*torch.compile"):
        torch.jit.script(model)
    x = torch.randn(2, 3, 4, 4)
    for training in (False, True):  # a trace records the mode it was taken in, as with torch's layers
        model.train(training)
        reference = copy.deepcopy(model)
        with pytest.warns(torch.jit.TracerWarning):
            traced = torch.jit.trace(copy.deepcopy(model), x, check_trace=False)
        reference(x)
        torch.testing.assert_close(traced(x * 2), reference(x * 2))
        torch.testing.assert_close(traced.state_dict()["1.running_var"], reference[1].running_var)


def test_layers_are_torch_batchnorm_instances():
    """So that code recognising BN by torch's base class (functorch, DDP, other libraries) sees ours."""
    for layer in (bn.BatchNorm2d(3), bn.BatchNorm(3), bn.LazyBatchNorm1d(), bn.BatchRenorm2d(3),
                  bn.BatchNormAct2d(3), bn.SyncBatchNorm(3)):
        assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(bn.FrozenBatchNorm2d(3), nn.modules.batchnorm._BatchNorm)  # no statistics to track
