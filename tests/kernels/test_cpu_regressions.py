"""Regressions of the numba CPU backend, each reproducing a defect as users met it.

* the inference forward on planes read freed memory (the kernel took raw pointers of arrays it
  had allocated, which numba freed before the parallel loop ran): the resnet layer-3 shapes
  with two threads, the pointer lifetime rule checked on the source, and the kernels run with
  glibc poisoning freed memory;
* the planes reductions summed a whole plane in float32: the variance's error grew with the
  plane (4e-4 at 4096x4096);
* ``eps = 0`` with a zero variance raised ``ZeroDivisionError`` (numba's Python error model).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import batchnorm
from batchnorm.kernels import reference as ref
from batchnorm.kernels import reference_act as ra

cpu = pytest.importorskip("batchnorm.kernels.cpu")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ pointers of freed arrays

RESNET_LAYER3 = [(4, 256, 4, 4), (2, 256, 4, 4), (4, 256, 5, 5), (4, 256, 7, 7), (4, 300, 4, 4), (4, 128, 8, 8)]


@pytest.mark.parametrize("shape", RESNET_LAYER3)
def test_eval_planes_2_threads_resnet_layer3_shapes(two_threads, shape):
    """The layer in eval mode against torch's: the planes kernel's per-channel values (tiled
    into arrays the kernel allocated) were freed before its parallel loop read them (~1e7 or NaN)."""
    m = batchnorm.BatchNorm2d(shape[1]).eval()
    with torch.no_grad():
        m.running_var.uniform_(0.5, 2)
        m.running_mean.normal_()
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    t = torch.nn.BatchNorm2d(shape[1]).eval()
    t.load_state_dict(m.state_dict())
    x = torch.randn(*shape)
    with batchnorm.use_backend("cpu"):
        for _ in range(3):
            torch.testing.assert_close(m(x), t(x), rtol=1e-5, atol=1e-5)


_POINTER_CALLS = {"pointers", "_ptr"}
# calls whose result carries pointers of their arguments (a pointer stays one through them)
_CARRIERS = _POINTER_CALLS | {"_grad", "_plane_gate", "_forward_operands", "_gate_operands", "_with_input_grad",
                               "_row_forward", "_row_gate", "_at_channel"}


def _called(node: ast.AST) -> str | None:
    return node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None


def _carries(expr: ast.AST | None, names: set[str]) -> bool:
    """Whether the value of ``expr`` may hold a pointer held by one of ``names``."""
    if isinstance(expr, ast.Name):
        return expr.id in names
    if isinstance(expr, (ast.Tuple, ast.List)):
        return any(_carries(e, names) for e in expr.elts)
    if isinstance(expr, ast.Subscript):
        return _carries(expr.value, names)
    if isinstance(expr, ast.BinOp):
        return _carries(expr.left, names) or _carries(expr.right, names)
    if isinstance(expr, ast.IfExp):
        return _carries(expr.body, names) or _carries(expr.orelse, names)
    if _called(expr) in _CARRIERS:
        return any(_carries(a, names) for a in expr.args)  # type: ignore[union-attr]
    return False


def _targets(stmt: ast.AST) -> set[str]:
    tgts = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]  # type: ignore[attr-defined]
    return {n.id for t in tgts for n in ast.walk(t) if isinstance(n, ast.Name)}


def _kind(fn: ast.FunctionDef) -> str | None:
    """``"inline"``, ``"compiled"`` or ``None`` (not jitted) from the function's ``njit`` decorator."""
    for d in fn.decorator_list:
        if _called(d) == "njit":
            kws = d.keywords  # type: ignore[attr-defined]
            inline = any(k.arg == "inline" or (k.arg is None and getattr(k.value, "id", "") == "_INL") for k in kws)
            return "inline" if inline else "compiled"
    return None


