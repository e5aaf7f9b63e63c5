"""Every CPU backend against the float64 math, over the shapes and settings users run.

Each case draws ``x``, ``dy``, weight, bias and given statistics in the case's dtype, computes
the float64 truth from those values (:mod:`tests.core.naive` for the forwards, the reference
backend run in float64 for the backwards and the fused activations) and checks every pass of
both backends (``cpu`` and ``reference``): the training forward (output, mean, variance,
count), the inference forward, both backwards (input gradient and the sums ``sum(dy)``,
``sum(dy * xhat)``), and on a subset the fused activations (relu, leaky_relu, silu, gelu, with
and without a residual; all four passes).

Errors are relative, scaled to the dtype (``eps`` its machine epsilon): an elementwise output
may be off by ``TOL * eps * max(1, max |truth|)``, a statistic or a sum by ``TOL * eps`` times
the sum of its terms' magnitudes (the variance: relative to itself), so the bound does not
depend on the sample or on the tensor's size (see :func:`_check`).

The grid (cases are cheap below ~2^18 values, so the small planes get a full cross product):

* **small planes, full cross product**: planes 1x1 and every square 2x2 .. 8x8 (the rows/planes
  boundary at 16 values, the 4x4 .. 7x7 planes where the inference forward read freed memory)
  x the 13 channel counts (1, 3, 63, 64, 65, 127, 128, 255, 256, 257, 300, 512, 1024: vector
  widths, 64-column blocks, the 4096-column limit of the rows path, odd counts for the
  split-across-the-batch path) x both layouts x both dtypes x both thread settings. The batch
  cycles through 1 .. 64 with the case (each channel count and plane meets several batch
  sizes), capped so that a case has at most 2^18 values.
* **larger planes, a covering design**: non-square planes below and above 16 values and squares
  up to 64x64, each with every channel count (at most 2^21 values); layout, dtype, thread setting,
  batch, activation, residual and kernel variant (default, planes kernels forced for short
  planes, every output streamed) cycle with co-prime strides, so every value of each meets
  every plane and most channel counts.
* **thread settings**: ``1`` (one thread), ``2`` (two threads and every tensor on the parallel
  path: ``PARALLEL_MIN`` forced to 0, since below it the backend runs one thread) and, in the
  covering part and around ``PARALLEL_MIN`` itself, ``2-auto`` (two threads as users run them).
* **activations**: one per small-plane case (cycling relu, leaky_relu, silu, gelu and the
  residual) on one layout and thread setting, and one per covering case. ``x`` is nudged away
  from relu's kink (``|z| >= 1e-3``), where float32 and float64 may take different branches.

Run time on the 2-core EPYC (kernels compiled): ~60 s for the whole module.
"""

from __future__ import annotations

import contextlib
import math
import types
import zlib
from collections.abc import Iterator

import pytest
import torch

from batchnorm.kernels import reference as ref
from batchnorm.kernels import reference_act as ra

from ..core.naive import bn_eval, bn_train, channel_matrix

cpu = pytest.importorskip("batchnorm.kernels.cpu")

EPS = 1e-5
SLOPE = 0.1
CHANNELS = (1, 3, 63, 64, 65, 127, 128, 255, 256, 257, 300, 512, 1024)
SMALL_PLANES = ((1, 1),) + tuple((k, k) for k in range(2, 9))
LARGE_PLANES = ((2, 3), (3, 5), (2, 8), (5, 7), (3, 11), (9, 9), (11, 13), (14, 14), (16, 16), (23, 29),
                (28, 28), (32, 32), (56, 56), (64, 64))
BATCHES = (1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 64)
LAYOUTS = ("contiguous", "channels_last")
DTYPES = (torch.float32, torch.float64)
ACTS = ("relu", "leaky_relu", "silu", "gelu")
VARIANTS = ("default", "planes", "streamed")
SMALL_CAP = 1 << 18
LARGE_CAP = 1 << 21
# Bounds in units of the dtype's epsilon. Largest measured (both backends, the whole grid):
# outputs ~4 eps, statistics and sums ~2 eps of their terms' magnitudes.
TOL = 32
WORST: dict[tuple[str, str], float] = {}

BACKENDS = {
    "cpu": cpu,
    "reference": types.SimpleNamespace(
        forward_train=ref.forward_train, forward_apply=ref.forward_apply, backward_train=ref.backward_train,
        backward_apply=ref.backward_apply, forward_train_act=ra.forward_train_act,
        forward_apply_act=ra.forward_apply_act, backward_train_act=ra.backward_train_act,
        backward_apply_act=ra.backward_apply_act),
}


