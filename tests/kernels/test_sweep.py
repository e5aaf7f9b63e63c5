"""Every CPU backend against the float64 math, over the shapes and settings users run.

Each case draws ``x``, ``dy``, weight, bias, a residual and given statistics in the case's dtype
and computes the truth from those values: statistics and every reduction in extended precision
(numpy's long double, rounded once to float64: ``torch.var``/``torch.sum`` in float64 were up to
57 eps off, more than either backend), the rest elementwise in float64 (the normalization by
:func:`tests.core.naive.bn_eval`). It checks every pass of both backends (``cpu`` and
``reference``): the training forward (output, mean, variance, count), the inference forward,
both backwards (input gradient, ``sum(g)``, ``sum(g * xhat)``; the training one given the
batch statistics in the input dtype, as the forward returns them), and on a subset the fused
activations (relu, leaky_relu, silu, gelu, with and without a residual; all four passes, and
the residual's gradient); channels_last outputs must stay channels_last.

Errors are relative, in units of the dtype's epsilon: a result may be off by ``TOL`` eps of the
magnitude of the terms it adds up (at least 1; see :meth:`Truth._passes`), the variance by
``TOL`` eps of itself. Largest measured over the grid: variance 4.3 eps, everything else at most
2 eps (both backends). A term-magnitude scale, not the result's own, keeps the bound meaningful
where a result cancels (the input gradient of a channel of one or two values) without
depending on the sample or the tensor's size.

The grid (a case below ~2^17 values costs milliseconds, so the small planes get a full cross
product; larger ones a covering design):

* **small planes, full cross product**: planes 1x1 and every square 2x2 .. 8x8 (the rows/planes
  boundary at 16 values, the 4x4 .. 7x7 planes where the inference forward read freed memory)
  x the 13 channel counts (1, 3, 63, 64, 65, 127, 128, 255, 256, 257, 300, 512, 1024: vector
  widths, 64-column blocks, the 4096-column limit of the rows path, odd counts for the
  split-across-the-batch path) x both layouts x both dtypes x both thread settings ``1`` and
  ``2`` (the ``cpu`` backend; the ``reference`` one on one layout and thread setting per case,
  cycling). The batch (1 .. 64) cycles with the case, capped at 2^17 values, so each channel
  count and plane meets several batch sizes. Per (plane, channels, dtype) one fused-activation
  case too (activation and residual cycling).
* **larger planes, a covering design**: non-square planes below and above 16 values and squares
  up to 64x64, each with every channel count up to 2^19 values a case; dtype, layout, thread
  setting, kernel variant (default, planes kernels forced for short planes, every output
  streamed), activation, residual and batch cycle with the case index at strides 2, 4, 3, 9, 5,
  7 and 12: every pair of dtype, layout, thread setting and variant occurs, and every value of
  each meets every plane.
* **thread settings**: ``1`` (one thread), ``2`` (two threads and every tensor on the parallel
  path: ``PARALLEL_MIN`` forced to 0, since below it the backend runs one thread) and, in the
  covering part and on shapes around ``PARALLEL_MIN``, ``2-auto`` (two threads as users run them).
* ``x`` is nudged away from relu's kink (``|z| >= 1e-3``), where float32 and float64 may take
  different branches.

Run time on the 2-core EPYC, kernels compiled: 25 s for the module on an otherwise quiet machine
(load average 1.5); 90-215 s while other processes kept both cores busy (load 3-5), where every
two-thread parallel region may wait for a time slice.
"""

from __future__ import annotations

import contextlib
import math
import types
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from batchnorm.kernels import reference as ref
from batchnorm.kernels import reference_act as ra

from ..core.naive import bn_eval, channel_matrix

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
SMALL_CAP = 1 << 17
LARGE_CAP = 1 << 19
TOL = 16  # in units of the dtype's epsilon (largest measured: 4.3, see above)
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


def _extended(t: torch.Tensor) -> np.ndarray:
    """``t`` (N, C, *S) as a (C, values) matrix in extended precision (numpy's long double)."""
    return channel_matrix(t).numpy().astype(np.longdouble)


