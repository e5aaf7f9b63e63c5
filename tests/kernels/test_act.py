"""Fused batch norm + activation (+ residual): every backend against torch's BN then act."""

import pytest
import torch
import torch.nn.functional as TF

import batchnorm
from batchnorm.kernels import reference_act as ra

from .conftest import configure_cpu

ACTS = ["identity", "relu", "leaky_relu", "silu", "gelu"]


def torch_act(z, act, slope=0.01):
    return {"identity": lambda t: t, "relu": torch.relu, "leaky_relu": lambda t: TF.leaky_relu(t, slope),
            "silu": TF.silu, "gelu": TF.gelu}[act](z)


def torch_bn_act(x, w, b, r, act, training=True, rm=None, rv=None):
    y = TF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    if r is not None:
        y = y + r
    return torch_act(y, act)


def backends():
    out = ["reference"]
    try:
        import batchnorm.kernels.cpu  # noqa: F401

        out += ["cpu", "cpu-streamed", "cpu-planes"]
    except ImportError:
        pass
    return out


@pytest.fixture(params=backends())
def backend(request, monkeypatch):
    if request.param.startswith("cpu"):
        configure_cpu(pytest.importorskip("batchnorm.kernels.cpu"), monkeypatch, request.param)
    with batchnorm.use_backend(request.param.split("-")[0]):
        yield request.param


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    "shape,layout", [((4, 6, 5, 7), "nchw"), ((4, 6, 5, 7), "cl"), ((3, 1, 9, 11), "nchw"), ((32, 5), "nchw")]
)
def test_train_forward_backward(backend, act, residual, shape, layout):
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64)
    b = torch.randn(c, dtype=torch.float64)
    r = torch.randn(shape, dtype=torch.float64) if residual else None
    leaves = [t.clone().requires_grad_() for t in (x, w, b)] + ([r.clone().requires_grad_()] if residual else [])
    y, mean, var, _ = torch.ops.batchnorm.act_train_forward(
        leaves[0], leaves[3] if residual else None, 1e-5, leaves[1], leaves[2], None, 0, act, 0.01)
    leaves2 = [t.clone().requires_grad_() for t in (x, w, b)] + ([r.clone().requires_grad_()] if residual else [])
    y2 = torch_bn_act(leaves2[0], leaves2[1], leaves2[2], leaves2[3] if residual else None, act)
    torch.testing.assert_close(y, y2)
    dy = torch.randn(shape, dtype=torch.float64)
    g = torch.autograd.grad(y, leaves, dy)
    g2 = torch.autograd.grad(y2, leaves2, dy)
    for a, e in zip(g, g2):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("act", ACTS)
