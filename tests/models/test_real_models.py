"""Real architectures that nobody here wrote, converted with ``batchnorm.convert(model, "batchnorm")``.

torchvision's ResNet-18/50, MobileNetV2, MobileNetV3-small, EfficientNet-B0, DenseNet-121 and five
timm models, random weights (nothing is downloaded), 2x3x64x64 inputs. The models stay exactly as
their authors wrote them: ``ReLU(inplace=True)`` right after BN, residual ``out += identity``,
DenseNet's concatenations, squeeze-excitation gates; those are what a drop-in layer must survive.

For every model, on every CPU backend (``reference``: torch ops; ``cpu``: numba), in training and
in eval mode, one forward and backward of ``(model(x) * proj).sum()``, and:

1. float32, whole model: the output and every BN's running_mean/running_var/num_batches_tracked
   of the converted model equal the torch model's within float32 rounding, and ours is about as
   close to a float64 run of the torch model as torch's float32 run is;
2. float32, every BN layer of the converted model, on the input it got and the output gradient
   that reached it inside the model: its output, input gradient, gamma and beta gradients and
   running statistics equal torch's formula (``F.batch_norm`` and autograd) run in float64 on
   the same data, within a few eps;
3. float64, whole model: the output, input gradient, every parameter gradient and the running
   statistics equal torch's (float64) within float64 rounding;
4. every BN call ran on the forced backend (no silent fallback), the original torch model is
   untouched by the conversion and by running the copy, eval mode moves no statistic.

Also: channels_last (ResNet-18 of both libraries, both modes), batch size 1 in eval mode, and a
structural test (no torch BN left, every BN's configuration carried over, nothing else changed).

timm models: only those whose norm layers are exactly ``torch.nn.BatchNorm2d`` (``_build``
asserts it, so a timm release that changes a model makes the test fail rather than test
something else). Excluded, checked with timm 1.0.31:

* ``timm.layers.BatchNormAct2d`` (a ``BatchNorm2d`` subclass that applies the activation itself;
  converting it is separate work): regnetx_002, regnety_002 (also ``ConvNormAct``),
  mobilenetv2_*, mobilenetv3_*, efficientnet_b0, densenet121, mnasnet_small, lcnet_050,
  tinynet_e, cspresnet50, resnext26ts, repvgg_a0, dpn48b;
* mixed, mostly plain BN but some ``BatchNormAct2d``: ghostnet_050 (1 of 80), rexnet_100 (49 of 62);
* plain BN but too costly for the CI budget: selecsls42b (32M parameters), vgg11_bn (133M),
  hrnet_w18_small (13M parameters, 91 BNs on four resolutions).

Dropout and stochastic depth are switched off (their modules put in eval mode) in every copy:
their masks are random, and the float64 reference could not draw the same ones. They do not
touch BN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm import kernels
from batchnorm.nn.modules import _NormBase

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
EPS64 = torch.finfo(torch.float64).eps  # 2.22e-16

# TOLERANCES. Every number below is the largest seen over all cases, modes and both backends
# (``python -m tests.models._measure reference cpu`` prints them per case), in eps of the scale named.
#
# Check 1, float32 whole model, forward quantities. Distance from torch float32 at most
# FORWARD_FACTOR eps of max|t| (max|t| of the float64 run). Ours and torch's BN round differently
# (other summation orders, the inverse standard deviation computed another way) and each layer
# carries the difference on, 8-121 BN layers deep; a forward is a continuous function of every
# intermediate value, so the difference stays a multiple of eps. Measured: output 512 eps
# (timm dla46_c, training), 415 (ResNet-50, training, cpu), 346 in eval; running statistics
# 165. FORWARD_FACTOR = 2048 is 4x that. And ours' distance from float64 must stay within
# RATIO times torch float32's distance plus FLOOR eps: measured ratio at most 2.6.
#
# Check 2, float32 per BN layer against float64: at most LAYER_FACTOR eps of the magnitude of the
# terms the result is made of (per tensor: (|x|+|mean|)*invstd*|gamma| + |beta| for the output,
# |gamma*invstd|*max|dy|*(1+max|xhat|) for the input gradient in training, |gamma*invstd|*max|dy|
# in eval, the per-channel sums of |dy*xhat| and |dy| for the gamma and beta gradients,
# |running| + momentum*max|x| (squared, for the variance) for the running statistics).
# Measured: 1.9 eps at most (gamma gradients), outputs 1.3. LAYER_FACTOR = 16.
#
# Check 3, float64 whole model: at most F64_FACTOR eps64 of max|t|; a parameter gradient's scale
# is at least GRAD_FLOOR times the largest parameter gradient in the model, because some are zero
# by construction and hold rounding noise only (the beta of a BN whose output reaches a
# training-mode BN through a linear convolution, MobileNetV2's projections). Measured: gradients
# 6278 eps64 (1.4e-12; dla46_c, training), outputs 1235. F64_FACTOR = 2**15 (7e-12) is 5x that.
#
# Why the whole-model gradients are compared in float64, not float32: the models are piecewise
# linear (ReLU, ReLU6, hardswish, max pooling). Where a pre-activation lies within rounding
# distance of a kink (and among 10^5-10^6 activations some do), two float32 runs that differ by
# a few eps take different branches, and every gradient upstream moves by that element's whole
# contribution: measured 1e4-2e6 eps between torch float32 and torch float64 (ResNet-50 and DLA
# in eval mode), and as much between ours and torch float32 where one of them crossed a kink the
# other did not (timm resnet18d, training). Those are not rounding errors of BN, and no float32
# tolerance separates them from bugs. In float64 the runs differ by ~1e-13, far from any kink;
# the float32 kernels are held to rounding layer by layer by check 2.
FORWARD_FACTOR = 2048
RATIO = 4.0
FLOOR = 64
LAYER_FACTOR = 16
F64_FACTOR = 1 << 15
GRAD_FLOOR = 1e-3


@dataclass(frozen=True)
class Case:
    lib: str  # "torchvision" or "timm"
    name: str
    shape: tuple[int, int, int, int] = (2, 3, 64, 64)

    def __str__(self) -> str:
        return f"{self.lib}-{self.name}"


# 64x64 inputs: the ResNets' layer3 runs on 4x4 planes of 256 channels and layer4 on 2x2 planes,
# the mobile nets end on 2x2; batch 2 keeps at least 8 values per channel in training mode.
TORCHVISION = [Case("torchvision", n) for n in (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121")]
TIMM = [Case("timm", n) for n in ("resnet18", "resnet26", "resnet18d", "seresnet18", "dla46_c")]
CASES = TORCHVISION + TIMM
BACKENDS = ("reference", "cpu")
MODES = ("train", "eval")

_DROP = ("Dropout", "StochasticDepth", "DropPath", "DropBlock")
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")
_models: dict[str, nn.Module] = {}
# the largest error seen per check, in eps units of its scale (tests/models/_measure.py prints it)
measured: dict[str, float] = {}


def _note(check: str, eps_units: float) -> None:
    measured[check] = max(measured.get(check, 0.0), eps_units)
_torch_results: dict[tuple, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}


def _is_bn(m: nn.Module) -> bool:
    """A BN layer, torch's or ours (whether or not ours subclass torch's)."""
    return isinstance(m, (_BatchNorm, _NormBase))


def _is_torch_bn(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm) and not isinstance(m, _NormBase)


def _set_mode(model: nn.Module, train: bool) -> nn.Module:
    model.train(train)
    for m in model.modules():
        if any(d in type(m).__name__ for d in _DROP):
            m.eval()
    return model


def _build(case: Case, lib: Any) -> nn.Module:
    """The model with random weights, BN gamma/beta random (not the 1/0 of a fresh model, and
    not timm's zero gamma at the end of a residual branch) and running statistics averaged
    over two batches (so eval mode normalizes by statistics that fit the activations)."""
    torch.manual_seed(0)
    if case.lib == "torchvision":
        model = getattr(lib.models, case.name)(weights=None, num_classes=10)
    else:
        model = lib.create_model(case.name, pretrained=False, num_classes=10)
        other = sorted({type(m).__qualname__ for m in model.modules()
                        if isinstance(m, _BatchNorm) and type(m) is not nn.BatchNorm2d})
        assert not other, f"timm {case.name} now has norm layers {other}, not plain nn.BatchNorm2d: pick another"
    bns = [m for m in model.modules() if _is_torch_bn(m)]
    assert bns, f"{case} has no BN layer"
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.25, 0.25)
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        _set_mode(model, train=True)
        for _ in range(2):
            model(torch.randn(case.shape))
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    return model


@pytest.fixture
def make_model(request):
    """``make_model(case)``: a fresh copy of the case's torch model (built once per session)."""

    def make(case: Case) -> nn.Module:
        key = str(case)
        if key not in _models:
            _models[key] = _build(case, request.getfixturevalue(case.lib))
        return copy.deepcopy(_models[key])

    return make


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Force a backend for the test and record which backend each BN call of ours ran on."""
    if request.param == "cpu":
        pytest.importorskip("batchnorm.kernels.cpu")
    ran: list[str] = []
    select = kernels.select

    def spy(op, x, mask=None, vbs=0):
        module = select(op, x, mask, vbs)
        ran.append(module.__name__.rpartition(".")[2])
        return module

    monkeypatch.setattr(kernels, "select", spy)
    with batchnorm.use_backend(request.param):
        yield request.param, ran


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(model: nn.Module, x: Tensor, proj: Tensor, backward: bool = True) -> dict[str, Tensor]:
    """One forward and backward of ``(model(x) * proj).sum()``: everything to compare."""
    x = x.detach().clone().requires_grad_(backward)
    out = model(x)
    result = {"output": out.detach()}
    if backward:
        (out * proj).sum().backward()
        result["input grad"] = x.grad
        for name, p in model.named_parameters():
            assert p.grad is not None, f"no gradient for {name}"
            result[f"grad of {name}"] = p.grad
    for name, m in model.named_modules():
        if _is_bn(m):
            for k in _RUNNING:
                result[f"{name}.{k}"] = getattr(m, k).detach().clone()
    return result


# ---------------------------------------------------------------------------------------------
# per-layer capture: observers only (clones; a pre-hook on the output's autograd node reads the
# gradient that reaches the layer's output before any in-place op after it)


@dataclass
class Call:
    x: Tensor
    before: dict[str, Tensor]
    y: Tensor | None = None
    after: dict[str, Tensor] = field(default_factory=dict)
    dy: Tensor | None = None
    dx: Tensor | None = None


def _buffers(m: nn.Module) -> dict[str, Tensor]:
    return {k: getattr(m, k).detach().clone() for k in _RUNNING}


def _capture(model: nn.Module) -> tuple[dict[str, list[Call]], list[Any]]:
    """Record every BN call of ``model``: input, output, buffers before and after, and, from a
    hook on the output's autograd node (ours: the op's backward, whose first input is x), the
    gradient that reached the output (before any in-place op after the layer) and the input
    gradient the layer computed. Observers only: clones, nothing returned."""
    calls: dict[str, list[Call]] = {}
    handles = []
    for name, m in model.named_modules():
        if not _is_bn(m):
            continue

        def pre(mod, args, name=name):
            calls.setdefault(name, []).append(Call(args[0].detach().clone(), _buffers(mod)))

        def post(mod, args, out, name=name):
            call = calls[name][-1]
            call.y, call.after = out.detach().clone(), _buffers(mod)
            if out.grad_fn is not None:
                out.grad_fn.register_hook(lambda grad_in, grad_out, call=call: _got_grads(call, grad_in, grad_out))

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return calls, handles


def _got_grads(call: Call, grad_in: tuple, grad_out: tuple) -> None:
    call.dy = grad_out[0].detach().clone()
    call.dx = None if grad_in[0] is None else grad_in[0].detach().clone()


def _check_layers(ours: nn.Module, calls: dict[str, list[Call]], problems: list[str]) -> None:
    """Check 2: every BN call of the float32 run against torch's formula in float64 on the same data."""
    for name, m in ours.named_modules():
        if not _is_bn(m):
            continue
        assert len(calls.get(name, ())) == 1, f"{name} was called {len(calls.get(name, ()))} times, not once"
        call = calls[name][0]
        assert call.y is not None and call.dy is not None and call.dx is not None, f"{name}: no gradients captured"
        x64 = call.x.double().requires_grad_(True)
        w64 = m.weight.detach().double().requires_grad_(True)
        b64 = m.bias.detach().double().requires_grad_(True)
        rm, rv = call.before["running_mean"].double(), call.before["running_var"].double()
        nbt = int(call.before["num_batches_tracked"])
        momentum = m.momentum if m.momentum is not None else 1.0 / (nbt + 1)
        dims = [0, *range(2, x64.dim())]
        xd = x64.detach()
        if m.training:
            mean, var = xd.mean(dims), xd.var(dims, unbiased=False)
        else:
            mean, var = rm.clone(), rv.clone()
        y64 = F.batch_norm(x64, rm, rv, w64, b64, m.training, momentum, m.eps)  # moves rm, rv in training
        dy = call.dy.double()
        gx, gw, gb = torch.autograd.grad(y64, (x64, w64, b64), dy)
        # the magnitudes of the terms each result is made of (see TOLERANCES)
        shape = [1, -1] + [1] * (x64.dim() - 2)
        invstd = (var + m.eps).rsqrt()
        xhat = (xd - mean.view(shape)) * invstd.view(shape)
        g_inv = (w64.detach() * invstd).abs().view(shape)
        n = xd.numel() / xd.shape[1]
        scales = {
            "output": ((xd.abs() + mean.abs().view(shape)) * g_inv + b64.detach().abs().view(shape)).max(),
            "input grad": g_inv.max() * dy.abs().max() * ((1 + xhat.abs().max()) if m.training else 1),
            "gamma grad": (dy * xhat).abs().sum(dims).max(),
            "beta grad": dy.abs().sum(dims).max(),
            "running_mean": call.before["running_mean"].double().abs().max() + momentum * xd.abs().max(),
            "running_var": call.before["running_var"].double().abs().max() + momentum * n / max(n - 1, 1) * (
                (xd.abs() + mean.abs().view(shape)) ** 2).max(),
        }
        pairs = {
            "output": (call.y, y64.detach()),
            "input grad": (call.dx, gx),
            "gamma grad": (m.weight.grad, gw),  # the layer runs once: its parameters' gradients are this call's
            "beta grad": (m.bias.grad, gb),
            "running_mean": (call.after["running_mean"], rm),
            "running_var": (call.after["running_var"], rv),
        }
        expected_nbt = nbt + 1 if m.training else nbt
        if int(call.after["num_batches_tracked"]) != expected_nbt:
            problems.append(f"{name}: num_batches_tracked {int(call.after['num_batches_tracked'])}, "
                            f"expected {expected_nbt}")
        for what, (actual, expected) in pairs.items():
            scale = float(scales[what]) or 1.0
            err = (actual.double() - expected).abs().max().item() / (EPS32 * scale)
            _note(f"layer {'train' if m.training else 'eval'} {what}", err)
            if not err <= LAYER_FACTOR:
                problems.append(f"layer {name} {tuple(call.x.shape)}, {what}: off by {err:.3g} eps of its terms")


