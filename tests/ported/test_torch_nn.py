"""Batch-norm tests of PyTorch's ``test/test_nn.py``, restated for ``batchnorm``'s layers and functional.

Source: pytorch/pytorch ``test/test_nn.py`` as stored at commit 74f2fa66feec00335f72813782f4802e80bff4cb
(read for torch 2.13, the version installed here): classes ``TestNN``, ``TestNNDeviceType`` (CPU
instantiation), ``TestFusionEval`` and ``TestFusionUtils``. Each test keeps the original name;
its docstring cites the source. Where a test compared a layer with a second instance of the
same class (``ref_bn``), the port keeps that comparison between two of *our* layers and, where
noted, also checks torch's layer on the same data (the layers are drop-in replacements).

Deliberate differences asserted here (documented behaviour of ``batchnorm``):

* bad arguments at construction raise ``ValueError`` (torch accepts some and fails later);
* size mismatches in ``batchnorm.functional.batch_norm`` must raise an exception that is a
  ``RuntimeError`` (as torch's), which the tests assert.

Shapes: where a PyTorch test uses very large tensors, the port keeps the number of values per
channel (what precision and overflow depend on) and reduces the number of channels; each such
change is noted at the test.

Not ported from this file (CUDA/cuDNN only, or no equivalent in ``batchnorm``):
``TestNN.test_batchnorm_cudnn_nhwc`` (cuDNN), ``test_batchnorm_cudnn_half`` (CUDA),
``test_batchnorm_nonaffine_cuda_half_input`` (CUDA), ``test_batchnorm_nhwc_cuda`` (CUDA),
``test_batchnorm_{2D,3D}_{train,inference}_NCHW_vs_native*`` (CUDA with cuDNN on vs off; the
``_vs_cpu`` variants are ported below as our layer against torch's CPU layer),
``test_sync_batchnorm_backward_elemt`` and ``test_sync_batchnorm_accuracy_cuda`` (CUDA kernels of
``torch.batch_norm_*`` primitives), ``test_batch_norm_update_stats`` (checks the aten primitive
``torch.batch_norm_update_stats``, which ``batchnorm`` has no counterpart of),
``TestNNDeviceType.test_batchnorm_eval_mixed`` / ``test_batchnorm_affine_mixed`` /
``test_batchnorm_simple_average_mixed`` (``@onlyCUDA``; their CPU dtypes are covered by the
unmixed versions), ``TestNN.test_state_dict`` (a generic ``Module.state_dict`` test whose BN
part is covered by ``test_module_db.py``). No ``test_batchnorm_nnc`` exists in this version of
the file.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from copy import deepcopy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_weights

import batchnorm as B
from batchnorm import functional as BF

from ._common import assert_equal, assert_grad_and_gradgrad, copy_state

TORCH_CLS = {B.BatchNorm1d: nn.BatchNorm1d, B.BatchNorm2d: nn.BatchNorm2d, B.BatchNorm3d: nn.BatchNorm3d}


def _assert_not_equal(a, b):
    assert not torch.allclose(a, b), f"expected different tensors, got {a} and {b}"


def assert_as_accurate_as_torch(cls, x, grad, *, slack=10.0):
    """Addition to the originals: our layer's training output, input/parameter gradients and running
    statistics are within ``slack`` times torch's own error (plus the dtype's default tolerance)
    of the same computation in float64 (10x: the CPU kernels' precision target, docs/core.md; the
    cpu backend's gamma gradient on (16, 2, 40, 40, 40) float32 measured 4.1x torch's error,
    2026-12-03). Used where the data are large enough that two float32
    implementations legitimately differ by more than the default tolerance."""
    channels = x.shape[1]
    results = []
    for layer, dtype in ((cls(channels), x.dtype), (TORCH_CLS[cls](channels), x.dtype),
                         (TORCH_CLS[cls](channels), torch.float64)):
        layer = layer.to(dtype)
        xi = x.detach().to(dtype).requires_grad_(True)
        y = layer(xi)
        y.backward(grad.to(dtype))
        results.append([t.detach().double() for t in (y, xi.grad, layer.weight.grad, layer.bias.grad,
                                                         layer.running_mean, layer.running_var)])
    names = ("output", "input grad", "weight grad", "bias grad", "running_mean", "running_var")
    rtol = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2}.get(x.dtype, 1.3e-6)
    for name, ours, theirs, truth in zip(names, *results):
        bound = slack * (theirs - truth).abs().max() + 1e-5 + rtol * truth.abs()
        err = (ours - truth).abs()
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"{name}: error {err.flatten()[worst].item():.3g} vs float64 exceeds {slack}x torch's worst error "
            f"{(theirs - truth).abs().max().item():.3g} (+ default tolerance) at flat index {worst}; "
            f"{cls.__name__} input {tuple(x.shape)} {x.dtype} strides {x.stride()}")


# --------------------------------------------------------------------------------------- TestNN


def _nhwc_helper(cls, size, dtype, mixed_dtype, fmt, precision=None):
    channels = size[1]
    inp = torch.randn(size, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
    grad = torch.randn(size, dtype=dtype).contiguous(memory_format=fmt)
    bn = cls(channels).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref_input = inp.detach().clone().contiguous().requires_grad_(True)
    ref_grad = grad.detach().clone().contiguous()
    ref_bn = cls(channels).to(dtype)
    copy_state(ref_bn, bn)
    # addition to the original: torch's layer on the same data and state
    torch_bn = TORCH_CLS[cls](channels).to(dtype)
    copy_state(torch_bn, bn)
    torch_input = ref_input.detach().clone().requires_grad_(True)
    if mixed_dtype:
        bn.float()
        ref_bn.float()
        torch_bn.float()

    out = bn(inp)
    out.backward(grad)
    ref_out = ref_bn(ref_input)
    ref_out.backward(ref_grad)
    torch_out = torch_bn(torch_input)
    torch_out.backward(ref_grad)

    assert out.is_contiguous(memory_format=fmt)
    assert ref_out.is_contiguous()
    assert_equal(out, ref_out)
    assert_equal(bn.weight.grad, ref_bn.weight.grad, atol=precision, rtol=precision)
    assert_equal(bn.bias.grad, ref_bn.bias.grad)
    assert_equal(inp.grad, ref_input.grad)

    # torch rounds its low-precision results through a different formula: allow 2 ulps there
    tol = {} if dtype == torch.float else {"atol": 2 * torch.finfo(dtype).eps, "rtol": 2 * torch.finfo(dtype).eps}
    assert_equal(ref_out, torch_out, **tol)
    assert_equal(ref_bn.weight.grad, torch_bn.weight.grad, **(tol or {"atol": precision, "rtol": precision}))
    assert_equal(ref_bn.bias.grad, torch_bn.bias.grad, **(tol or {"atol": precision, "rtol": precision}))
    assert_equal(ref_input.grad, torch_input.grad, **tol)


def test_batchnorm_nhwc_cpu():
    """test/test_nn.py::TestNN::test_batchnorm_nhwc_cpu: channels_last (2D) and channels_last_3d
    (3D) input gives the same output and gradients as contiguous input, for float32, bfloat16 and
    float16, with parameters in the input dtype or (mixed) in float32; NC11 and N1HW shapes."""
    for shape in [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)]:
        for dtype in (torch.float, torch.bfloat16, torch.float16):
            for mixed in (False, True):
                if dtype == torch.float:
                    mixed = False
                _nhwc_helper(B.BatchNorm2d, shape, dtype, mixed, torch.channels_last)
    precisions = {torch.float: 1e-4, torch.bfloat16: 1e-4, torch.float16: None}
    for shape in [(4, 8, 2, 10, 10), (4, 1, 2, 9, 9), (4, 9, 1, 1, 1)]:
        for dtype in (torch.float, torch.bfloat16, torch.float16):
            for mixed in (False, True):
                if dtype == torch.float:
                    mixed = False
                _nhwc_helper(B.BatchNorm3d, shape, dtype, mixed, torch.channels_last_3d, precisions[dtype])


def _half_overflow_helper(cls, size, param_dtype, fwd_format, bwd_format):
    channels = size[1]
    inp = torch.randn(size, dtype=torch.half).contiguous(memory_format=fwd_format).requires_grad_(True)
    bn = cls(channels).to(param_dtype)
    out = bn(inp)

    ref_input = inp.detach().clone().requires_grad_(True)
    ref_bn = cls(channels).to(torch.float)
    ref_bn.load_state_dict(bn.to(torch.float).state_dict())
    ref_out = ref_bn(ref_input)

    assert not out.isinf().any()
    assert not out.isnan().any()
    assert_equal(out, ref_out)

    if param_dtype != torch.half:
        grad_input = torch.empty(size=ref_out.shape).uniform_(0, 1).to(dtype=torch.half)
        grad_input = grad_input.contiguous(memory_format=bwd_format)
        ref_grad_input = grad_input.clone()
        out.backward(grad_input)
        ref_out.backward(ref_grad_input)
        assert not inp.grad.isinf().any()
        assert not inp.grad.isnan().any()
        assert_equal(inp.grad, ref_input.grad)


def _float_formats_helper(cls, size, fwd_format, bwd_format):
    # the float32 calls of the original helper: a float32 layer against a second one of the same
    # class on a clone of the input (same memory format), gradient in ``bwd_format``
    channels = size[1]
    inp = torch.randn(size, dtype=torch.float).contiguous(memory_format=fwd_format).requires_grad_(True)
    bn = cls(channels)
    out = bn(inp)
    ref_input = inp.detach().clone().requires_grad_(True)
    ref_bn = cls(channels)
    copy_state(ref_bn, bn)
    ref_out = ref_bn(ref_input)
    assert not out.isinf().any()
    assert not out.isnan().any()
    assert_equal(out, ref_out)
    grad_input = torch.empty(size=ref_out.shape).uniform_(0, 1).contiguous(memory_format=bwd_format)
    out.backward(grad_input)
    ref_out.backward(grad_input.clone())
    assert not inp.grad.isinf().any()
    assert not inp.grad.isnan().any()
    assert_equal(inp.grad, ref_input.grad)
    # addition: at least as accurate as torch's float32 layer, against a float64 computation (when
    # forward and backward share a memory format: the two layouts' kernels, at half the cost)
    if fwd_format == bwd_format:
        assert_as_accurate_as_torch(cls, inp.detach(), grad_input)


def test_batchnorm_half_overflow():
    """test/test_nn.py::TestNN::test_batchnorm_half_overflow: float16 input with ~1M values per
    channel (sums overflow float16) gives finite output/gradients equal to a float32-parameter
    reference; float32 input in every forward/backward memory-format combination.

    Sizes: the original's (4, 80, 500, 500), (4, 80, 20, 100, 100), (16, 3, 224, 224) and
    (16, 20, 40, 40, 40) keep their per-channel counts (0.8M to 1M values) here with 2 channels
    each. Addition: in float32 our layer must be at least about as accurate as torch's against a
    float64 computation (``assert_as_accurate_as_torch``)."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        _half_overflow_helper(B.BatchNorm2d, (4, 2, 500, 500), torch.half, fmt, fmt)
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        _half_overflow_helper(B.BatchNorm3d, (4, 2, 20, 100, 100), torch.half, fmt, fmt)
    formats2 = (torch.contiguous_format, torch.channels_last)
    formats3 = (torch.contiguous_format, torch.channels_last_3d)
    for fwd, bwd in itertools.product(formats2, formats2):
        _float_formats_helper(B.BatchNorm2d, (16, 2, 224, 224), fwd, bwd)
    for fwd, bwd in itertools.product(formats3, formats3):
        _float_formats_helper(B.BatchNorm3d, (16, 2, 40, 40, 40), fwd, bwd)


