"""The ``nn.functional.batch_norm`` OpInfo of PyTorch, run on ``batchnorm.functional.batch_norm``.

Sources (torch 2.13.0, the installed package):

* ``torch/testing/_internal/common_methods_invocations.py``: ``sample_inputs_batch_norm`` (re-created
  below as ``sample_inputs_batch_norm``, same shapes, kwargs and argument-reuse pattern) and the
  ``OpInfo('nn.functional.batch_norm')`` entry: CPU dtypes float32/float64/float16/bfloat16,
  ``supports_out=False``, ``supports_forward_ad=True``, ``supports_fwgrad_bwgrad=True``; by the
  OpInfo defaults (``opinfo/core.py``) ``check_batched_grad``, ``check_batched_gradgrad`` and
  ``check_batched_forward_grad`` are therefore all on. (The ``without_cudnn`` variant is CUDA-only.)
* ``test/test_ops.py::TestGradients`` via ``common_utils.TestGradients._check_helper`` (installed
  package): ``test_fn_grad`` (gradcheck, float64, batched grads, undefined grads, grad dtypes),
  ``test_fn_gradgrad`` (gradgradcheck with contiguous and non-contiguous grad outputs, batched),
  ``test_fn_fwgrad_bwgrad`` (forward-over-reverse), ``test_forward_mode_AD`` (forward AD only,
  batched forward grads). The gradcheck inputs are the sample's tensors that require grad
  (input, weight, bias), as in ``_check_helper``.
* ``test_forward_vs_torch`` is not a ``test_ops.py`` test: it is the "same samples against
  ``torch.nn.functional.batch_norm``" comparison (output and the running statistics the call
  updates), for every CPU dtype of the OpInfo.

Not ported: the CUDA-only ``without_cudnn`` variant; OpInfo tests about ``out=``, jit
(``test_variant_consistency_jit``, ``assert_jit_shape_analysis``), NNC, complex/conjugate views
and other devices, which are about torch's operator registration rather than the function's
behaviour.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.testing import make_tensor

from batchnorm import functional as BF

from ._common import gradcheck, gradgradcheck

S = 5  # common_methods_invocations.S


class SampleInput:
    def __init__(self, input, args, kwargs):
        self.input, self.args, self.kwargs = input, args, kwargs

    def __repr__(self):
        shapes = [None if a is None else tuple(a.shape) for a in self.args]
        return f"SampleInput(input={tuple(self.input.shape)}, args={shapes}, kwargs={self.kwargs})"


def sample_inputs_batch_norm(dtype, requires_grad):
    """Re-creation of common_methods_invocations.sample_inputs_batch_norm (CPU)."""
    make_arg = partial(make_tensor, device="cpu", dtype=dtype, requires_grad=requires_grad)
    make_arg_without_requires_grad = partial(make_tensor, device="cpu", dtype=dtype, requires_grad=False)
    cases = (
        ((S, S, S), {"training": True, "momentum": 0.5, "eps": 0.6}),
        ((3, 2, 4), {"training": False, "momentum": -1.2}),
        ((3, 1), {"training": True, "momentum": 0.0}),
        ((0,), {"training": True}),
        ((0,), {"training": False}),
        ((3, 2, 3, 4), {"training": True, "momentum": -1.0, "eps": 0.5}),
        ((3, 2, 3, 4), {"training": False, "momentum": -1.0, "eps": 0.5}),
        ((2, 1), {}),
    )
    for input_shape, kwargs in cases:
        channels = input_shape[1] if len(input_shape) > 1 else 0
        weight = make_arg(channels) if channels > 0 else None
        bias = make_arg(channels) if channels > 0 else None
        running_mean = make_arg_without_requires_grad(channels, low=0)
        running_var = make_arg_without_requires_grad(channels, low=0)
        yield SampleInput(make_arg(input_shape), (running_mean, running_var, weight, bias), kwargs)
    # permutations of weight and bias with the last case's shape and running statistics (the
    # original reuses those two tensors across the next three samples)
    for training in (True, False, False):
        yield SampleInput(make_arg(input_shape), (running_mean, running_var, make_arg(channels), make_arg(channels)),
                          {"training": training})
    # no optional arguments: running statistics are required in eval but not in training
    yield SampleInput(make_arg((1, 2, 3)), (None, None, None, None), {"training": True})


def _gradcheck_fn(op, sample):
    """``_check_helper``'s recomposition: a function of the tensors that require grad."""
    all_args = (sample.input, *sample.args, *sample.kwargs.values())
    grad_args = tuple(a for a in all_args if isinstance(a, torch.Tensor) and a.requires_grad)
    for t in grad_args:
        assert t.grad is None, "a sample input already has a gradient (tensor reused across samples)"

    def fn(*inputs):
        it = iter(inputs)

        def take(x):
            return next(it) if isinstance(x, torch.Tensor) and x.requires_grad else x

        positional = [take(sample.input)] + [take(a) for a in sample.args]
        kwargs = {k: take(v) for k, v in sample.kwargs.items()}
        return op(*positional, **kwargs)

    return fn, grad_args


