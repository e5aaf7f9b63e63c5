"""Every way autograd can meet our layers, on every CPU backend, against torch's own batch norm.

* in-place operations on the output (``ReLU(inplace=True)``, ``out += identity``: every torchvision
  ResNet, MobileNet and DenseNet does one of them right after a BN);
* double backward (``create_graph=True``: gradient penalties, meta-learning) with
  ``gradgradcheck`` and against torch's second derivatives;
* forward-mode AD (``torch.autograd.forward_ad``), ``torch.func`` (grad, vmap, jacrev, jvp) and
  batched gradients (``is_grads_batched=True``).

The references are torch's ``F.batch_norm`` and autograd's numerical checks, never our code.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as TF
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import batchnorm as bn
import batchnorm.functional as BF

BACKENDS = ["cpu", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in bn.available_backends():
        pytest.fail(f"backend {request.param!r} is not available: {bn.available_backends()}")
    with bn.use_backend(request.param):
        yield request.param


def _f64(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


# ------------------------------------------------------------------------------ in place


@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_inplace_relu_and_residual_add_after_bn(backend, mode, memory_format):
    """A residual block's tail: BN, ``out += identity``, ``ReLU(inplace=True)``; gradients equal torch's."""
    def block(norm):
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm = norm
                self.relu = nn.ReLU(inplace=True)

            def forward(self, x):
                out = self.norm(x)
                out += x
                return self.relu(out)

        return Block()

    torch_bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
        torch_bn.bias.uniform_(-0.5, 0.5)
        torch_bn.running_mean.normal_()
        torch_bn.running_var.uniform_(0.5, 2)
    ours = bn.FrozenBatchNorm2d(6) if mode == "frozen" else bn.BatchNorm2d(6)
    ours.load_state_dict(torch_bn.state_dict())
    theirs = block(torch_bn)
    mine = block(ours)
    for m in (theirs, mine):
        m.train(mode == "train")
    x = torch.randn(4, 6, 5, 5).contiguous(memory_format=memory_format)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa), mine(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    if mode != "frozen":
        torch.testing.assert_close(ours.weight.grad, torch_bn.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_var, torch_bn.running_var)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_inplace_after_fused_layer(backend, act):
    layer = bn.BatchNormAct2d(4, act=act)
    x = torch.randn(3, 4, 3, 3, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        y.mul_(2)  # in place on the fused layer's output
        y.sum().backward()
    assert x.grad is not None


def test_outputs_are_not_views(backend):
    """The contract behind the in-place tests: no op output is a view (of an input or of an
    intermediate), with or without autograd, with ghost batches and masks (reference) too."""
    x = torch.randn(6, 3, 4, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    outs = [
        BF.batch_norm(x, rm, rv, w, None, training=True),
        BF.batch_norm(x, rm, rv, w, None, training=False),
        BF.batch_norm(x, None, None, w, None, training=True, virtual_batch_size=4),
        BF.batch_norm(x, None, None, w, None, training=True, mask=torch.rand(6, 4) > 0.3),
        BF.batch_norm(x.detach(), rm, rv, None, None, training=True),
    ]
    for y in outs:
        assert y._base is None


# ------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 3, 3)])
def test_gradgradcheck_training(backend, shape):
    c = shape[1]
    x, w, b = _f64(*shape), (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(), _f64(c)
    assert gradgradcheck(lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True), (x, w, b))


def test_gradgradcheck_eval_and_fused(backend):
    x, w, b = _f64(4, 3, 2, 2), (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), _f64(3)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert gradgradcheck(lambda x, w, b: BF.batch_norm(x, rm, rv, w, b, training=False), (x, w, b))
    for act in ("silu", "gelu"):
        layer = bn.BatchNormAct2d(3, act=act).double()
        assert gradgradcheck(layer, (x,))
        layer.eval()
        assert gradgradcheck(layer, (x,))


def test_gradient_penalty_equals_torch(backend):
    """``create_graph=True``: the gradient of a gradient penalty, as in WGAN-GP, equals torch's."""
    x0 = torch.randn(8, 4, 3, 3)
    results = []
    for norm in (nn.BatchNorm2d(4), bn.BatchNorm2d(4)):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), norm, nn.Tanh(), nn.Conv2d(4, 1, 1))
        x = x0.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        assert g.requires_grad, "create_graph=True must give a gradient with a graph"
        g.square().sum().backward()
        results.append([torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()])
    for a, b_ in zip(*results):
        torch.testing.assert_close(b_, a, rtol=1e-3, atol=1e-5)


def test_inplace_abn_double_backward_says_why(backend):
    layer = bn.BatchNormAct2d(3, act="leaky_relu", inplace_abn=True)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace_abn=False"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