def _stats(x64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance, two passes in extended precision (pairwise sums),
    rounded once to float64: the truth of a float64 input needs them exact to the last bits
    (``torch.var`` in float64 was 57 eps off, more than either backend)."""
    xm = _extended(x64)
    mean = xm.sum(1) / xm.shape[1]
    var = np.square(xm - mean[:, None]).sum(1) / xm.shape[1]
    return torch.from_numpy(mean.astype(np.float64)), torch.from_numpy(var.astype(np.float64))


def _sum(t: torch.Tensor) -> torch.Tensor:
    """Per-channel sums in extended precision, rounded to float64 (``torch.sum`` in float64 over
    the batch and plane dims was ~20 eps off on the larger cases)."""
    return torch.from_numpy(_extended(t).sum(1).astype(np.float64))


class Truth:
    """One case's inputs (in ``dtype``, contiguous) and their float64 results: the statistics
    and every reduction in extended precision, the rest elementwise in float64
    (:func:`tests.core.naive.bn_eval` for the normalization)."""

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
        mean, var = _stats(self.x.double())
        self.rm = (mean + 0.1 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype)
        self.rv = (var * (0.5 + torch.rand(c, generator=g, dtype=torch.float64)) + 0.1).to(dtype)
        self.dy = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.3).to(dtype)
        if act in ("relu", "leaky_relu"):
            self._off_the_kink()
        self.mean, self.var = _stats(self.x.double())
        self.count = float(self.x.numel() // c)
        y, _, tz = self._forward(self.mean, self.var)
        self.y_train, self.scale_y_train = y, tz.max().clamp_min(1.0)
        # the backward gets the statistics as the forward returns them, in the input dtype
        self.mean_in, self.var_in = self.mean.to(dtype), self.var.to(dtype)
        self.train = self._passes(self.mean_in.double(), self.var_in.double(), True)
        self.apply = self._passes(self.rm.double(), self.rv.double(), False)
        self.scale_mean = channel_matrix(self.x.abs()).mean(1).clamp_min(1.0)

    def _view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view((1, -1) + (1,) * (self.x.dim() - 2))

    def _z(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The pre-activation ``bn(x) [+ r]`` in float64."""
        z = bn_eval(self.x, mean, var, self.w, self.b, EPS)
        return z if self.r is None else z + self.r.double()

    def _forward(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, z, |z| terms)``: the output, the pre-activation and the magnitude of the terms that
        make it, ``|w| inv (|x| + |mean|) + |b| [+ |r|]``."""
        z = self._z(mean, var)
        y = z if self.act is None else ra.activation(z, self.act, SLOPE)
        tz = self._view(self.w.double() * (var + EPS).rsqrt()).abs() * (self.x.double().abs() + self._view(mean).abs())
        tz = tz + self._view(self.b.double()).abs()
        return y, z, tz if self.r is None else tz + self.r.double().abs()

    def _passes(self, mean: torch.Tensor, var: torch.Tensor, train: bool) -> dict[str, torch.Tensor]:
        """With the statistics ``mean``, ``var`` (the batch's: ``train``): the forward ``y``, the
        backward's ``dx``, ``sum(g*xhat)``, ``sum(g)`` and ``dr = g``, and under ``scale ...`` the
        magnitudes of the terms each adds up (at least 1): a result's rounding error is relative to
        them, not to the result, which may cancel (``dx`` of a channel of one value is 0).
        ``y``: see :meth:`_forward`; ``g``: ``|dy|``, times ``1 + |z|`` with an
        activation (``act'`` of a rounded ``z``); the sums: ``sum |g|``, ``sum |g xhat|``; ``dx``:
        ``|w| inv |g|`` plus, training, the per-channel corrections."""
        x64, dy64 = self.x.double(), self.dy.double()
        inv = self._view((var + EPS).rsqrt())
        wi = self._view(self.w.double()) * inv
        xhat = (x64 - self._view(mean)) * inv
        y, z, tz = self._forward(mean, var)
        g = dy64 if self.act is None else dy64 * ra.activation_grad(z, self.act, SLOPE)
        sg, sgx = _sum(g), _sum(g * xhat)
        dx = wi * (g - (self._view(sg) + xhat * self._view(sgx)) / self.count) if train else wi * g
        gm = dy64.abs() * (1 if self.act is None else 1 + tz)
        msg, msgx = channel_matrix(gm).sum(1), channel_matrix(gm * xhat.abs()).sum(1)
        mdx = wi.abs() * gm
        if train:
            mdx = mdx + wi.abs() * (self._view(msg) + xhat.abs() * self._view(msgx)) / self.count
        scales = {"y": tz.max(), "dx": mdx.max(), "dr": gm.max(), "sum(g)": msg, "sum(g*xhat)": msgx}
        return {"y": y, "dx": dx, "sum(g*xhat)": sgx, "sum(g)": sg, "dr": g,
                **{"scale " + k: v.clamp_min(1.0) for k, v in scales.items()}}

    def _off_the_kink(self) -> None:
        """Move the values whose pre-activation (training or given statistics) lies within 1e-3
        of relu's kink to ~5e-3 past it (float32 and float64 could take different branches)."""
        for _ in range(8):
            x64 = self.x.double()
            mean, var = _stats(x64)
            near = torch.zeros(self.x.shape, dtype=torch.bool)
            step = torch.zeros(self.x.shape, dtype=torch.float64)
            for m, v in ((mean, var), (self.rm.double(), self.rv.double())):
                close = self._z(m, v).abs() < 1e-3
                near |= close
                step = torch.where(close, 5e-3 * self._view((v + EPS).sqrt() / self.w.double()), step)
            if not near.any():
                return
            self.x = (x64 + step).to(self.dtype)


def _err(got: torch.Tensor | None, want: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest ``|got - want| / scale`` (NaN or a missing output: inf)."""
    if got is None:
        return math.inf
    d = float((got.contiguous().reshape(want.shape).double().sub_(want).abs_().div_(scale)).max())
    return math.inf if math.isnan(d) else d


def _check(backend: str, t: Truth, layout: str, setting: str, variant: str) -> list[str]:
    """Run every pass of one backend on one case; the failures as lines."""
    be = BACKENDS[backend]
    x = _layout(t.x, layout)
    dy = _layout(t.dy, layout)
    r = None if t.r is None else _layout(t.r, layout)
    mean_in, var_in = t.mean_in[None], t.var_in[None]
    cnt = torch.tensor([t.count], dtype=torch.float64)
    with threads(setting, variant):
        if t.act is None:
            y, mean, var, count = be.forward_train(x, EPS, t.w, t.b, None, 0)
            ya = be.forward_apply(x, t.rm, t.rv, EPS, t.w, t.b)
            dtrain = be.backward_train(dy, x, mean_in, var_in, EPS, t.w, None, cnt, 0, True)
            dapply = be.backward_apply(dy, x, t.rm, t.rv, EPS, t.w, True)
        else:
            y, mean, var, count = be.forward_train_act(x, r, EPS, t.w, t.b, None, 0, t.act, SLOPE)
            ya = be.forward_apply_act(x, r, t.rm, t.rv, EPS, t.w, t.b, t.act, SLOPE)
            dtrain = be.backward_train_act(dy, x, r, mean_in, var_in, EPS, t.w, t.b, None, cnt, 0, t.act, SLOPE,
                                           True, t.has_r)
            dapply = be.backward_apply_act(dy, x, r, t.rm, t.rv, EPS, t.w, t.b, t.act, SLOPE, True, t.has_r)
    st, sa = t.train, t.apply
    errors = {
        "y train": _err(y, t.y_train, t.scale_y_train), "mean": _err(mean, t.mean, t.scale_mean),
        "var": _err(var, t.var, t.var.clamp_min(1e-300)),
        "count": 0.0 if float(count.reshape(-1)[0]) == t.count else math.inf,
        "y eval": _err(ya, sa["y"], sa["scale y"]),
    }
    for key, got, want in (("train", dtrain, st), ("apply", dapply, sa)):
        errors["dx " + key] = _err(got[0], want["dx"], want["scale dx"])
        errors[key + " sum(g*xhat)"] = _err(got[1], want["sum(g*xhat)"], want["scale sum(g*xhat)"])
        errors[key + " sum(g)"] = _err(got[2], want["sum(g)"], want["scale sum(g)"])
        if t.has_r:
            errors[key + " dr"] = _err(got[3], want["dr"], want["scale dr"])
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
        for layout in LAYOUTS:
            for setting in ("1", "2"):
                failures += _check("cpu", t, layout, setting, "default")
        failures += _check("reference", t, LAYOUTS[ci % 2], ("1", "2")[(ci // 2) % 2], "default")
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