@pytest.mark.parametrize("bn_module", [B.BatchNorm2d, B.SyncBatchNorm], ids=["BatchNorm2d", "SyncBatchNorm"])
def test_batchnorm_non_contig_cpu(bn_module):
    """test/test_nn.py::TestNN::test_batchnorm_non_contig_cpu[BatchNorm2d, SyncBatchNorm]: an input
    that is channels_last by its strides gives a channels_last output equal to torch's on the
    contiguous copy (eval mode); bfloat16/float16 input into a float32 layer is close to float32."""
    for dtype in (torch.bfloat16, torch.float16):
        inp = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
        bn = bn_module(2).float().eval()
        with torch.no_grad():
            bn.weight.uniform_()
            bn.bias.uniform_()
        ref_input = inp.detach().clone().contiguous()
        ref_bn = nn.BatchNorm2d(2).float().eval()
        ref_bn.load_state_dict(bn.state_dict())
        out = bn(inp)
        ref_out = ref_bn(ref_input)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert ref_out.is_contiguous()
        assert_equal(out, ref_out)

        input_lp = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
        input_f = input_lp.float()
        bn_mix = bn_module(2).float().eval()
        ref_bn_f = deepcopy(bn_mix)
        out_lp = bn_mix(input_lp)
        ref_out_f = ref_bn_f(input_f)
        assert_equal(ref_out_f, out_lp.float(), atol=0.05, rtol=0.05)


