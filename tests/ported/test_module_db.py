"""PyTorch's generic module tests (``test/test_modules.py``) on the BatchNorm entries of its module
database (``torch/testing/_internal/common_modules.py``), re-created for ``batchnorm``'s classes.

Sources:

* ``torch/testing/_internal/common_modules.py`` of torch 2.13.0 (the installed package):
  ``module_inputs_torch_nn_BatchNorm1d/2d/3d``, ``module_error_inputs_torch_nn_BatchNorm1d_2d_3d``
  and the three ``ModuleInfo`` entries (``train_and_eval_differ=True``, dtypes float32/float64,
  gradgrad supported). This version of the database has no ``LazyBatchNorm*`` entries; the
  tests below also run our ``LazyBatchNorm1d/2d/3d`` on the same inputs with ``num_features``
  dropped from the constructor (an extension, marked ``Lazy*`` in the test ids), the way the
  database treats its other lazy modules (``is_lazy``: materialize before gradcheck, no
  ``test_to``/``test_to_empty``).
* ``test/test_modules.py``, classes ``TestModule`` and ``TestModuleCPUOnly``, read from the fork
  cyyever/pytorch at commit 3708c33c7424656640eac0ed4383b47d2e605214 (pytorch/pytorch's stored
  copy of that file is years old). Ported: ``test_forward``, ``test_factory_kwargs``,
  ``test_repr``, ``test_save_load``, ``test_non_contiguous_tensors``, ``test_grad``,
  ``test_gradgrad``, ``test_memory_format``, ``test_if_train_and_eval_modes_differ``,
  ``test_errors``, ``test_to``, ``test_to_empty``, ``test_device_ctx_init``.
  Not ported: ``test_cpu_gpu_parity`` and ``test_multiple_device_transfer`` (``@onlyAccelerator``:
  they compare a CPU and an accelerator copy), ``test_check_inplace`` (only for modules with an
  ``inplace`` argument).

Deliberate difference (documented): ``eps < 0`` is rejected with ``ValueError`` when the layer is
built; torch builds it and raises ``ValueError("... eps must be positive")`` in forward. The
error-input test asserts our construction-time error for ``eps=-1.0``; ``eps=0.0`` is a forward
error in both (training needs a positive eps).
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.testing import make_tensor

import batchnorm as B

from ._common import assert_equal, gradcheck, gradgradcheck


@dataclass
class ModuleInput:
    constructor_args: tuple
    forward_shape: tuple | None
    desc: str = ""
    constructor_kwargs: dict = field(default_factory=dict)

    def forward_args(self, dtype, requires_grad, device="cpu"):
        make = partial(make_tensor, device=device, dtype=dtype, requires_grad=requires_grad)
        return (make(self.forward_shape),)


def _inputs_bn1d():
    return [
        ModuleInput((10,), (4, 10), "affine"),
        ModuleInput((5,), (4, 5, 3), "3d_input"),
        ModuleInput((10, 1e-3, None), (4, 10), "affine_simple_average"),
        ModuleInput((10, 1e-3, 0.3, False), (4, 10), "not_affine"),
        ModuleInput((10, 1e-3, 0.3, True, False), (4, 10), "not_tracking_stats"),
        ModuleInput((5, 1e-3, 0.3, False), (4, 5, 3), "3d_input_not_affine"),
        ModuleInput((5, 1e-3, 0.3, False), (0, 5, 9), "zero_batch"),
        ModuleInput((10,), (4, 10), "affine_not_bias", {"bias": False}),
    ]


def _inputs_bn2d():
    return [
        ModuleInput((3,), (2, 3, 6, 6)),
        ModuleInput((3, 1e-3, None), (2, 3, 6, 6), "2d_simple_average"),
        ModuleInput((3, 1e-3, 0.8), (2, 3, 6, 6), "momentum"),
        ModuleInput((3, 1e-3, 0.8, False), (2, 3, 6, 6), "not_affine"),
        ModuleInput((3, 1e-3, 0.8, True, False), (2, 3, 6, 6), "not_tracking_stats"),
        ModuleInput((5, 1e-3, 0.3, False), (0, 5, 2, 2), "zero_batch"),
        ModuleInput((3,), (2, 3, 6, 6), "affine_not_bias", {"bias": False}),
    ]


def _inputs_bn3d():
    return [
        ModuleInput((3,), (2, 3, 4, 4, 4)),
        ModuleInput((3, 1e-3, None), (2, 3, 4, 4, 4), "3d_simple_average"),
        ModuleInput((3, 1e-3, 0.7), (2, 3, 4, 4, 4), "momentum"),
        ModuleInput((3, 1e-3, 0.7, False), (2, 3, 4, 4, 4), "not_affine"),
        ModuleInput((3, 1e-3, 0.7, True, False), (2, 3, 4, 4, 4), "not_tracking_stats"),
        ModuleInput((5, 1e-3, 0.3, False), (0, 5, 2, 2, 2), "zero_batch"),
        ModuleInput((3,), (2, 3, 4, 4, 4), "affine_not_bias", {"bias": False}),
    ]


def _lazy(inputs):
    return [ModuleInput(mi.constructor_args[1:], mi.forward_shape, mi.desc, mi.constructor_kwargs) for mi in inputs]


@dataclass
class Info:
    cls: type
    inputs: callable
    is_lazy: bool = False


MODULE_DB = [
    Info(B.BatchNorm1d, _inputs_bn1d),
    Info(B.BatchNorm2d, _inputs_bn2d),
    Info(B.BatchNorm3d, _inputs_bn3d),
    Info(B.LazyBatchNorm1d, lambda: _lazy(_inputs_bn1d()), True),
    Info(B.LazyBatchNorm2d, lambda: _lazy(_inputs_bn2d()), True),
    Info(B.LazyBatchNorm3d, lambda: _lazy(_inputs_bn3d()), True),
]
EAGER_DB = [i for i in MODULE_DB if not i.is_lazy]
DTYPES = (torch.float32, torch.float64)  # ModuleInfo default dtypes: floating_types()

# The database's momentum=0.8/0.7 inputs trigger our documented "looks like a Keras momentum"
# UserWarning (torch does not warn); it is not what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:momentum=0.[78] in PyTorch convention:UserWarning")


def _id(info):
    return info.cls.__name__


modules = pytest.mark.parametrize("info", MODULE_DB, ids=_id)
training_modes = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])


@contextlib.contextmanager
def _case(mi):
    """Name the module input in a failure (the original tests loop over inputs inside one test)."""
    try:
        yield
    except BaseException as e:
        e.add_note(f"module input: desc={mi.desc!r} constructor={mi.constructor_args} {mi.constructor_kwargs} "
                   f"forward shape={mi.forward_shape}")
        raise


def _build(info, mi, dtype, training, device="cpu"):
    m = info.cls(*mi.constructor_args, **mi.constructor_kwargs)
    m.to(device).to(dtype)
    m.train(training)
    return m


def _assert_module_parameters_and_buffers_are(m, device, dtype):
    device = torch.device(device)
    for kind, items in (("Parameter", m.named_parameters()), ("Buffer", m.named_buffers())):
        for name, t in items:
            assert t.device == device, f"{kind} {name} is on {t.device}, expected {device}"
            if t.dtype.is_floating_point:
                assert t.dtype == dtype, f"{kind} {name} is {t.dtype}, expected {dtype}"


# ----------------------------------------------------------------------------------- TestModule


# TestModule is a device-type test class: PyTorch instantiates it for every device type it tests,
# the meta device included (hence the @skipMeta on some of its tests); test_forward and
# test_factory_kwargs run here on "cpu" and "meta". The database's lazy modules carry
# ``DecorateInfo(skipMeta)`` ("Lazy modules don't currently play well with ModuleInfo tests on the
# meta device"; torch's own LazyBatchNorm fails there too), so the lazy classes run on "cpu" only.
modules_and_devices = pytest.mark.parametrize(
    "info,device", [(i, d) for i in MODULE_DB for d in ("cpu", "meta") if not (i.is_lazy and d == "meta")],
    ids=lambda v: v if isinstance(v, str) else _id(v))


@modules_and_devices
@training_modes
@dtypes
def test_forward(info, device, training, dtype):
    """test/test_modules.py::TestModule::test_forward: every module input runs forward after
    ``.to(device).to(dtype)``; ``.float()``/``.double()`` then leaves every floating parameter and
    buffer in that dtype (and on the device) and forward still runs."""
    for mi in info.inputs():
        with _case(mi):
            m = _build(info, mi, dtype, training, device)
            args = mi.forward_args(dtype, requires_grad=False, device=device)
            m(*args)
            (m.float() if dtype == torch.float32 else m.double())
            m(*args)
            _assert_module_parameters_and_buffers_are(m, device, dtype)


@modules_and_devices
@training_modes
@dtypes
def test_factory_kwargs(info, device, training, dtype):
    """test/test_modules.py::TestModule::test_factory_kwargs: ``device=``/``dtype=`` given to the
    constructor reach every created parameter and buffer (for lazy modules: their uninitialized
    parameters/buffers, which keep them when materialized)."""
    for mi in info.inputs():
        with _case(mi):
            kwargs = dict(mi.constructor_kwargs, device=device, dtype=dtype)
            m = info.cls(*mi.constructor_args, **kwargs)
            m.train(training)
            if info.is_lazy:
                for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
                    if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
                        assert t.dtype == dtype and t.device == torch.device(device), (name, t.dtype, t.device)
                with torch.no_grad():
                    m(*mi.forward_args(dtype, requires_grad=False, device=device))
            _assert_module_parameters_and_buffers_are(m, device, dtype)


@modules
@training_modes
@dtypes
def test_repr(info, training, dtype):
    """test/test_modules.py::TestModule::test_repr: ``repr`` and ``str`` do not raise."""
    for mi in info.inputs():
        with _case(mi):
            m = _build(info, mi, dtype, training)
            m.__repr__()
            str(m)


@modules
@training_modes
@dtypes
def test_save_load(info, training, dtype):
    """test/test_modules.py::TestModule::test_save_load: a module saved with ``torch.save`` and
    loaded back gives the same output; its state dict round-trips, also with ``weights_only=True``."""
    for mi in info.inputs():
        with _case(mi):
            m = _build(info, mi, dtype, training)
            sd = m.state_dict()
            args = mi.forward_args(dtype, requires_grad=False)
            output = m(*args)
            with tempfile.TemporaryFile() as f:
                torch.save(m, f)
                f.seek(0)
                m_copy = torch.load(f, weights_only=False)
                assert_equal(output, m_copy(*args))
            with tempfile.TemporaryFile() as f:
                torch.save(sd, f)
                f.seek(0)
                sd_copy = torch.load(f)
                _assert_state_dicts_equal(sd_copy, sd)
                f.seek(0)
                sd_copy_wo = torch.load(f, weights_only=True)
                _assert_state_dicts_equal(sd_copy_wo, sd)


def _assert_state_dicts_equal(a, b):
    assert list(a.keys()) == list(b.keys())
    for k in a:
        if isinstance(b[k], (UninitializedParameter, UninitializedBuffer)):
            assert type(a[k]) is type(b[k]), k
        else:
            assert_equal(a[k], b[k])


def _make_non_contiguous(t):
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    out.requires_grad = t.requires_grad
    return out


@modules
@training_modes
@dtypes
def test_non_contiguous_tensors(info, training, dtype):
    """test/test_modules.py::TestModule::test_non_contiguous_tensors: contiguous and non-contiguous
    inputs and output gradients (all four pairings) give the same output, input gradient
    (atol 1e-4) and parameter gradients."""
    for mi in info.inputs():
        with _case(mi):
            (inp,) = mi.forward_args(dtype, requires_grad=True)
            m = _build(info, mi, dtype, training)
            default_output = m(inp)
            grad_output = default_output.clone().detach_().normal_()
            default_output.backward(grad_output, retain_graph=True)
            default_input_grad = deepcopy(inp.grad)
            default_param_grad = deepcopy([p.grad for p in m.parameters()])

            nc_inp = _make_non_contiguous(inp)
            nc_grad_output = _make_non_contiguous(grad_output)
            for in_t, g_out in itertools.product([inp, nc_inp], [grad_output, nc_grad_output]):
                g_out_copy = deepcopy(g_out)
                in_t.grad = None
                for p in m.parameters():
                    p.grad = None
                out = m(in_t)
                out.backward(g_out_copy, retain_graph=True)
                assert_equal(out, default_output)
                assert_equal(in_t.grad, default_input_grad, atol=1e-4, rtol=0)
                for pg, dpg in zip([p.grad for p in m.parameters()], default_param_grad):
                    assert_equal(pg, dpg)


def _gradients_helper(info, training, dtype, check):
    for mi in info.inputs():
        with _case(mi):
            m = _build(info, mi, dtype, training)
            (inp,) = mi.forward_args(dtype, requires_grad=True)
            if info.is_lazy:
                with torch.no_grad():
                    m(inp)
            params = tuple(m.parameters())

            def fn_to_check(*flat_input_and_params, m=m):
                return m(flat_input_and_params[0])

            # total derivative, then each parameter alone with the input
            assert check(fn_to_check, (inp, *params), nondet_tol=0.0)
            old = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad = False
            for p, was in zip(params, old):
                p.requires_grad = was
                assert check(fn_to_check, (inp, *params), nondet_tol=0.0)
                p.requires_grad = False
            for p, was in zip(params, old):
                p.requires_grad = was


@modules
@training_modes
def test_grad(info, training):
    """test/test_modules.py::TestModule::test_grad (float64): gradcheck (PyTorch's defaults: fast
    mode, batched gradients checked) w.r.t. the input and all parameters, then w.r.t. the input
    and each parameter alone."""
    _gradients_helper(info, training, torch.float64, gradcheck)


@modules
@training_modes
def test_gradgrad(info, training):
    """test/test_modules.py::TestModule::test_gradgrad (float64; the BatchNorm entries support
    gradgrad): gradgradcheck, same inputs as ``test_grad``."""
    _gradients_helper(info, training, torch.float64, gradgradcheck)


def _mem_formats(inp):
    if inp.dim() == 4:
        return ([torch.contiguous_format, torch.channels_last],
                [torch.preserve_format, torch.contiguous_format, torch.channels_last])
    if inp.dim() == 5:
        return ([torch.contiguous_format, torch.channels_last_3d],
                [torch.preserve_format, torch.contiguous_format, torch.channels_last_3d])
    return [torch.contiguous_format], [torch.preserve_format, torch.contiguous_format]


def _check_out_mem_format(t, input_mem_format):
    # module_memformat_affects_out is False for the BatchNorm entries
    d = t.dim()
    if d == 4 and input_mem_format == torch.channels_last:
        assert t.numel() == 0 or t.is_contiguous(memory_format=torch.channels_last)
    elif d == 5 and input_mem_format == torch.channels_last_3d:
        assert t.numel() == 0 or t.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        assert t.is_contiguous()


@modules
@training_modes
@dtypes
def test_memory_format(info, training, dtype):
    """test/test_modules.py::TestModule::test_memory_format: channels_last / channels_last_3d input
    (and every module memory format) gives the contiguous result, an output in the input's memory
    format and, in training, gradients equal to the contiguous ones with the input gradient in the
    input's memory format."""
    for mi in info.inputs():
        with _case(mi):
            m = _build(info, mi, dtype, training)
            (inp,) = mi.forward_args(dtype, requires_grad=True)
            input_formats, module_formats = _mem_formats(inp)
            desired = m(inp)
            params = tuple(m.parameters())
            if training:
                ref_diff_inputs = (inp, *[p for p in params if p.requires_grad])
                ref_grad_outputs = torch.rand_like(desired)
                ref_grad_inputs = torch.autograd.grad(desired, ref_diff_inputs, grad_outputs=ref_grad_outputs)
            for input_format in input_formats:
                d_inp = inp.clone().to(memory_format=input_format).detach().requires_grad_(True)
                for module_format in module_formats:
                    m.to(memory_format=module_format)
                    outputs = m(d_inp)
                    if input_format != torch.contiguous_format or module_format != torch.contiguous_format:
                        assert_equal(outputs, desired)
                    _check_out_mem_format(outputs, input_format)
                    if training:
                        diff_inputs = (d_inp, *[p for p in m.parameters() if p.requires_grad])
                        grad_outputs = torch.empty_like(outputs).copy_(ref_grad_outputs)
                        grad_inputs = torch.autograd.grad(outputs, diff_inputs, grad_outputs=grad_outputs)
                        if input_format != torch.contiguous_format or module_format != torch.contiguous_format:
                            for g, rg in zip(grad_inputs, ref_grad_inputs):
                                assert_equal(g, rg)
                        for g in grad_inputs:
                            _check_out_mem_format(g, input_format)


