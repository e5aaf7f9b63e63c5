"""LazyBatchNorm tests of PyTorch's ``test/nn/test_lazy_modules.py``, on ``batchnorm.LazyBatchNorm1d/2d/3d``.

Source: ``test/nn/test_lazy_modules.py`` (class ``TestLazyModules``), read from the fork
cyyever/pytorch at commit 3a6bd5f93a2b73fc5675ff2ced9a05c2ccecf94f (a recent copy of pytorch/pytorch's
file). Ported: ``test_lazy_batchnorm{1,2,3}d`` (``_check_lazy_norm``: every affine x
track_running_stats combination materializes into the eager class and matches it),
``test_lazy_batchnorm{1,2,3}d_pickle`` (``_check_lazy_norm_pickle``),
``test_lazy_batchnorm{1,2,3}d_state`` (``_check_lazy_batchnorm_state``),
``test_lazy_batchnorm_with_dict_input``; and, restated on a LazyBatchNorm instead of the file's
bare ``LazyModule`` with one uninitialized parameter, ``test_optimizer_pass`` and
``test_materialize_dtype``.

Not ported: the Linear/Conv/ConvTranspose/InstanceNorm lazy tests (other layers), the generic
``LazyModuleMixin`` tests (``test_lazy_module_parameter``/``_buffer``, share_memory, hooks,
weight/spectral norm, ``test_invalid_functions``: properties of torch's mixin, not of a layer) and
``TestLazyModulesDevice.test_materialize_device`` (accelerator device).
"""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.nn.parameter import Parameter, UninitializedBuffer, UninitializedParameter

import batchnorm as B

from ._common import assert_equal


def _check_lazy_norm(cls, lazy_cls, input_shape):
    for affine in (False, True):
        for track_running_stats in (False, True):
            lazy_module = lazy_cls(affine=affine, track_running_stats=track_running_stats)
            if affine:
                assert isinstance(lazy_module.weight, UninitializedParameter)
                assert isinstance(lazy_module.bias, UninitializedParameter)
            if track_running_stats:
                assert isinstance(lazy_module.running_mean, UninitializedBuffer)
                assert isinstance(lazy_module.running_var, UninitializedBuffer)

            inp = torch.ones(*input_shape)
            lazy_output = lazy_module(inp)
            assert isinstance(lazy_module, cls)
            assert not isinstance(lazy_module, lazy_cls)

            num_features = input_shape[1]
            module = cls(num_features, affine=affine, track_running_stats=track_running_stats)
            expected_output = module(inp)

            assert_equal(lazy_output, expected_output)
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                ref = getattr(module, name)
                if ref is not None:
                    got = getattr(lazy_module, name)
                    assert got.shape == ref.shape, (name, affine, track_running_stats)
                    assert_equal(got, ref)


def _check_lazy_norm_pickle(cls, lazy_cls, input_shape):
    for affine in (False, True):
        for track_running_stats in (False, True):
            module = lazy_cls(affine=affine, track_running_stats=track_running_stats)
            module = pickle.loads(pickle.dumps(module))
            assert isinstance(module, lazy_cls)
            if affine:
                assert isinstance(module.weight, UninitializedParameter)
                assert isinstance(module.bias, UninitializedParameter)
            if track_running_stats:
                assert isinstance(module.running_mean, UninitializedBuffer)
                assert isinstance(module.running_var, UninitializedBuffer)

            module(torch.ones(*input_shape))  # fully materialized
            module = pickle.loads(pickle.dumps(module))
            assert not isinstance(module, lazy_cls)
            assert isinstance(module, cls)
            if affine:
                assert not isinstance(module.weight, UninitializedParameter)
                assert not isinstance(module.bias, UninitializedParameter)
            if track_running_stats:
                assert not isinstance(module.running_mean, UninitializedBuffer)
                assert not isinstance(module.running_var, UninitializedBuffer)


def _check_lazy_batchnorm_state(cls, lazy_cls):
    module = cls(10)
    lazy_module = lazy_cls(affine=True, track_running_stats=True)
    lazy_module.load_state_dict(module.state_dict())
    # parameters are initialized, but the class only changes at the first forward
    assert not lazy_module.has_uninitialized_params()
    assert lazy_module.weight.shape == (10,)
    assert lazy_module.bias.shape == (10,)
    assert lazy_module.running_mean.shape == (10,)
    assert lazy_module.running_var.shape == (10,)

    module = cls(10)
    lazy_module = lazy_cls()
    with pytest.raises(RuntimeError, match="shape of an uninitialized"):
        module.load_state_dict(lazy_module.state_dict())


def test_lazy_batchnorm1d():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm1d: 3D (16, 3, 6) and 2D (16, 6)
    input, every affine/track_running_stats combination."""
    _check_lazy_norm(B.BatchNorm1d, B.LazyBatchNorm1d, (16, 3, 6))
    _check_lazy_norm(B.BatchNorm1d, B.LazyBatchNorm1d, (16, 6))


def test_lazy_batchnorm1d_pickle():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm1d_pickle."""
    _check_lazy_norm_pickle(B.BatchNorm1d, B.LazyBatchNorm1d, (16, 3, 6))
    _check_lazy_norm_pickle(B.BatchNorm1d, B.LazyBatchNorm1d, (16, 6))