def test_batchnorm_raises_error_if_less_than_one_value_per_channel():
    """test/test_nn.py::TestNN::test_batchnorm_raises_error_if_less_than_one_value_per_channel."""
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        B.BatchNorm1d(10)(x)


def _raises_if_not_same_size(which):
    inp = torch.rand(2, 10)
    for size in (9, 11):
        args = {"running_mean": torch.rand(10), "running_var": torch.rand(10), "weight": None, "bias": None}
        args[which] = torch.rand(size) if which.startswith("running") else nn.Parameter(torch.rand(size))
        # torch's test asserts RuntimeError; ours is an instance of both ValueError and RuntimeError
        with pytest.raises(RuntimeError):
            BF.batch_norm(inp, args["running_mean"], args["running_var"], weight=args["weight"], bias=args["bias"])


def test_batchnorm_raises_error_if_running_mean_is_not_same_size_as_input():
    """test/test_nn.py::TestNN::test_batchnorm_raises_error_if_running_mean_is_not_same_size_as_input:
    ``functional.batch_norm`` with a 9- or 11-element running_mean for 10 channels raises RuntimeError."""
    _raises_if_not_same_size("running_mean")


def test_batchnorm_raises_error_if_running_var_is_not_same_size_as_input():
    """test/test_nn.py::TestNN::test_batchnorm_raises_error_if_running_var_is_not_same_size_as_input."""
    _raises_if_not_same_size("running_var")