@modules
@dtypes
def test_if_train_and_eval_modes_differ(info, dtype):
    """test/test_modules.py::TestModule::test_if_train_and_eval_modes_differ (training mode only):
    with the ``training`` attribute deleted, forward either works or fails on exactly that
    attribute, which is allowed because the BatchNorm entries declare train_and_eval_differ."""
    for mi in info.inputs():
        with _case(mi):
            m = _build(info, mi, dtype, True)
            delattr(m, "training")
            try:
                m(*mi.forward_args(dtype, requires_grad=False))
            except AttributeError as e:
                if "'training'" not in str(e):
                    raise


@pytest.mark.parametrize("info", EAGER_DB, ids=_id)
@training_modes
@dtypes
def test_errors(info, training, dtype):
    """test/test_modules.py::TestModule::test_errors with module_error_inputs_torch_nn_BatchNorm1d_2d_3d:
    ``eps=-1.0`` and ``eps=0.0`` must fail with ``ValueError`` matching "eps must be positive".
    Deliberate difference: ``eps=-1.0`` is rejected at construction (ValueError naming eps); torch
    fails in forward. ``eps=0.0`` constructs and fails in (training) forward, as torch's."""
    shape = {B.BatchNorm1d: (2, 10), B.BatchNorm2d: (2, 10, 5, 5), B.BatchNorm3d: (2, 10, 4, 4, 4)}[info.cls]
    inp = make_tensor(shape, device="cpu", dtype=dtype)
    with pytest.raises(ValueError, match="eps"):
        info.cls(10, eps=-1.0)
    m = info.cls(10, eps=0.0)  # the error input does not call .train(training): built in training mode
    with pytest.raises(ValueError, match="eps must be positive"):
        m(inp)