def pointer_rule_violations(source: str) -> list[str]:
    """The lifetime rule of :func:`batchnorm.kernels.cpu.simd.pointers` on a module's source: pointers
    (``pointers(...)``, ``_ptr(...)``) are taken only in compiled, not inlined, functions (``_ptr``
    itself aside), of the function's arguments or of arrays passed to ``keep(...)`` after the last
    statement that reads a pointer derived from them (assignments through tuples, subscripts,
    ``+`` and the calls in ``_CARRIERS`` carry a pointer)."""
    bad = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef) or _kind(fn) is None or fn.name == "_ptr":
            continue
        calls = [c for c in ast.walk(fn) if _called(c) in _POINTER_CALLS]
        if calls and _kind(fn) == "inline":
            bad.append(f"{fn.name}: an inlined helper takes pointers (its parameters are its caller's variables)")
            continue
        params = {a.arg for a in fn.args.args}
        assigns = [s for s in ast.walk(fn) if isinstance(s, (ast.Assign, ast.AugAssign))]
        reassigned = set().union(*[_targets(s) for s in assigns]) if assigns else set()
        keeps = [c for c in ast.walk(fn) if _called(c) == "keep"]
        for call in calls:
            for origin in {n.id for a in call.args for n in ast.walk(a) if isinstance(n, ast.Name)}:
                if origin in params and origin not in reassigned:
                    continue
                derived = {origin}
                while True:  # the variables that may hold a pointer into `origin`
                    more = set().union(*[_targets(s) for s in assigns if _carries(s.value, derived)] or [set()])
                    if more <= derived:
                        break
                    derived |= more
                derived.discard(origin)
                uses = [n.lineno for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in derived
                        and isinstance(n.ctx, ast.Load)] + [call.lineno]
                kept = [k.lineno for k in keeps if any(isinstance(n, ast.Name) and n.id == origin
                                                       for n in ast.walk(k))]
                if not kept or max(kept) <= max(uses):
                    bad.append(f"{fn.name}: pointer of {origin!r} (line {call.lineno}) read on line {max(uses)} "
                               f"without a later keep({origin})")
    return bad


def test_pointers_only_of_arguments_or_kept_arrays():
    """Every pointer the CPU backend takes obeys the lifetime rule (see the checker)."""
    sources = sorted(Path(cpu.__file__).parent.glob("*.py"))
    assert len(sources) > 1
    assert {p.name: pointer_rule_violations(p.read_text()) for p in sources} == {p.name: [] for p in sources}


def test_pointer_rule_checker_finds_the_defect():
    """The checker flags the pattern behind the inference defect (and the latent one in the split
    backward), and accepts the kept versions."""
    freed = textwrap.dedent('''
        @njit(**_JIT)
        def k(x, mean, y):
            mt = _tiled(mean, x, 1)
            p = (_ptr(x), _ptr(mt))
            for b in prange(4):
                _y(y, p)

        @njit(**_JIT)
        def r(x, y):
            for k in prange(4):
                buf = np.empty(4)
                g, goff = _grad(x, buf, _ptr(buf), 0, 4)
                s = _sums(g, goff)
                y[k] = s

        @njit(**_INL)
        def h(t, y):
            y[0] = pointers((t,))[0]
    ''')
    bad = pointer_rule_violations(freed)
    assert len(bad) == 3 and "'mt'" in bad[0] and "'buf'" in bad[1] and "inlined" in bad[2], bad
    kept = freed.replace("_y(y, p)", "_y(y, p)\n    keep(mt)")
    kept = kept.replace("s = _sums(g, goff)", "s = _sums(g, goff)\n        keep(buf)")
    assert len(pointer_rule_violations(kept)) == 1