# ---------------------------------------------------------------- forward AD and torch.func


def test_forward_ad_equals_torch(backend):
    x, t = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    for training in (True, False):
        rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
        outs = []
        for fn in (TF.batch_norm, BF.batch_norm):
            with fwad.dual_level():
                y = fn(fwad.make_dual(x, t), rm.clone(), rv.clone(), w, b, training=training)
                outs.append(fwad.unpack_dual(y).tangent)
        assert outs[1] is not None, "the tangent was dropped"
        torch.testing.assert_close(outs[1], outs[0])


def test_gradcheck_forward_ad_and_batched_grad(backend):
    x, w, b = _f64(5, 3, 2), (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), _f64(3)
    for training in (True, False):
        rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
        def f(x, w, b, rm=rm, rv=rv, training=training):
            return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

        assert gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                         check_batched_forward_grad=True)


def test_is_grads_batched_equals_rows_of_the_jacobian(backend):
    layer = bn.BatchNorm1d(3, track_running_stats=False).double()
    x = _f64(4, 3)
    y = layer(x)
    eye = torch.eye(12, dtype=torch.float64).reshape(12, 4, 3)
    (rows,) = torch.autograd.grad(y, x, eye, is_grads_batched=True)
    ref = torch.autograd.functional.jacobian(lambda x: TF.batch_norm(x, None, None, layer.weight, layer.bias,
                                                                       training=True), x)
    torch.testing.assert_close(rows.reshape(12, 12), ref.reshape(12, 12))


def test_torch_func_grad_vmap_jacrev_jvp(backend):
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    ours, theirs = bn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3, track_running_stats=False)
    x = torch.randn(4, 3, 2, 2)
    params = {k: v.detach() for k, v in theirs.named_parameters()}

    def loss(m):
        return lambda p, x: functional_call(m, p, (x,)).pow(3).sum()

    for a, b_ in zip(grad(loss(ours))(params, x).values(), grad(loss(theirs))(params, x).values()):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(jacrev(ours)(x), jacrev(theirs)(x), rtol=1e-4, atol=1e-5)
    t = torch.randn_like(x)
    torch.testing.assert_close(jvp(ours, (x,), (t,))[1], jvp(theirs, (x,), (t,))[1], rtol=1e-4, atol=1e-5)
    xs = torch.randn(5, 4, 3, 2, 2)  # vmap over a leading dimension: each call normalizes its own batch
    torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs), rtol=1e-5, atol=1e-5)


def test_replace_all_batch_norm_modules_then_vmap(backend):
    """functorch's recipe for vmap over a model with BN: its helper must see our layers."""
    from torch.func import replace_all_batch_norm_modules_, vmap

    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn.BatchNorm2d(4), bn.BatchNormAct2d(4), nn.Flatten())
    replace_all_batch_norm_modules_(model)
    for m in (model[1], model[2]):
        assert m.running_mean is None and m.running_var is None and not m.track_running_stats
    out = vmap(model, randomness="same")(torch.randn(3, 2, 3, 2, 2))
    assert out.shape == (3, 2, 16) and torch.isfinite(out).all()


# ------------------------------------------------------------------- statistics outputs


@pytest.mark.parametrize("op", ["plain", "relu"])
def test_statistics_outputs_take_no_gradient_and_cost_the_backward_nothing(backend, op):
    """The training ops also return the batch mean, variance and count; they are statistics, not
    functions to differentiate. They must not require grad, and a backward must not make zero
    gradients for them (autograd materialises one tensor per unused differentiable output: three
    extra kernels per backward on a GPU). Fails if the op stops marking them non-differentiable."""
    x = torch.randn(8, 6, 5, 5, requires_grad=True)
    w, b = torch.rand(6, requires_grad=True), torch.randn(6, requires_grad=True)
    if op == "plain":
        y, mean, var, count = torch.ops.batchnorm.train_forward(x, 1e-5, w, b, None, 0)
    else:
        y, mean, var, count = torch.ops.batchnorm.act_train_forward(x, None, 1e-5, w, b, None, 0, "relu", 0.0)
    assert not (mean.requires_grad or var.requires_grad or count.requires_grad)
    dy = torch.randn_like(y)
    with torch.profiler.profile() as prof:
        grads = torch.autograd.grad(y, (x, w, b), dy)
    made = [e.name for e in prof.events() if e.name in ("aten::zeros", "aten::zeros_like")]
    assert made == [], made
    ref_y = TF.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    if op == "relu":
        ref_y = ref_y.relu()
    for got, exp in zip(grads, torch.autograd.grad(ref_y, (x, w, b), dy)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