@contextlib.contextmanager
def threads(setting: str, variant: str = "default") -> Iterator[None]:
    """Torch's (and so the cpu backend's) thread count, and the cpu backend's test switches:
    ``"2"`` puts every tensor on the parallel path; ``variant`` as :func:`conftest.configure_cpu`."""
    saved = {k: getattr(cpu, k) for k in ("PARALLEL_MIN", "ROWS_MAX_PLANE", "STREAM_MIN_BYTES",
                                          "STREAM_MIN_BYTES_BACKWARD", "STREAM_MIN_PLANE_BYTES")}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if setting == "1" else 2)
        if setting == "2":
            cpu.PARALLEL_MIN = 0
        if variant == "planes":
            cpu.ROWS_MAX_PLANE = 0
        if variant == "streamed":
            cpu.STREAM_MIN_BYTES = cpu.STREAM_MIN_BYTES_BACKWARD = cpu.STREAM_MIN_PLANE_BYTES = 0
        yield
    finally:
        torch.set_num_threads(before)
        for k, v in saved.items():
            setattr(cpu, k, v)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


class Truth:
    """One case's inputs (in ``dtype``, contiguous) and their float64 results."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, act: str | None = None,
                 residual: bool = False) -> None:
        g = _gen(shape, dtype, act, residual)
        c = shape[1]
        self.shape, self.dtype, self.act, self.has_r = shape, dtype, act, residual
        self.x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
        sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0).double()
        self.w = ((torch.rand(c, generator=g, dtype=torch.float64) + 0.5) * sign).to(dtype)
        self.b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype)
        self.r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
        xm = channel_matrix(self.x)
        self.rm = (xm.mean(1) + 0.1 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
        self.rv = (xm.var(1, unbiased=False) * (0.5 + torch.rand(c, generator=g, dtype=torch.float64)) + 0.1).to(dtype)
        if act in ("relu", "leaky_relu"):
            self._off_the_kink()
        x64 = self.x.double()
        self.dy = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.3).to(dtype)
        dy64, w64, b64 = self.dy.double(), self.w.double(), self.b.double()
        r64 = None if self.r is None else self.r.double()
        y, mean, var, _ = bn_train(x64, w64, b64, EPS)
        self.mean, self.var = mean, var
        self.count = float(x64.numel() // c)
        if act is None:
            self.y = y
            self.ya = bn_eval(x64, self.rm, self.rv, w64, b64, EPS)
            self.dtrain = ref.backward_train(dy64, x64, mean[None], var[None], EPS, w64, None,
                                             torch.tensor([self.count], dtype=torch.float64), 0)
            self.dapply = ref.backward_apply(dy64, x64, self.rm.double(), self.rv.double(), EPS, w64)
        else:
            self.y = ra.forward_train_act(x64, w64, b64, r64, None, EPS, 0, act, SLOPE)[0]
            self.ya = ra.forward_apply_act(x64, self.rm.double(), self.rv.double(), EPS, w64, b64, r64, act, SLOPE)
            cnt = torch.tensor([self.count], dtype=torch.float64)
            self.dtrain = ra.backward_train_act(dy64, x64, r64, mean[None], var[None], EPS, w64, b64, None, cnt, 0,
                                                act, SLOPE, True, residual)
            self.dapply = ra.backward_apply_act(dy64, x64, r64, self.rm.double(), self.rv.double(), EPS, w64, b64,
                                                act, SLOPE, True, residual)
        self.scale_train = self._scales(mean, var, True)
        self.scale_apply = self._scales(self.rm.double(), self.rv.double(), False)
        self.scale_mean = channel_matrix(x64).abs().mean(1).clamp_min(1.0)

    def _z(self, x64: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x64.dim() - 2)
        z = (x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) * self.w.double().view(shape)
        z = z + self.b.double().view(shape)
        return z if self.r is None else z + self.r.double()

    def _off_the_kink(self) -> None:
        """Move the values whose pre-activation (training or given statistics) lies within 1e-3
        of relu's kink to ~5e-3 past it (float32 and float64 could take different branches)."""
        shape = (1, -1) + (1,) * (self.x.dim() - 2)
        for _ in range(8):
            x64 = self.x.double()
            _, mean, var, _ = bn_train(x64, eps=EPS)
            near = torch.zeros(self.x.shape, dtype=torch.bool)
            step = torch.zeros(self.x.shape, dtype=torch.float64)
            for m, v in ((mean, var), (self.rm.double(), self.rv.double())):
                close = self._z(x64, m, v).abs() < 1e-3
                near |= close
                step = torch.where(close, 5e-3 * torch.sqrt(v.view(shape) + EPS) / self.w.double().view(shape), step)
            if not near.any():
                return
            self.x = (x64 + step).to(self.dtype)

    def _scales(self, mean: torch.Tensor, var: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
        """The magnitudes of the terms each result adds up (float64, at least 1): a result's
        rounding error is relative to them, not to the result, which may cancel (the input
        gradient of a channel of one value is 0). ``y``: ``|w| inv (|x| + |mean|) + |b| [+ |r|]``;
        the gradient at the pre-activation ``g``: ``|dy|``, times ``1 + |z|`` with an activation
        (``act'`` computed from a rounded ``z``); the sums: ``sum |g|``, ``sum |g xhat|`` per
        channel; ``dx``: ``|w| inv |g|`` plus, training, the per-channel corrections."""
        x64 = self.x.double()
        shape = (1, -1) + (1,) * (x64.dim() - 2)
        inv = (var.view(shape) + EPS).rsqrt()
        wi = self.w.double().abs().view(shape) * inv
        tz = wi * (x64.abs() + mean.abs().view(shape)) + self.b.double().abs().view(shape)
        if self.r is not None:
            tz = tz + self.r.double().abs()
        xhat = ((x64 - mean.view(shape)) * inv).abs()
        gm = self.dy.double().abs() * (1 if self.act is None else 1 + tz)
        sg, sgx = channel_matrix(gm).sum(1), channel_matrix(gm * xhat).sum(1)
        dx = wi * gm
        if train:
            dx = dx + wi * (sg.view(shape) + xhat * sgx.view(shape)) / self.count
        out = {"y": tz.max(), "dx": dx.max(), "dr": gm.max(), "sum(g)": sg, "sum(g*xhat)": sgx}
        return {k: v.clamp_min(1.0) for k, v in out.items()}


def _err(got: torch.Tensor | None, want: torch.Tensor, scale: torch.Tensor | float) -> float:
    """Largest ``|got - want| / scale`` (NaN or a missing output: inf)."""
    if got is None:
        return math.inf
    d = (got.double().reshape(want.shape) - want).abs() / scale
    return math.inf if bool(torch.isnan(d).any()) else float(d.max()) if d.numel() else 0.0


def _check(backend: str, t: Truth, layout: str, setting: str, variant: str) -> list[str]:
    """Run every pass of one backend on one case; the failures as lines."""
    be = BACKENDS[backend]
    x = _layout(t.x, layout)
    dy = _layout(t.dy, layout)
    r = None if t.r is None else _layout(t.r, layout)
    mean64, var64 = t.mean[None], t.var[None]
    cnt = torch.tensor([t.count], dtype=torch.float64)
    with threads(setting, variant):
        if t.act is None:
            y, mean, var, count = be.forward_train(x, t.w, t.b, None, EPS, 0)
            ya = be.forward_apply(x, t.rm, t.rv, EPS, t.w, t.b)
            dtrain = be.backward_train(dy, x, mean64, var64, EPS, t.w, None, cnt, 0, True)
            dapply = be.backward_apply(dy, x, t.rm, t.rv, EPS, t.w, True)
        else:
            y, mean, var, count = be.forward_train_act(x, t.w, t.b, r, None, EPS, 0, t.act, SLOPE)
            ya = be.forward_apply_act(x, t.rm, t.rv, EPS, t.w, t.b, r, t.act, SLOPE)
            dtrain = be.backward_train_act(dy, x, r, mean64, var64, EPS, t.w, t.b, None, cnt, 0, t.act, SLOPE,
                                           True, t.has_r)
            dapply = be.backward_apply_act(dy, x, r, t.rm, t.rv, EPS, t.w, t.b, t.act, SLOPE, True, t.has_r)
    st, sa = t.scale_train, t.scale_apply
    errors = {
        "y train": _err(y, t.y, st["y"]), "mean": _err(mean, t.mean, t.scale_mean),
        "var": _err(var, t.var, t.var.clamp_min(1e-300)),
        "count": 0.0 if float(count.reshape(-1)[0]) == t.count else math.inf,
        "y eval": _err(ya, t.ya, sa["y"]),
        "dx train": _err(dtrain[0], t.dtrain[0], st["dx"]), "dx apply": _err(dapply[0], t.dapply[0], sa["dx"]),
    }
    for key, got, want, sc in (("train", dtrain, t.dtrain, st), ("apply", dapply, t.dapply, sa)):
        errors[key + " sum(g*xhat)"] = _err(got[1], want[1].reshape(-1), sc["sum(g*xhat)"])
        errors[key + " sum(g)"] = _err(got[2], want[2].reshape(-1), sc["sum(g)"])
        if t.has_r:
            errors[key + " dr"] = _err(got[3], want[3], sc["dr"])
    if layout == "channels_last" and x.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1:
        outs = [y, ya, dtrain[0], dapply[0]]
        errors["channels_last kept"] = 0.0 if all(o.is_contiguous(memory_format=torch.channels_last)
                                                  for o in outs) else math.inf
    eps_dt = torch.finfo(t.dtype).eps
    for k, v in errors.items():  # the largest errors seen, in units of eps, for tuning TOL
        WORST[(backend, k)] = max(WORST.get((backend, k), 0.0), v / eps_dt)
    bad = {k: v / eps_dt for k, v in errors.items() if not v <= TOL * eps_dt}
    if not bad:
        return []
    case = (f"{backend} {tuple(t.shape)} {str(t.dtype)[6:]} {layout} threads={setting} {variant}"
            f" act={t.act} residual={t.has_r}")
    return [f"{case}: " + ", ".join(f"{k} {v:.3g} eps" for k, v in bad.items())]


def _report(failures: list[str]) -> None:
    assert not failures, f"{len(failures)} failing case(s):\n" + "\n".join(failures[:40])


def _batch(k: int, per_sample: int, cap: int) -> int:
    return max(1, min(BATCHES[k % len(BATCHES)], cap // per_sample))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("plane", SMALL_PLANES, ids=[f"{h}x{w}" for h, w in SMALL_PLANES])
def test_sweep_small_planes(plane, dtype):
    """The full cross product on planes of at most 8x8 (see the module docstring)."""
    failures: list[str] = []
    pi = SMALL_PLANES.index(plane)
    for ci, c in enumerate(CHANNELS):
        n = _batch(pi + 5 * ci, c * plane[0] * plane[1], SMALL_CAP)
        t = Truth((n, c, *plane), dtype)
        for backend in BACKENDS:
            for layout in LAYOUTS:
                for setting in ("1", "2"):
                    failures += _check(backend, t, layout, setting, "default")
        act = ACTS[(pi + ci) % len(ACTS)]
        ta = Truth((n, c, *plane), dtype, act, residual=bool((pi + ci // 4) % 2))
        for backend in BACKENDS:
            failures += _check(backend, ta, LAYOUTS[ci % 2], ("1", "2")[(ci // 2) % 2], "default")
    _report(failures)


@pytest.mark.parametrize("plane", LARGE_PLANES, ids=[f"{h}x{w}" for h, w in LARGE_PLANES])
def test_sweep_larger_planes(plane):
    """The covering design on larger planes (see the module docstring)."""
    failures: list[str] = []
    pi = LARGE_PLANES.index(plane)
    for ci, c in enumerate(CHANNELS):
        per_sample = c * plane[0] * plane[1]
        if per_sample > LARGE_CAP:
            continue
        k = pi * len(CHANNELS) + ci
        n = _batch(pi + 7 * ci, per_sample, LARGE_CAP)
        dtype = DTYPES[k % 2]
        layout = LAYOUTS[(k // 2) % 2]
        setting = ("1", "2", "2-auto")[k % 3]
        variant = VARIANTS[(k // 3) % 3]
        act = (None, *ACTS)[k % 5]
        t = Truth((n, c, *plane), dtype, act, residual=act is not None and k % 7 < 3)
        for backend in BACKENDS:
            failures += _check(backend, t, layout, setting, variant)
    _report(failures)


# Around PARALLEL_MIN (2^16 values) with two threads as users run them: below it one thread,
# from it on both; the resnet layer-3 planes (4x4 .. 7x7 with 256 channels) among them.
AUTO_SHAPES = [(4, 256, 4, 4), (2, 256, 4, 4), (4, 256, 5, 5), (4, 256, 7, 7), (4, 300, 4, 4), (4, 128, 8, 8),
               (1, 64, 32, 32), (1, 63, 32, 32), (17, 3, 31, 41), (16, 3, 31, 41), (64, 1024, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_sweep_around_parallel_min(dtype):
    failures: list[str] = []
    for i, shape in enumerate(AUTO_SHAPES):
        t = Truth(shape, dtype)
        ta = Truth(shape, dtype, ACTS[i % 4], residual=bool(i % 2))
        for backend in BACKENDS:
            for layout in LAYOUTS:
                failures += _check(backend, t, layout, "2-auto", "default")
                failures += _check(backend, ta, layout, "2-auto", "default")
    _report(failures)