def _freed_memory_workload() -> list[str]:
    """Every planes and rows kernel (fused and split, plain, relu, silu with a residual, one and
    two threads) against the float64 reference, coarsely: garbage, not rounding, is the target.
    Returns the failing cases."""
    failures = []
    saved = cpu.PARALLEL_MIN, torch.get_num_threads(), cpu._fused_channels
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cpu.PARALLEL_MIN = 0
            for shape, cl in (((4, 256, 4, 4), False), ((3, 6, 7, 7), False), ((2, 5, 9, 9), False),
                              ((4, 6, 3, 3), False), ((4, 6, 5, 5), True)):
                for fused in (True, False):
                    cpu._fused_channels = lambda c, t, fused=fused: fused
                    for act, res in (("identity", False), ("relu", False), ("silu", True)):
                        failures += _compare_all_passes(shape, cl, act, res, f"{threads} thread(s), fused={fused}")
    finally:
        cpu.PARALLEL_MIN, threads, cpu._fused_channels = saved
        torch.set_num_threads(threads)
    return failures


def _compare_all_passes(shape, cl, act, res, label):
    g = torch.Generator().manual_seed(1)
    c = shape[1]
    fmt = torch.channels_last if cl else torch.contiguous_format
    x, dy, r = (torch.randn(shape, generator=g).contiguous(memory_format=fmt) for _ in range(3))
    r = r if res else None
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    d = [t.double() if t is not None else None for t in (x, dy, r, w, b, rm, rv)]
    y, mean, var, count = cpu.forward_train_act(x, r, 1e-5, w, b, None, 0, act, 0.1)
    mean64, var64, count64 = ref.stats(d[0])
    got = [y, mean, var, cpu.forward_apply_act(x, r, rm, rv, 1e-5, w, b, act, 0.1),
           *cpu.backward_train_act(dy, x, r, mean64, var64, 1e-5, w, b, None, count64, 0, act, 0.1, True, res),
           *cpu.backward_apply_act(dy, x, r, rm, rv, 1e-5, w, b, act, 0.1, True, res)]
    want = [*ra.forward_train_act(d[0], d[2], 1e-5, d[3], d[4], None, 0, act, 0.1)[:3],
            ra.forward_apply_act(d[0], d[2], d[5], d[6], 1e-5, d[3], d[4], act, 0.1),
            *ra.backward_train_act(d[1], d[0], d[2], mean64, var64, 1e-5, d[3], d[4], None, count64, 0, act, 0.1,
                                   True, res),
            *ra.backward_apply_act(d[1], d[0], d[2], d[5], d[6], 1e-5, d[3], d[4], act, 0.1, True, res)]
    names = ["y", "mean", "var", "y eval", "dx", "dw", "db", "dr", "dx apply", "dw apply", "db apply", "dr apply"]
    bad = [n for n, a, e in zip(names, got, want) if (a is None) != (e is None) or
           (a is not None and not torch.allclose(a.double().reshape(e.shape), e, rtol=1e-3, atol=1e-3))]
    return [f"{shape} channels_last={cl} {act} residual={res} {label}: {bad}"] if bad else []


def test_kernels_read_no_freed_memory():
    """Under glibc's ``MALLOC_PERTURB_`` (tcache off, so every small block is poisoned when freed)
    a kernel that reads an array after numba freed it gets garbage at once, with any number of
    threads, instead of only when the memory happens to be reused. The workload runs here first
    (which also fills the kernels' disk cache for the subprocess)."""
    assert _freed_memory_workload() == []
    env = dict(os.environ, MALLOC_PERTURB_="165", GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
    code = ("import sys; from tests.kernels import test_cpu_regressions as t; "
            "f = t._freed_memory_workload(); print(*f, sep='\\n'); sys.exit(1 if f else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


# ------------------------------------------------------------------ precision on large planes

def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double().reshape(want.shape) - want).abs() / want.abs()).max())