def test_batchnorm_raises_error_if_weight_is_not_same_size_as_input():
    """test/test_nn.py::TestNN::test_batchnorm_raises_error_if_weight_is_not_same_size_as_input."""
    _raises_if_not_same_size("weight")


def test_batchnorm_raises_error_if_bias_is_not_same_size_as_input():
    """test/test_nn.py::TestNN::test_batchnorm_raises_error_if_bias_is_not_same_size_as_input."""
    _raises_if_not_same_size("bias")


def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad():
    """test/test_nn.py::TestNN::test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad:
    forward-mode AD with a tangent on running_mean/running_var (and on the input) raises
    ``RuntimeError`` (batch norm is not differentiable w.r.t. the running statistics); tangents on
    the input only, or on the running statistics only, are fine. (Torch's message is
    "batch_norm is not differentiable wrt running_mean and running_var"; the wording is not asserted.)"""
    args = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2))
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2)):
        tangents = tuple(torch.rand_like(x) for x in args)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t) if i in dual_indices else p
                     for i, (p, t) in enumerate(zip(args, tangents))]
            if (1 in dual_indices or 2 in dual_indices) and 0 in dual_indices:
                with pytest.raises(RuntimeError):
                    BF.batch_norm(*duals, training=False, momentum=-1.2)
            else:
                BF.batch_norm(*duals, training=False, momentum=-1.2)