def _compare_forward(ours: dict, t32: dict, t64: dict, mode: str, problems: list[str]) -> None:
    """Check 1: float32 output and running statistics (distances relative to max|t| of the float64 run)."""
    for key, expected in t32.items():
        actual = ours[key]
        if not expected.is_floating_point():  # num_batches_tracked
            if not torch.equal(actual, expected):
                problems.append(f"{key}: {actual.tolist()} != {expected.tolist()}")
            continue
        truth = t64[key]
        scale = (truth.abs().max().item() or 1.0) * EPS32
        vs_torch = (actual - expected).abs().max().item() / scale
        err_ours = (actual.double() - truth).abs().max().item() / scale
        err_torch = (expected.double() - truth).abs().max().item() / scale
        kind = key if key == "output" else key.rpartition(".")[2]
        _note(f"f32 {mode} {kind}: ours vs torch", vs_torch)
        _note(f"f32 {mode} {kind}: ours vs float64 / torch vs float64", err_ours / max(err_torch, 1.0))
        if not vs_torch <= FORWARD_FACTOR:
            problems.append(f"{key}: ours is {vs_torch:.3g} eps (of max|t|) from torch float32")
        if not err_ours <= RATIO * err_torch + FLOOR:
            problems.append(f"{key}: ours is {err_ours:.3g} eps (of max|t|) from float64, "
                            f"torch float32 {err_torch:.3g}")