@pytest.mark.parametrize("side", [512, 2048, 4096])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_variance_precision_large_planes(two_threads, layout, side):
    """The batch variance and the backward's sums of (1, 2, side, side) float32 against float64,
    within a few float32 roundings whatever the plane's size (torch: ~5e-8). Summing a plane
    whole in float32 vectors gave the variance 1.3e-6 (512), 4.5e-5 (2048), 3.8e-4 (4096)."""
    g = torch.Generator().manual_seed(side)
    x = torch.randn((1, 2, side, side), generator=g) * 3 + 2
    dy = 0.5 + 0.1 * x + torch.randn(x.shape, generator=g)  # sums far from 0: relative errors mean something
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    xm = x.double().transpose(0, 1).reshape(2, -1)
    dym = dy.double().transpose(0, 1).reshape(2, -1)
    _, mean, var, count = cpu.forward_train(x, 1e-5, None, None, None, 0)
    assert _rel(var[0], xm.var(1, unbiased=False)) < 4e-7
    assert _rel(mean[0], xm.mean(1)) < 4e-7
    # the sums with the kernel's own statistics and 1 / sqrt(var + eps) as it rounds it
    inv = (1 / (var[0].double() + 1e-5).sqrt()).float().double()
    _, dw, db = cpu.backward_train(dy, x, mean, var, 1e-5, None, None, count, 0, False)
    assert _rel(db, dym.sum(1)) < 4e-7
    assert _rel(dw, (dym * (xm - mean[0].double()[:, None])).sum(1) * inv) < 4e-7


# ------------------------------------------------------------------ eps = 0, zero variance

def _same_ieee(got: torch.Tensor, want: torch.Tensor) -> None:
    """Non-finite at the same places, equal where finite."""
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    torch.testing.assert_close(got[torch.isfinite(want)], want[torch.isfinite(want)])


@pytest.mark.parametrize("shape, cl", [((2, 3, 5, 5), False), ((2, 3, 5, 5), True), ((4, 3, 2, 2), False),
                                       ((8, 3), False)])
def test_eval_eps0_zero_var_ieee(two_threads, shape, cl):
    """``eps = 0`` and a zero running variance: the kernels raised ZeroDivisionError (numba's
    Python error model); now inf/NaN as the reference backend gives them (``(x - mean) * inf``:
    +-inf, NaN where ``x == mean``) and non-finite where torch is (torch computes
    ``x * inf + (b - mean * inf)``, so its inf/NaN pattern differs), in every op that computes
    ``1 / sqrt(var + eps)``."""
    c = shape[1]
    layer, native = (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d) if len(shape) == 4 else \
        (batchnorm.BatchNorm1d, torch.nn.BatchNorm1d)
    m = layer(c, eps=0).eval()
    with torch.no_grad():
        m.running_var.zero_()
        m.running_var[1] = 2.0  # one finite channel
        m.running_mean.normal_()
    t = native(c, eps=0).eval()
    t.load_state_dict(m.state_dict())
    x = torch.randn(shape)
    x[0, 0] = m.running_mean[0]  # x == mean: 0 * inf
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), batchnorm.use_backend("cpu"):
        y = m(x)
    with torch.no_grad(), batchnorm.use_backend("reference"):
        torch.testing.assert_close(y, m(x), equal_nan=True)
    assert torch.equal(torch.isfinite(y), torch.isfinite(t(x)))
    assert torch.isinf(y[1:, 0]).all() and torch.isnan(y[0, 0]).all() and torch.isfinite(y[:, 1]).all()

    rm, rv = m.running_mean.clone(), m.running_var.clone()
    dy, w = torch.randn(shape), torch.rand(c) + 0.5
    _same_ieee(cpu.forward_apply(x, rm, rv, 0.0, w, None), ref.forward_apply(x, rm, rv, 0.0, w, None))
    for got, want in zip(cpu.backward_apply(dy, x, rm, rv, 0.0, w), ref.backward_apply(dy, x, rm, rv, 0.0, w)):
        _same_ieee(got, want)
    # training: a constant channel has variance 0, so its output is 0 * inf = NaN (in torch too)
    xc = x.clone()
    xc[:, 2] = 1.5
    y, mean, var, count = cpu.forward_train(xc, 0.0, None, None, None, 0)
    assert var[0, 2] == 0 and torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    got = cpu.backward_train(dy, xc, mean, var, 0.0, w, None, count, 0)
    want = ref.backward_train(dy, xc, mean, var, 0.0, w, None, count, 0)
    for a, e in zip(got, want):
        _same_ieee(a, e)