def test_batchnorm_buffer_update_when_stats_are_not_tracked():
    """test/test_nn.py::TestNN::test_batchnorm_buffer_update_when_stats_are_not_tracked: a layer built
    with running buffers and then switched to ``track_running_stats = False`` normalizes with the
    buffers but leaves them (and ``num_batches_tracked``) untouched."""
    input_size = (32, 4)
    bn = B.BatchNorm1d(input_size[1], track_running_stats=True)
    bn.track_running_stats = False
    num_batches = bn.num_batches_tracked.clone()
    running_mean = bn.running_mean.clone()
    running_var = bn.running_var.clone()
    bn(torch.rand(input_size))
    assert torch.equal(num_batches, bn.num_batches_tracked)
    assert torch.equal(running_mean, bn.running_mean)
    assert torch.equal(running_var, bn.running_var)


def test_batchnorm_load_state_dict():
    """test/test_nn.py::TestNN::test_batchnorm_load_state_dict: ``num_batches_tracked`` is in the state
    dict, survives a non-strict load of an empty dict, and a meta-device layer loading an empty dict
    with ``assign=True`` gets a real 0 counter."""
    bn = B.BatchNorm2d(3)
    assert_equal(bn.state_dict()["num_batches_tracked"], torch.tensor(0))
    bn.num_batches_tracked = torch.tensor(10)
    assert_equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    empty_dict = OrderedDict()
    bn.load_state_dict(empty_dict, strict=False)
    assert_equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))

    with torch.device("meta"):
        meta_bn = B.BatchNorm2d(3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(empty_dict, assign=True, strict=False)
    assert_equal(meta_bn.state_dict()["num_batches_tracked"], torch.tensor(0))


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, B.BatchNorm1d], ids=["torch_bn", "our_bn"])
def test_convert_sync_batchnorm(bn_cls):
    """test/test_nn.py::TestNN::test_convert_sync_batchnorm (``@skipIf(not cuda)`` in torch; nothing in
    it needs CUDA, so it runs on the CPU here): converting Sequential(BatchNorm1d(100),
    InstanceNorm1d(100)) gives a SyncBatchNorm and leaves the InstanceNorm; every state-dict entry
    keeps its value and device. As torch's, the test compares against an independent anchor copy,
    so it holds whether the conversion works in place or on a copy. Torch's and our BatchNorm1d
    are both converted."""
    module = nn.Sequential(bn_cls(100), nn.InstanceNorm1d(100))
    comp_module = nn.Sequential(bn_cls(100), nn.InstanceNorm1d(100))
    comp_module.load_state_dict(module.state_dict())
    sync_bn_module = B.SyncBatchNorm.convert_sync_batchnorm(module)
    children = list(sync_bn_module.children())
    assert children[0].__class__ is B.SyncBatchNorm
    assert children[1].__class__ is nn.InstanceNorm1d
    for layer, converted in zip(comp_module.children(), sync_bn_module.children()):
        for key in layer.state_dict():
            assert layer.state_dict()[key].device == converted.state_dict()[key].device
            assert_equal(layer.state_dict()[key], converted.state_dict()[key])


# ----------------------------------------------------------------------------- TestNNDeviceType


@pytest.mark.parametrize("dtype", [torch.float, torch.half])
def test_batchnorm_large_batch(dtype):
    """test/test_nn.py::TestNNDeviceType::test_batchnorm_large_batch (``@onlyCUDA`` in torch; it only
    needs a large batch, so it runs on the CPU here): BatchNorm2d(1) on 880801 samples of 1x1,
    forward and backward. Addition: output and gradients at least as accurate as torch's (one
    channel of 880801 values: torch's float32 layer is far from exact there)."""
    bn = B.BatchNorm2d(1).to(dtype)
    data = torch.rand(880801, 1, 1, 1, dtype=dtype).requires_grad_(True)
    out = bn(data)
    out.sum().backward()
    assert_as_accurate_as_torch(B.BatchNorm2d, data.detach(), torch.ones_like(data))