@contextlib.contextmanager
def _swap_module_params_on_conversion(swap):
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


@pytest.mark.parametrize("info", EAGER_DB, ids=_id)
@training_modes
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
@pytest.mark.parametrize("set_grad", [True, False], ids=["grad", "nograd"])
def test_to(info, training, swap, set_grad):
    """test/test_modules.py::TestModule::test_to (float32 inputs, non-lazy modules): ``.to(dtype)``
    over float32/float64 keeps Parameters (and their grads) as Parameters of the new dtype; with
    ``swap_module_params_on_conversion`` the parameter objects keep their ids and get new tensor
    data, without it ids and data pointers stay; with swap, ``.to()`` works after a forward and
    backward."""
    dtype = torch.float32
    with _swap_module_params_on_conversion(swap):
        for mi in info.inputs():
            with _case(mi):
                m = info.cls(*mi.constructor_args, **mi.constructor_kwargs)
                m.train(training)

                def _to(mod, set_grad=False):
                    for n, p in mod.named_parameters(recurse=False):
                        new_p = torch.nn.Parameter(p.detach().clone().to("cpu", dtype))
                        setattr(mod, n, new_p)
                        if set_grad:
                            new_p.grad = torch.randn_like(new_p)
                    for n, b in mod.named_buffers(recurse=False):
                        setattr(mod, n, b.detach().clone().to("cpu", dtype) if b.is_floating_point() else b.clone())

                _to(m, set_grad=set_grad)
                has_params = len(list(m.parameters())) > 0
                if swap and not set_grad and has_params:
                    out = m(*mi.forward_args(dtype, requires_grad=False))
                    out.sum().backward()
                    m.to(dtype=torch.half)
                    m.to(dtype=torch.float32)

                prev_dtype = dtype
                for dtype_ in DTYPES:
                    g_no_swap = dtype_ == prev_dtype
                    prev_dtype = dtype_
                    p_ids_before = [id(p) for p in m.parameters()]
                    p_cdatas_before = [p._cdata for p in m.parameters()]
                    if set_grad:
                        g_ids_before = [id(p.grad) for p in m.parameters()]
                        g_cdatas_before = [p.grad._cdata for p in m.parameters()]
                    m.to(device="cpu", dtype=dtype_)
                    assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())
                    assert all(p.device.type == "cpu" for p in m.parameters())
                    assert all(p.dtype == dtype_ for p in m.parameters())
                    p_ids_after = [id(p) for p in m.parameters()]
                    p_cdatas_after = [p._cdata for p in m.parameters()]
                    if set_grad:
                        assert all(p.grad.dtype == dtype_ for p in m.parameters())
                        g_ids_after = [id(p.grad) for p in m.parameters()]
                        g_cdatas_after = [p.grad._cdata for p in m.parameters()]
                    if swap:
                        assert p_ids_before == p_ids_after
                        assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after))
                        if set_grad:
                            assert all((a == b) if g_no_swap else (a != b)
                                       for a, b in zip(g_cdatas_before, g_cdatas_after))
                    else:
                        assert p_cdatas_before == p_cdatas_after
                        assert p_ids_before == p_ids_after
                        if set_grad:
                            assert g_cdatas_before == g_cdatas_after
                            assert g_ids_before == g_ids_after