def test_lazy_batchnorm1d_state():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm1d_state: loading an eager state
    dict initializes the lazy layer's parameters and buffers; loading an uninitialized state dict
    into an eager layer raises RuntimeError."""
    _check_lazy_batchnorm_state(B.BatchNorm1d, B.LazyBatchNorm1d)


def test_lazy_batchnorm2d():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm2d: (16, 3, 6, 7) input."""
    _check_lazy_norm(B.BatchNorm2d, B.LazyBatchNorm2d, (16, 3, 6, 7))


def test_lazy_batchnorm2d_pickle():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm2d_pickle."""
    _check_lazy_norm_pickle(B.BatchNorm2d, B.LazyBatchNorm2d, (16, 3, 6, 7))


def test_lazy_batchnorm2d_state():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm2d_state."""
    _check_lazy_batchnorm_state(B.BatchNorm2d, B.LazyBatchNorm2d)


def test_lazy_batchnorm3d():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm3d: (16, 3, 6, 7, 8) input."""
    _check_lazy_norm(B.BatchNorm3d, B.LazyBatchNorm3d, (16, 3, 6, 7, 8))


def test_lazy_batchnorm3d_pickle():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm3d_pickle."""
    _check_lazy_norm_pickle(B.BatchNorm3d, B.LazyBatchNorm3d, (16, 3, 6, 7, 8))


def test_lazy_batchnorm3d_state():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm3d_state."""
    _check_lazy_batchnorm_state(B.BatchNorm3d, B.LazyBatchNorm3d)


def test_lazy_batchnorm_with_dict_input():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_lazy_batchnorm_with_dict_input: the input
    passed as the keyword argument ``input`` materializes the layer and matches the eager one."""
    for cls, lazy_cls, shape in ((B.BatchNorm1d, B.LazyBatchNorm1d, (16, 3, 6)),
                                 (B.BatchNorm2d, B.LazyBatchNorm2d, (16, 3, 6, 7)),
                                 (B.BatchNorm3d, B.LazyBatchNorm3d, (16, 3, 6, 7, 8))):
        kwargs = {"input": torch.ones(*shape)}
        lazy_output = lazy_cls()(**kwargs)
        expected = cls(shape[1])(**kwargs)
        assert_equal(lazy_output, expected)


@pytest.mark.parametrize("optim_cls", [
    torch.optim.Adadelta, torch.optim.Adagrad, torch.optim.Adamax, torch.optim.Adam, torch.optim.AdamW,
    torch.optim.ASGD, torch.optim.SGD, torch.optim.Rprop, torch.optim.RMSprop, torch.optim.LBFGS,
    torch.optim.NAdam, torch.optim.RAdam,
], ids=lambda c: c.__name__)
def test_optimizer_pass(optim_cls):
    """test/nn/test_lazy_modules.py::TestLazyModules::test_optimizer_pass, restated on LazyBatchNorm2d: an
    optimizer built over the uninitialized parameters sees the materialized Parameters after the
    first forward and can step (Adagrad refuses uninitialized parameters with ValueError, as in
    the original)."""
    module = B.LazyBatchNorm2d()
    if optim_cls is torch.optim.Adagrad:
        with pytest.raises(ValueError, match="uninitialized parameter"):
            optim_cls(module.parameters())
        return
    optim = optim_cls(module.parameters(), lr=0.0) if optim_cls is torch.optim.SGD else optim_cls(module.parameters())
    assert isinstance(optim.param_groups[0]["params"][0], UninitializedParameter)
    module(torch.randn(4, 3, 2, 2))
    assert isinstance(optim.param_groups[0]["params"][0], Parameter)
    assert not isinstance(optim.param_groups[0]["params"][0], UninitializedParameter)
    assert optim.param_groups[0]["params"][0] is module.weight
    for p in module.parameters():
        p.grad = torch.rand_like(p)
    if isinstance(optim, torch.optim.LBFGS):
        optim.step(lambda: 1.0)
    else:
        optim.step()


def test_materialize_dtype():
    """test/nn/test_lazy_modules.py::TestLazyModules::test_materialize_dtype, restated on LazyBatchNorm1d:
    materialized parameters and buffers take the default dtype, or float16 after ``.half()`` on
    the still-lazy layer."""
    module = B.LazyBatchNorm1d()
    module(torch.randn(4, 3))
    assert module.weight.dtype == torch.get_default_dtype()
    assert module.running_mean.dtype == torch.get_default_dtype()
    module = B.LazyBatchNorm1d()
    module.half()
    module(torch.randn(4, 3, dtype=torch.float16))
    assert module.weight.dtype == torch.float16
    assert module.running_var.dtype == torch.float16