def test_BatchNorm_empty():
    """test/test_nn.py::TestNNDeviceType::test_BatchNorm_empty (dtype float64 on a float32 layer, as in
    torch): a (0, 3, 2, 2) batch gives an empty output, zero input gradient and zero (not None)
    weight/bias gradients, and leaves the running statistics at 0 and 1."""
    mod = B.BatchNorm2d(3)
    inp = torch.randn(0, 3, 2, 2, dtype=torch.double)
    # common_nn._test_module_empty_input
    inp.requires_grad_(True)
    out = mod(inp)
    out.backward(torch.rand_like(out))
    assert out.size() == inp.size()
    for p in mod.parameters():
        if p.requires_grad:
            assert p.grad is not None, "empty batch: parameter gradient is None, torch gives zeros"
            assert_equal(p.grad, torch.zeros_like(p.grad))
    assert_equal(inp.grad, torch.zeros_like(inp))
    assert_equal(mod.running_mean, torch.tensor([0.0, 0, 0]))
    assert_equal(mod.running_var, torch.tensor([1.0, 1, 1]))
    assert_equal(mod.weight.grad, torch.tensor([0.0, 0, 0]))
    assert_equal(mod.bias.grad, torch.tensor([0.0, 0, 0]))


def test_batchnorm_grad():
    """test/test_nn.py::TestNNDeviceType::test_batchnorm_grad (``_test_batchnorm_grad``): gradcheck and
    gradgradcheck (PyTorch's defaults: fast mode, batched gradients checked) of
    ``functional.batch_norm`` in float64, eval and training, eps=1e-4."""
    bs, n_feat, size_feat = 4, 5, 6
    dtype = torch.double
    inp = torch.arange(bs * n_feat * size_feat, requires_grad=True, dtype=dtype).view(bs, n_feat, size_feat)
    weight = torch.arange(1, n_feat + 1, requires_grad=True, dtype=dtype)
    bias = torch.arange(n_feat, requires_grad=True, dtype=dtype)
    running_mean = 1 - torch.arange(n_feat, dtype=dtype)
    running_var = 2 * torch.arange(n_feat, dtype=dtype)
    for training in (False, True):
        assert_grad_and_gradgrad(BF.batch_norm, (inp, running_mean, running_var, weight, bias, training, 0.1, 0.0001))


