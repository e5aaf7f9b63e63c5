"""Building and loading the native training call (batchnorm.kernels.native): once per machine, in
the background, with the Python guard meanwhile, and a clear answer where it cannot be built.

Each test runs fresh processes on an empty extensions directory (``TORCH_EXTENSIONS_DIR``), so the
first one compiles the real source once (20-40 s on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from batchnorm.kernels import native

# Trains a small layer until the native call is loaded or cannot be had; prints whether it was
# there at the first call, its final state and the batch count (every batch is accepted).
WORKER = """
import time, torch
import batchnorm as bn
from batchnorm.kernels.native import NATIVE
layer = bn.BatchNorm1d(16)
x = torch.randn(32, 16)
calls, first = 0, None
deadline = time.monotonic() + 600
while NATIVE.state in ("idle", "building") and time.monotonic() < deadline:
    layer(x)
    calls += 1
    first = NATIVE.train is not None if first is None else first
    time.sleep(0.02)
layer(x)
print(first, NATIVE.state, int(layer.num_batches_tracked) == calls + 1)
"""


@pytest.fixture
def env(tmp_path):
    e = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    for var in ("BATCHNORM_COMPILE", "BATCHNORM_QUIET", "BATCHNORM_NATIVE", "CXX"):
        e.pop(var, None)
    return e


def _directory(env):
    return os.path.join(env["TORCH_EXTENSIONS_DIR"], native.build_name())


def _run(env):
    return subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_two_processes_build_once_past_what_a_killed_build_left(env):
    """Two processes start training at once on an extensions directory that holds what a killed
    build left (torch's lock file, a half-written library): neither waits at its first call (the
    Python guard runs), one build runs (one pair of messages), the stale lock does not block it,
    the broken library is not loaded, and both load the call."""
    directory = _directory(env)
    os.makedirs(directory)
    open(os.path.join(directory, "lock"), "w").close()  # torch's FileBaton of a build that was killed
    with open(os.path.join(directory, native.build_name() + ".so"), "wb") as f:
        f.write(b"\x7fELF half-written")
    procs = [_run(env) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert [o[0].split() for o in outs] == [["False", "ready", "True"]] * 2, outs
    messages = "".join(o[1] for o in outs)
    assert messages.count("batchnorm: building the native training call for small inputs in the background") == 1, \
        messages
    assert messages.count("batchnorm: built the native training call") == 1, messages
    assert os.path.getsize(os.path.join(directory, native.build_name() + ".so")) > 10_000
    assert os.path.exists(os.path.join(directory, "built"))
    assert not os.path.exists(os.path.join(directory, "lock"))


def test_a_failed_build_is_said_once_and_not_retried(env):
    """Without a working compiler the first process says the call is not available and trains on
    the Python guard; the failure is kept beside the build, so the next process neither retries
    nor repeats the message."""
    env["CXX"] = "/bin/false"
    first = _run(env)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err
    assert out.split() == ["False", "failed", "True"], (out, err)
    assert err.count("batchnorm: the native training call is not available") == 1, err
    assert "small training calls use the Python guard" in err
    failed = os.path.join(_directory(env), "failed")
    assert os.path.exists(failed) and "building native_train.cpp failed" in open(failed).read()
    start = time.monotonic()
    second = _run(env)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert out.split() == ["False", "failed", "True"], (out, err)
    assert "native" not in err, err
    assert time.monotonic() - start < 120


def test_switched_off_and_bad_values(monkeypatch, tmp_path):
    """BATCHNORM_NATIVE=0 builds nothing and runs the Python guard; any value but 0 or 1 is named."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("BATCHNORM_NATIVE", "0")
    off = native.Native()
    assert off.request() is None and off.state == "off" and off.reason == "BATCHNORM_NATIVE=0"
    assert not (tmp_path / "ext").exists()
    monkeypatch.setenv("BATCHNORM_NATIVE", "yes")
    with pytest.raises(ValueError, match="BATCHNORM_NATIVE must be 0 or 1, got 'yes'"):
        native.Native().request()