def test_apply_forward_backward(backend, act):
    shape = (3, 4, 6, 5)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(4, dtype=torch.float64)
    rv = torch.rand(4, dtype=torch.float64) + 0.5
    y = torch.ops.batchnorm.act_apply_forward(x, r, rm, rv, 1e-5, w, b, act, 0.01)
    y2 = torch_bn_act(x, w, b, r, act, training=False, rm=rm, rv=rv)
    torch.testing.assert_close(y, y2)
    dy = torch.randn(shape, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(y, (x, w, b, r), dy), torch.autograd.grad(y2, (x, w, b, r), dy)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_gradcheck(backend, act):
    x = torch.randn(3, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: torch.ops.batchnorm.act_train_forward(x, r, 1e-5, w, b, None, 0, act, 0.01)[0],
        (x, w, b, r),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_float32_close_to_float64(dtype, monkeypatch):
    cpu = pytest.importorskip("batchnorm.kernels.cpu")
    monkeypatch.setattr(cpu, "MIN_NUMEL", 0)
    x = torch.randn(6, 10, 7, 9, dtype=torch.float64)
    r = torch.randn_like(x)
    w, b = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    for act in ACTS:
        y, mean, var, count = cpu.forward_train_act(x.to(dtype), r.to(dtype), 1e-5, w, b, None, 0, act, 0.1)
        y64, m64, v64, c64 = ra.forward_train_act(x, r, 1e-5, w, b, None, 0, act, 0.1)
        torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-4)
        dy = torch.randn_like(x)
        got = cpu.backward_train_act(dy.to(dtype), x.to(dtype), r.to(dtype), m64, v64, 1e-5, w, b, None, c64, 0,
                                     act, 0.1, True, True)
        exp = ra.backward_train_act(dy, x, r, m64, v64, 1e-5, w, b, None, c64, 0, act, 0.1, True, True)
        for a, e in zip(got, exp):
            torch.testing.assert_close(a.double(), e.double(), atol=1e-4, rtol=1e-4)


def test_masks_and_ghost_batches_fall_back_to_reference():
    x = torch.randn(8, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(8, 5) > 0.3
    layer = batchnorm.BatchNormAct1d(3, act="relu", virtual_batch_size=4).double()
    plain = batchnorm.BatchNorm1d(3, virtual_batch_size=4).double()
    y = layer(x, mask=mask)
    y2 = torch.relu(plain(x, mask=mask))
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(layer.running_var, plain.running_var)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("cls,shape", [(batchnorm.BatchNormAct2d, (4, 5, 6, 6)),
                                       (batchnorm.BatchNormAct1d, (16, 5)),
                                       (batchnorm.BatchNormAct3d, (2, 5, 3, 4, 4))])
def test_layer_matches_torch(backend, act, cls, shape):
    torch.manual_seed(2)
    layer = cls(5, act=act).double()
    ref_bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}[len(shape)](5).double()
    with torch.no_grad():
        for m in (layer, ref_bn):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-0.2, 0.3, 5))
    x = torch.randn(shape, dtype=torch.float64)
    r = torch.randn(shape, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(layer(x, r), torch_act(ref_bn(x) + r, act))
    torch.testing.assert_close(layer.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(layer.running_var, ref_bn.running_var)
    layer.eval()
    ref_bn.eval()
    torch.testing.assert_close(layer(x), torch_act(ref_bn(x), act))


def test_add_act_needs_residual():
    layer = batchnorm.BatchNormAddAct2d(3)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="residual"):
        layer(x, None)
    torch.testing.assert_close(layer(x, x), torch.relu(TF.batch_norm(x, None, None, training=True) + x))


@pytest.mark.parametrize("act", ["leaky_relu", "identity"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_abn_gradients_equal_standard(backend, act, channels_last):
    torch.manual_seed(3)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = batchnorm.BatchNormAct2d(4, act=act, negative_slope=0.1, inplace_abn=True).double()
    b = batchnorm.BatchNormAct2d(4, act=act, negative_slope=0.1).double()
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(torch.tensor([0.5, -1.0, 2.0, 1.5]))
            m.bias.copy_(torch.tensor([0.1, 0.0, -0.3, 0.2]))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(a.weight.grad, b.weight.grad)
    torch.testing.assert_close(a.bias.grad, b.bias.grad)


def test_inplace_abn_saves_only_the_output():
    layer = batchnorm.BatchNormAct2d(4, act="leaky_relu", inplace_abn=True)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x * 1.0)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr()


def test_inplace_abn_rejects_bad_configurations():
    with pytest.raises(ValueError, match="invertible"):
        batchnorm.BatchNormAct2d(4, act="relu", inplace_abn=True)
    layer = batchnorm.BatchNormAct2d(4, act="leaky_relu", inplace_abn=True)
    with torch.no_grad():
        layer.weight[1] = 0
    with pytest.raises(ValueError, match="non-zero"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="act must be one of"):
        batchnorm.BatchNormAct2d(4, act="tanh")


def test_fused_layers_compile_fullgraph():
    torch.manual_seed(4)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    r = torch.randn(2, 4, 5, 5)
    eager = batchnorm.BatchNormAct2d(4, act="silu")
    compiled_layer = batchnorm.BatchNormAct2d(4, act="silu")
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    y = compiled(x, r)
    (gc,) = torch.autograd.grad(y.sum(), x)
    y2 = eager(x, r)
    (ge,) = torch.autograd.grad(y2.sum(), x)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gc, ge)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
    inplace = torch.compile(batchnorm.BatchNormAct2d(4, act="leaky_relu", inplace_abn=True), fullgraph=True,
                            backend="aot_eager")
    (gi,) = torch.autograd.grad(inplace(x).sum(), x)
    assert torch.isfinite(gi).all()
