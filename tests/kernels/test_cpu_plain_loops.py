"""``BATCHNORM_CPU_SIMD=0``: the CPU kernels built from plain loops instead of the 32-byte vector
type (:mod:`batchnorm.kernels.cpu.plain`) compute what the reference computes.

Run in a subprocess, as the mode is read when the package is imported; it compiles the float64
training forward and backward (the two entries that, over the shapes below, run every loop: the
planes kernels fused and split across the batch, the rows kernels on ``(N, C)`` and on short
planes, the identity and ReLU copies and the general loop with each activation)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import sys
import torch
from batchnorm.kernels import cpu
from batchnorm.kernels import reference as ref
from batchnorm.kernels import reference_act as ra

assert cpu.SIMD == (sys.argv[1] == "1"), cpu.SIMD
torch.manual_seed(0)
torch.set_num_threads(2)
cpu.MIN_NUMEL = 0
cpu.PARALLEL_MIN = 0  # two threads on these small shapes: (4, 3, 9, 11) takes the split planes path
worst = 0.0


def close(got, want, what):
    global worst
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()
    worst = max(worst, err)
    assert err < 1e-10, (what, err)


for shape in [(64, 257), (50, 3), (6, 3, 2, 2), (4, 3, 9, 11), (2, 257, 5, 7)]:
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    dy = torch.randn_like(x)
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64) + 0.5
    b = torch.randn(c, dtype=torch.float64)
    y, mean, var, count = cpu.forward_train(x, 1e-5, w, b, None, 0)
    y0, mean0, var0, count0 = ref.forward_train(x, 1e-5, w, b, None, 0)
    for got, want in zip((y, mean, var), (y0, mean0, var0)):
        close(got, want, ("forward_train", shape))
    got = cpu.backward_train(dy, x, mean0, var0, 1e-5, w, None, count0, 0, True)
    want = ref.backward_train(dy, x, mean0, var0, 1e-5, w, None, count0, 0, True)
    for g, e in zip(got, want):
        close(g, e, ("backward_train", shape))
    r = torch.randn_like(x)
    for act in ("relu", "leaky_relu", "silu", "gelu"):
        for res in (None, r):
            y, mean, var, count = cpu.forward_train_act(x, res, 1e-5, w, b, None, 0, act, 0.1)
            want = ra.forward_train_act(x, res, 1e-5, w, b, None, 0, act, 0.1)
            for g, e in zip((y, mean, var), want):
                close(g, e, ("forward_train_act", shape, act, res is None))
            got = cpu.backward_train_act(dy, x, res, want[1], want[2], 1e-5, w, b, None, want[3], 0, act, 0.1, True,
                                         res is not None)
            exp = ra.backward_train_act(dy, x, res, want[1], want[2], 1e-5, w, b, None, want[3], 0, act, 0.1, True,
                                        res is not None)
            for g, e in zip(got, exp):
                if e is not None:
                    close(g, e, ("backward_train_act", shape, act, res is None))
print("worst relative error", worst)
"""


def _die_with_parent() -> None:  # in the child: the kernel ends it if the test process dies first
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def start_check(simd: str) -> subprocess.Popen:
    """Start the check in a subprocess (it compiles for ~3 minutes on 2 cores: ``tests/conftest.py``
    starts it when the test is collected, so that the compile runs beside the other tests)."""
    env = dict(os.environ, BATCHNORM_CPU_SIMD=simd, BATCHNORM_COMPILE="wait", BATCHNORM_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-c", CHECK, simd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)


#: Checks started early by tests/conftest.py, by mode; the test takes its own (or starts it).
STARTED: dict[str, subprocess.Popen] = {}


def test_plain_loops_match_the_reference():
    proc = STARTED.pop("0", None) or start_check("0")
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-4000:]
    assert "worst relative error" in out
