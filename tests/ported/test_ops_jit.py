"""TorchScript consistency of ``batchnorm.functional.batch_norm`` (PyTorch's ``test/test_ops_jit.py``).

Source: pytorch/pytorch ``test/test_ops_jit.py`` (stored commit 0fa4caf8c543e98ac275137f2d27900f33bac609),
``TestJit.test_variant_consistency_jit`` for the ``nn.functional.batch_norm`` OpInfo: float32
samples with ``requires_grad`` (float32 is a backward dtype of the OpInfo); for the scripted and
the traced function, ``check_against_reference`` (``torch/testing/_internal/common_jit.py``):
outputs, first-order and second-order gradients equal eager's. Restated: the output, the gradient
of a weighted sum of the output, and the gradient of the squared first-order gradients. The
OpInfo's only variant is the function (no method variant).

Not ported from that test: ``check_alias_annotation``, ``checkShapeAnalysis``
(``assert_jit_shape_analysis``) and ``assertAutodiffNode``, which inspect the JIT graph of an
ATen operator (schema alias annotations, symbolic shape functions, autodiff subgraphs) rather
than the function's results; ``test_jit_alias_remapping`` (only for OpInfos with aliases).

``test_jit_script_and_trace_modules`` is an addition (no PyTorch module test in the sources read
scripts or traces a BatchNorm): our layers inside ``torch.jit.trace`` give the eager output and
running statistics; ``torch.jit.script`` of a model with our layers is refused with a
``TypeError`` naming the alternatives, a deliberate difference documented in README.md and
docs/core.md; so is the scripted *functional* (``test_variant_consistency_jit[scripted]`` asserts
that TorchScript refuses it).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm as B
from batchnorm import functional as BF

from .test_opinfo_batch_norm import sample_inputs_batch_norm


def _tensors_requiring_grad(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _check_against_reference(fn, args, kwargs):
    """Outputs, first and second order gradients of ``fn`` equal those of the eager op."""
    def clone(a):
        return a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a

    eager_args = [clone(a) for a in args]
    test_args = [clone(a) for a in args]
    ref = BF.batch_norm(*eager_args, **kwargs)
    out = fn(*test_args)
    torch.testing.assert_close(out, ref, equal_nan=True)
    # running statistics the call updated (training samples)
    for a, b in zip(test_args[1:3], eager_args[1:3]):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, equal_nan=True)
    ref_inputs, test_inputs = _tensors_requiring_grad(eager_args), _tensors_requiring_grad(test_args)
    if not ref_inputs or ref.numel() == 0:
        return
    weights = torch.linspace(0.5, 1.5, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
    g_ref = torch.autograd.grad((ref * weights).sum(), ref_inputs, create_graph=True)
    g_test = torch.autograd.grad((out * weights).sum(), test_inputs, create_graph=True)
    for a, b in zip(g_test, g_ref):
        torch.testing.assert_close(a, b, equal_nan=True)
    gg_ref = torch.autograd.grad(sum(g.square().sum() for g in g_ref), ref_inputs, allow_unused=True)
    gg_test = torch.autograd.grad(sum(g.square().sum() for g in g_test), test_inputs, allow_unused=True)
    for a, b in zip(gg_test, gg_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, equal_nan=True)


def _batch_norm_5(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                  weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
                  eps: float) -> torch.Tensor:
    return BF.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _full_kwargs(kwargs):
    return (kwargs.get("training", False), kwargs.get("momentum", 0.1), kwargs.get("eps", 1e-5))


@pytest.mark.parametrize("runtime", ["scripted", "traced"])
def test_variant_consistency_jit(runtime):
    """test/test_ops_jit.py::TestJit::test_variant_consistency_jit (nn.functional.batch_norm, float32,
    function variant): the scripted and the traced function give eager's output, running
    statistics and first/second-order gradients on every OpInfo sample."""
    if runtime == "scripted":
        # documented deliberate difference (docs/core.md, "Where we differ from torch"): TorchScript
        # cannot compile the functional (keyword-only extras: mask, virtual_batch_size, nonfinite)
        with pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-only arguments"):
            torch.jit.script(_batch_norm_5)
        return
    scripted = None
    for sample in sample_inputs_batch_norm(torch.float32, requires_grad=True):
        args = (sample.input, *sample.args)
        training, momentum, eps = _full_kwargs(sample.kwargs)
        try:
            if runtime == "scripted":
                def fn(*a, training=training, momentum=momentum, eps=eps):
                    return scripted(*a, training, momentum, eps)
            else:
                def eager(*a, training=training, momentum=momentum, eps=eps):
                    return BF.batch_norm(*a, training=training, momentum=momentum, eps=eps)

                # jit_metaprogramming_utils.create_traced_fn: non-tensor arguments (None here) are
                # bound first (partial_apply_nontensors); only the tensors are traced inputs
                is_t = [isinstance(a, torch.Tensor) for a in args]
                fixed = list(args)

                def tensors_only(*ts, eager=eager, is_t=is_t, fixed=fixed):
                    it = iter(ts)
                    return eager(*[next(it) if t else f for t, f in zip(is_t, fixed)])

                traced = torch.jit.trace(tensors_only, tuple(a.detach().clone() for a in args if isinstance(
                    a, torch.Tensor)), check_trace=False)

                def fn(*a, traced=traced):
                    return traced(*[x for x in a if isinstance(x, torch.Tensor)])
            _check_against_reference(fn, args, sample.kwargs)
        except Exception as e:
            e.add_note(f"{runtime} batch_norm on {sample!r}")
            raise


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_script_and_trace_modules(training):
    """Addition: a Conv-BN-ReLU model with our BatchNorm2d and BatchNorm1d traced with
    ``torch.jit.trace`` gives the eager model's output and running statistics over two steps
    (README: ``torch.jit.trace`` is supported). ``torch.jit.script`` is a documented deliberate
    difference (README, docs/core.md): it must refuse with a ``TypeError`` that names the
    alternatives (torch.compile, torch.export, torch.jit.trace, convert(model, "torch"))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), B.BatchNorm2d(4), nn.ReLU(), nn.Flatten(start_dim=2),
                          B.BatchNorm1d(4)).train(training)
    with pytest.raises(TypeError, match="torch.jit.trace") as info:
        torch.jit.script(copy.deepcopy(model))
    for name in ("torch.compile", "torch.export", "convert"):
        assert name in str(info.value)

    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    traced = torch.jit.trace(model, (x.clone(),), check_trace=False)
    eager(x.clone())  # the trace ran the model once: bring the eager copy to the same state
    for _ in range(2):
        torch.testing.assert_close(traced(x), eager(x))
    for (name, a), (_, b) in zip(traced.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")