@pytest.mark.parametrize("info", EAGER_DB, ids=_id)
@training_modes
@pytest.mark.parametrize("swap", [True, False], ids=["swap", "noswap"])
def test_to_empty(info, training, swap):
    """test/test_modules.py::TestModule::test_to_empty (float32, non-lazy): a module built on the meta
    device and moved with ``to_empty(device='cpu')`` has float32 CPU Parameters; with swap the
    parameter objects are kept (new data), without it they are replaced."""
    with _swap_module_params_on_conversion(swap):
        for mi in info.inputs():
            with _case(mi):
                with torch.device("meta"):
                    m = info.cls(*mi.constructor_args, **mi.constructor_kwargs)
                m.train(training)
                p_ids_before = [id(p) for p in m.parameters()]
                p_cdatas_before = [p._cdata for p in m.parameters()]
                m.to_empty(device=torch.device("cpu"))
                assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())
                assert all(p.device == torch.device("cpu") for p in m.parameters())
                assert all(p.dtype == torch.float32 for p in m.parameters())
                p_ids_after = [id(p) for p in m.parameters()]
                p_cdatas_after = [p._cdata for p in m.parameters()]
                if swap:
                    assert p_ids_before == p_ids_after
                    assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after))
                else:
                    assert all(a != b for a, b in zip(p_ids_before, p_ids_after))
                    assert all(a != b for a, b in zip(p_cdatas_before, p_cdatas_after))


# ---------------------------------------------------------------------------- TestModuleCPUOnly


@modules
@training_modes
@dtypes
def test_device_ctx_init(info, training, dtype):
    """test/test_modules.py::TestModuleCPUOnly::test_device_ctx_init: a module built under
    ``torch.device('meta')`` has meta parameters and buffers with the metadata (shape, dtype,
    strides, requires_grad) of the same module built on the CPU (lazy ones skipped, as there)."""
    for mi in info.inputs():
        with _case(mi):
            m_cpu = info.cls(*mi.constructor_args, **mi.constructor_kwargs)
            with torch.device("meta"):
                m = info.cls(*mi.constructor_args, **mi.constructor_kwargs)
            pairs = itertools.chain(zip(m.parameters(), m_cpu.parameters()), zip(m.buffers(), m_cpu.buffers()))
            for p_meta, p_cpu in pairs:
                if torch.nn.parameter.is_lazy(p_meta):
                    continue
                assert p_meta.is_meta
                assert p_meta.shape == p_cpu.shape
                assert p_meta.dtype == p_cpu.dtype
                assert p_meta.stride() == p_cpu.stride()
                assert p_meta.requires_grad == p_cpu.requires_grad