def _run_eval(ndim, dtype, module_dtype=None):
    module_dtype = module_dtype or dtype
    module = B.BatchNorm1d(3).to(module_dtype)
    module.eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad.clone()
    assert_equal(res1, res2)
    assert_equal(grad1, grad2)

    # track_running_stats=False: eval mode still normalizes with the batch
    module = B.BatchNorm1d(3, track_running_stats=False).to(module_dtype)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    res1 = module(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    module.eval()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad.clone()
    assert_equal(res1, res2)
    assert_equal(grad1, grad2)


def test_batchnorm_eval():
    """test/test_nn.py::TestNNDeviceType::test_batchnorm_eval (``_test_batchnorm_eval``, float32, 2D and
    3D input): eval mode is deterministic across calls; without running statistics train and eval
    give the same output and gradient."""
    _run_eval(2, torch.float)
    _run_eval(3, torch.float)


def _run_affine(ndim, dtype, module_dtype=None):
    module_dtype = module_dtype or dtype
    module = B.BatchNorm1d(3, affine=False).to(module_dtype)
    module_affine = B.BatchNorm1d(3, affine=True).to(module_dtype)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.ones_like(data, requires_grad=False)
    res1 = module_affine(data)
    res1.backward(grad)
    grad1 = data.grad.clone()
    data.grad.zero_()
    res2 = module(data)
    res2.backward(grad)
    grad2 = data.grad
    assert_equal(res1, res2)
    assert_equal(grad1, grad2)


def test_batchnorm_affine():
    """test/test_nn.py::TestNNDeviceType::test_batchnorm_affine (``_test_batchnorm_affine``): affine with
    weight 1 and bias 0 equals affine=False, output and input gradient, 2D and 3D."""
    _run_affine(2, torch.float)
    _run_affine(3, torch.float)


def test_batchnorm_simple_average():
    """test/test_nn.py::TestNNDeviceType::test_batchnorm_simple_average (``_test_batchnorm_simple_average``):
    momentum=None keeps the cumulative average of the batch statistics; reset_running_stats
    restores 0/1; two batches after a reset average to the mean of their single-batch values."""
    dtype = torch.float
    module = B.BatchNorm1d(3, momentum=None).to(dtype=dtype)
    zeros = torch.zeros(3, dtype=dtype)
    ones = torch.ones(3, dtype=dtype)
    assert_equal(module.running_mean, zeros)
    assert_equal(module.running_var, ones)
    data1 = torch.rand(4, 3, dtype=dtype)
    data2 = torch.rand(4, 3, dtype=dtype)

    single = []  # per batch alone: output, running mean, running var
    for data in (data1, data2):
        res = module(data)
        single.append((res, module.running_mean.clone(), module.running_var.clone()))
        _assert_not_equal(single[-1][1], zeros)
        _assert_not_equal(single[-1][2], ones)
        module.reset_running_stats()
        assert_equal(module.running_mean, zeros)
        assert_equal(module.running_var, ones)

    (res1, running_mean1, running_var1), (res2, running_mean2, running_var2) = single
    res3 = module(data1)
    res4 = module(data2)
    assert_equal(res3, res1)
    assert_equal(res4, res2)
    assert_equal(module.running_mean, (running_mean1 + running_mean2) / 2)
    assert_equal(module.running_var, (running_var1 + running_var2) / 2)


def test_batchnorm_update_stats():
    """test/test_nn.py::TestNNDeviceType::test_batchnorm_update_stats (``_test_batchnorm_update_stats``):
    a training pass moves both running statistics and adds 1 to num_batches_tracked; an eval pass
    changes none of them."""
    module = B.BatchNorm1d(3)
    data = torch.rand(4, 3)
    old_mean, old_var = module.running_mean.clone(), module.running_var.clone()
    old_nbt = module.num_batches_tracked.clone()
    module(data)
    _assert_not_equal(old_mean, module.running_mean)
    _assert_not_equal(old_var, module.running_var)
    assert_equal(old_nbt + 1, module.num_batches_tracked)

    module.eval()
    old_mean, old_var = module.running_mean.clone(), module.running_var.clone()
    old_nbt = module.num_batches_tracked.clone()
    module(data)
    assert_equal(old_mean, module.running_mean)
    assert_equal(old_var, module.running_var)
    assert_equal(old_nbt, module.num_batches_tracked)


# The CPU-applicable half of TestNN.test_batchnorm (parametrized over dims, mode and
# "memory_format,ref_backend,mixed,dtype"): the "_vs_cpu" cases compare a layer against torch's CPU
# implementation; here our layer is compared against torch's CPU layer.
@pytest.mark.parametrize("dims", [2, 3], ids=["2D", "3D"])
@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize(
    "mixed,dtype",
    [(False, torch.float), (True, torch.half), (True, torch.bfloat16)],
    ids=["NCHW_vs_cpu_float32", "NCHW_vs_cpu_mixed_float16", "NCHW_vs_cpu_mixed_bfloat16"],
)
def test_batchnorm(dims, mode, mixed, dtype):
    """test/test_nn.py::TestNN::test_batchnorm_{2D,3D}_{train,inference}_NCHW_vs_cpu[_mixed]_{dtype}
    (``@skipIf(not cuda)`` in torch, which compares CUDA with the CPU; here our layer on the CPU is
    compared with torch's CPU layer): integer-valued input in [1, 10); training compares output,
    parameter gradients, running statistics and input gradient; inference a fresh layer's output.
    Mixed: float16/bfloat16 input, float32 layer. Size: the 3D inference case has 8 channels
    instead of 64 (same per-channel count)."""
    def make(size, fmt=torch.contiguous_format):
        return torch.empty(size=size, memory_format=fmt, dtype=dtype).random_(1, 10)

    ours_cls = B.BatchNorm2d if dims == 2 else B.BatchNorm3d
    torch_cls = TORCH_CLS[ours_cls]
    layer_dtype = torch.float if mixed else dtype
    if mode == "train":
        size = (4, 8, 2, 2) if dims == 2 else (4, 8, 2, 2, 2)
        inp = make(size).detach().requires_grad_()
        grad = make(size)
        ref_inp = inp.detach().clone().requires_grad_()
        mod = ours_cls(size[1], dtype=layer_dtype).train()
        with torch.no_grad():
            mod.weight.uniform_()
            mod.bias.uniform_()
        ref_mod = torch_cls(size[1], dtype=layer_dtype).train()
        ref_mod.load_state_dict(mod.state_dict())
        out = mod(inp)
        out.backward(grad)
        ref_out = ref_mod(ref_inp)
        ref_out.backward(grad.clone())
        assert out.is_contiguous()
        assert ref_out.is_contiguous()
        assert_equal(out, ref_out)
        assert_equal(mod.weight.grad, ref_mod.weight.grad)
        assert_equal(mod.bias.grad, ref_mod.bias.grad)
        assert_equal(mod.running_mean, ref_mod.running_mean)
        assert_equal(mod.running_var, ref_mod.running_var)
        assert_equal(inp.grad, ref_inp.grad)
    else:
        size = (2, 64, 50, 50) if dims == 2 else (2, 8, 50, 50, 50)
        inp = make(size)
        mod = ours_cls(size[1], dtype=layer_dtype).eval()
        ref_mod = torch_cls(size[1], dtype=layer_dtype).eval()
        assert_equal(mod(inp), ref_mod(inp.clone()))


# --------------------------------------------------------------------- TestFusionEval / TestFusionUtils


def test_fuse_module_eval_numerics():
    """test/test_nn.py::TestFusionEval::test_fuse_module_eval_numerics (hypothesis-generated data in
    torch; fixed random data here): ``torch.nn.utils.fusion.fuse_conv_bn_eval`` of a Conv2d and our
    BatchNorm2d (affine and not) in eval mode, float64, equals conv followed by the layer."""
    dtype = torch.double
    inputs = torch.randn(5, 3, 5, 5, dtype=dtype)
    running_mean = torch.randn(6, dtype=dtype)
    running_var = torch.rand(6, dtype=dtype) + 0.1
    conv_ref = nn.Conv2d(3, 6, bias=True, kernel_size=(3, 3)).to(dtype)
    for affine in (True, False):
        bn_ref = B.BatchNorm2d(6, affine=affine, dtype=dtype)
        bn_ref.running_mean = running_mean.clone()
        bn_ref.running_var = running_var.clone()
        conv_ref.eval()
        bn_ref.eval()
        y_ref = bn_ref(conv_ref(inputs))
        fused = fuse_conv_bn_eval(conv_ref, bn_ref)
        assert_equal(y_ref, fused(inputs))


def test_fuse_conv_bn_requires_grad():
    """test/test_nn.py::TestFusionUtils::test_fuse_conv_bn_requires_grad: fused weights from our
    BatchNorm2d's buffers/parameters keep the conv parameters' requires_grad."""
    conv = nn.Conv2d(3, 3, 3)
    bn = B.BatchNorm2d(3)
    for w_rg, b_rg in itertools.product([True, False], [True, False]):
        conv.weight.requires_grad = w_rg
        conv.bias.requires_grad = b_rg
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        assert weight.requires_grad == w_rg
        assert bias.requires_grad == b_rg


def test_fuse_linear_bn_requires_grad():
    """test/test_nn.py::TestFusionUtils::test_fuse_linear_bn_requires_grad: as above for Linear and our
    BatchNorm1d."""
    linear = nn.Linear(3, 3)
    bn = B.BatchNorm1d(3)
    for w_rg, b_rg in itertools.product([True, False], [True, False]):
        linear.weight.requires_grad = w_rg
        linear.bias.requires_grad = b_rg
        weight, bias = fuse_linear_bn_weights(linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.eps,
                                              bn.weight, bn.bias)
        assert weight.requires_grad == w_rg
        assert bias.requires_grad == b_rg