def _compare_f64(ours: dict, t64: dict, problems: list[str]) -> None:
    """Check 3: everything in float64."""
    grad_scale = max(v.abs().max().item() for k, v in t64.items() if k.startswith("grad of"))
    for key, expected in t64.items():
        actual = ours[key]
        if not expected.is_floating_point():
            if not torch.equal(actual, expected):
                problems.append(f"float64 {key}: {actual.tolist()} != {expected.tolist()}")
            continue
        scale = expected.abs().max().item()
        if key.startswith("grad of"):
            scale = max(scale, GRAD_FLOOR * grad_scale)
        err = (actual - expected).abs().max().item() / ((scale or 1.0) * EPS64)
        _note("f64 " + ("grads" if "grad" in key else key.rpartition(".")[2]), err)
        if not err <= F64_FACTOR:
            problems.append(f"float64 {key}: ours is {err:.3g} eps64 (of max|t|) from torch")


def _check_model(case: Case, make_model, backend, mode: str, *, batch: int | None = None,
                 channels_last: bool = False) -> None:
    name, ran = backend
    shape = case.shape if batch is None else (batch, *case.shape[1:])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    proj = torch.randn(shape[0], 10, generator=gen)

    model = _set_mode(make_model(case), mode == "train").to(memory_format=fmt)
    model64 = copy.deepcopy(model).double()
    before = _state(model)
    ours = batchnorm.convert(model, "batchnorm")
    ours64 = batchnorm.convert(model64, "batchnorm")
    assert not any(_is_torch_bn(m) for m in ours.modules())
    assert ours.training == model.training

    # ours first, so that the untouched original is what the torch runs start from
    calls, handles = _capture(ours)
    ours32 = _run(ours, x, proj)
    for h in handles:
        h.remove()
    assert ran and set(ran) == {name}, f"BN calls ran on {sorted(set(ran))}, not only {name}"
    nonfinite = [k for k, t in ours32.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    assert not nonfinite, f"not finite: {', '.join(nonfinite[:10])}{' ...' if len(nonfinite) > 10 else ''}"
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items()), \
        "converting or running the converted model changed the original"
    assert all(p.grad is None for p in model.parameters()), "the original got gradients"
    assert all(_is_torch_bn(m) for m in model.modules() if _is_bn(m))
    if mode == "eval":
        for k, v in before.items():
            if k.rpartition(".")[2] in _RUNNING:
                assert torch.equal(ours32[k], v), f"eval mode changed {k}"

    problems: list[str] = []
    _check_layers(ours, calls, problems)
    ran.clear()
    result64 = _run(ours64, x.double(), proj.double())
    assert ran and set(ran) == {name}, f"float64 BN calls ran on {sorted(set(ran))}, not only {name}"

    key = (str(case), mode, shape, channels_last)
    if key not in _torch_results:
        # torch float32 serves check 1 only: its forward quantities
        _torch_results[key] = (_run(model, x, proj, backward=False), _run(model64, x.double(), proj.double()))
    t32, t64 = _torch_results[key]
    _compare_forward(ours32, t32, t64, mode, problems)
    _compare_f64(result64, t64, problems)
    assert not problems, f"{len(problems)} mismatches:\n  " + "\n  ".join(problems[:25])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_converted_model_matches_torch(case, mode, make_model, backend):
    _check_model(case, make_model, backend, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [Case("torchvision", "resnet18"), Case("timm", "resnet18")], ids=str)