def _samples(dtype=torch.float64):
    return list(sample_inputs_batch_norm(dtype, requires_grad=True))


N_SAMPLES = len(_samples())
# one test per sample (s0 ... s11, in sample_inputs_batch_norm's order; the failure message shows it)
sample_index = pytest.mark.parametrize("index", range(N_SAMPLES), ids=[f"s{i}" for i in range(N_SAMPLES)])


def _sample(index, dtype=torch.float64):
    return _samples(dtype)[index]


@sample_index
def test_fn_grad(index):
    """test/test_ops.py::TestGradients::test_fn_grad (float64): gradcheck with batched gradients,
    undefined-gradient and gradient-dtype checks, PyTorch's fast mode."""
    sample = _sample(index)
    fn, args = _gradcheck_fn(BF.batch_norm, sample)
    assert gradcheck(fn, args, check_batched_grad=True, check_grad_dtypes=True, nondet_tol=0.0,
                     check_forward_ad=False, check_backward_ad=True, check_undefined_grad=True,
                     check_batched_forward_grad=False), sample


@sample_index
@pytest.mark.parametrize("non_contig", [False, True], ids=["contig_grad_out", "noncontig_grad_out"])
def test_fn_gradgrad(index, non_contig):
    """test/test_ops.py::TestGradients::test_fn_gradgrad (float64): gradgradcheck (double backward)
    with contiguous and non-contiguous grad outputs, batched gradients checked
    (``check_batched_gradgrad``)."""
    sample = _sample(index)
    fn, args = _gradcheck_fn(BF.batch_norm, sample)
    assert gradgradcheck(fn, args, gen_non_contig_grad_outputs=non_contig, check_batched_grad=True,
                         check_grad_dtypes=True, nondet_tol=0.0), sample


@sample_index
@pytest.mark.parametrize("non_contig", [False, True], ids=["contig_grad_out", "noncontig_grad_out"])
def test_fn_fwgrad_bwgrad(index, non_contig):
    """test/test_ops.py::TestGradients::test_fn_fwgrad_bwgrad (float64, ``supports_fwgrad_bwgrad``):
    gradgradcheck with forward-over-reverse only."""
    sample = _sample(index)
    fn, args = _gradcheck_fn(BF.batch_norm, sample)
    assert gradgradcheck(fn, args, gen_non_contig_grad_outputs=non_contig, check_batched_grad=False,
                         check_grad_dtypes=True, nondet_tol=0.0, check_fwd_over_rev=True,
                         check_rev_over_rev=False, check_undefined_grad=False), sample


@sample_index
def test_forward_mode_AD(index):
    """test/test_ops.py::TestGradients::test_forward_mode_AD (float64, ``supports_forward_ad``):
    gradcheck of forward-mode AD only (``torch.autograd.forward_ad`` JVPs against finite
    differences), with batched forward gradients (``check_batched_forward_grad``)."""
    sample = _sample(index)
    fn, args = _gradcheck_fn(BF.batch_norm, sample)
    assert gradcheck(fn, args, check_batched_grad=False, check_grad_dtypes=True, nondet_tol=0.0,
                     check_forward_ad=True, check_backward_ad=False, check_undefined_grad=True,
                     check_batched_forward_grad=True), sample


def _clone(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_forward_vs_torch(dtype):
    """Every OpInfo sample (all CPU dtypes of the OpInfo): our ``functional.batch_norm`` gives
    torch's output and leaves the running statistics it updates equal to torch's. Low-precision
    dtypes allow 2 ulps (the two round through different formulas)."""
    tol = {} if dtype in (torch.float32, torch.float64) else {
        "atol": 2 * torch.finfo(dtype).eps, "rtol": 2 * torch.finfo(dtype).eps}
    for sample in sample_inputs_batch_norm(dtype, requires_grad=False):
        ours_args = [_clone(a) for a in sample.args]
        torch_args = [_clone(a) for a in sample.args]
        out = BF.batch_norm(sample.input.clone(), *ours_args, **sample.kwargs)
        ref = torch.nn.functional.batch_norm(sample.input.clone(), *torch_args, **sample.kwargs)
        torch.testing.assert_close(out, ref, equal_nan=True, msg=lambda m, s=sample: f"{s}: output: {m}", **tol)
        for name, a, b in zip(("running_mean", "running_var"), ours_args[:2], torch_args[:2]):
            if b is not None:
                torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, s=sample, n=name: f"{s}: {n}: {m}",
                                           **tol)