def test_channels_last(case, mode, make_model, backend):
    _check_model(case, make_model, backend, mode, channels_last=True)


@pytest.mark.parametrize("case", [Case("torchvision", "resnet18"), Case("torchvision", "mobilenet_v3_small"),
                                  Case("torchvision", "densenet121")], ids=str)
def test_batch_of_one_in_eval(case, make_model, backend):
    _check_model(case, make_model, backend, "eval", batch=1)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conversion_replaces_every_bn_and_leaves_the_original(case, make_model):
    model = make_model(case)
    before = _state(model)
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    ours = batchnorm.convert(model, "batchnorm")
    assert ours is not model
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    theirs = {n: m for n, m in model.named_modules() if _is_bn(m)}
    mine = {n: m for n, m in ours.named_modules() if _is_bn(m)}
    assert mine.keys() == theirs.keys()
    assert not any(_is_torch_bn(m) for m in ours.modules()), "a torch BN is left"
    for n, m in mine.items():
        t = theirs[n]
        assert type(m) is batchnorm.BatchNorm2d, (n, type(m))
        assert (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats) == \
            (t.num_features, t.eps, t.momentum, t.affine, t.track_running_stats), n
    # everything else is the same module type at the same place, with the same state
    assert [(n, type(m)) for n, m in ours.named_modules() if n not in mine] == \
        [(n, t) for n, t in types_before if n not in theirs]
    assert ours.state_dict().keys() == before.keys()
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())
