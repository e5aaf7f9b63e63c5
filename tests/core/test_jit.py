"""Getting the cpu backend's compiled kernels without making a call wait (batchnorm.kernels._jit).

A tiny numba function stands in for the kernels where the mechanism itself is tested (it
compiles in about a second); the real kernels are used where their signatures and the switch
between backends in the middle of a training step are tested."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import batchnorm as bn

PROBE = '''
from pathlib import Path
import numba
from batchnorm.kernels import _jit

@numba.njit(cache=True)
def _f(a):
    return a + 1

@numba.njit(cache=True)
def _g(a):
    return a * 2

def _sig(entry, dtype):
    import os, time
    time.sleep(float(os.environ.get("BN_PROBE_SLOW", "0")))  # a compile that outlives its asker
    return (getattr(numba, dtype),)

KERNELS = _jit.Kernels(__name__, {"_f": _f, "_g": _g}, _sig, [Path(__file__)])
'''

WORKER = '''
import sys
import bn_jit_probe as p
first = p.KERNELS.ready("_f", "float64")
p.KERNELS.ready("_f", "float64", wait=True)
p.KERNELS.ready("_g", "float64", wait=True)
hits = sum(p._f._cache_hits.values()) + sum(p._g._cache_hits.values())
misses = sum(p._f._cache_misses.values()) + sum(p._g._cache_misses.values())
print(first, hits, misses)
'''


@pytest.fixture
def probe(tmp_path):
    """A module with two cached numba functions and their Kernels, and an environment whose
    numba cache is empty."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bn_jit_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    for var in ("BATCHNORM_COMPILE", "BATCHNORM_QUIET", "BATCHNORM_BACKEND"):
        env.pop(var, None)
    return env


def _run(code, env, **kw):
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_workers_compile_once_and_load_from_the_cache(probe, tmp_path):
    """Three processes wanting the same kernels at once: none is ready at its first question,
    each gets them, one compiler process compiles (one message), every process loads them from
    numba's cache (a hit, no compile of its own)."""
    procs = [_run(WORKER, probe) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1] for o in outs]
    assert [o[0].split() for o in outs] == [["False", "2", "0"]] * 3
    messages = "".join(o[1] for o in outs)
    assert messages.count("batchnorm: compiling the bn_jit_probe backend's kernels for float64") == 1, messages
    assert messages.count("batchnorm: compiled") == 1, messages
    markers = sorted(p.name for p in (tmp_path / "cache").rglob("*.ready"))
    assert len(markers) == 2 and markers[0].endswith("-_f.ready") and markers[1].endswith("-_g.ready")


def test_the_compiler_process_is_reaped_once_the_kernels_are_loaded(probe):
    """The process that started the compiler waits for it once every kernel is loaded: a compiler
    never waited for stays a zombie process next to a training run until that run exits."""
    code = WORKER + """
import time
proc = p.KERNELS._procs["float64"]
for _ in range(600):
    if proc.returncode is not None:
        break
    time.sleep(0.05)
print(proc.returncode)
"""
    proc = _run(code, probe)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.split()[-1] == "0", out


def test_quiet_and_wait_modes(probe):
    """BATCHNORM_QUIET silences the messages; BATCHNORM_COMPILE=wait answers the first question
    only once compiled, in the calling process (a cache miss there, no compiler process)."""
    first = 'p.KERNELS.ready("_f", "float64")\n'
    code = WORKER.replace(first, first + "assert not p.KERNELS._procs\n")
    p = _run(code, {**probe, "BATCHNORM_COMPILE": "wait", "BATCHNORM_QUIET": "1"})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.split() == ["True", "0", "2"]
    assert "batchnorm:" not in err


def test_an_unknown_compile_mode_is_named(monkeypatch):
    from batchnorm.kernels import _jit

    monkeypatch.setenv("BATCHNORM_COMPILE", "later")
    with pytest.raises(ValueError, match="BATCHNORM_COMPILE must be one of background, wait, got 'later'"):
        _jit.mode()


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_the_compiler_finishes_after_its_parent_exits(probe, tmp_path):
    """A process that exits right after asking leaves a compiler that still fills the cache, and
    its caller's pipe is not held open: the next process loads the kernels without compiling."""
    asker = 'import bn_jit_probe as p, time\nprint(p.KERNELS.ready("_f", "float64"))\n'
    asker += 'for _ in range(400):\n    if "float64" in p.KERNELS._procs: break\n    time.sleep(0.05)\n'
    asker += 'print(p.KERNELS._procs["float64"].pid)\n'
    p = _run(asker, {**probe, "BN_PROBE_SLOW": "3"})
    out, err = p.communicate(timeout=120)  # returns although the compiler still runs
    assert p.returncode == 0, err
    first, pid = out.split()
    assert first == "False"
    assert _alive(int(pid)), "the compiler finished before its parent exited: the test shows nothing"
    deadline = time.monotonic() + 240
    while _alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(int(pid)), "the compiler did not finish"
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (tmp_path / "cache").rglob("*.ready")) == ["_f.ready", "_g.ready"]
    q = _run(WORKER, probe)
    out, err = q.communicate(timeout=120)
    assert q.returncode == 0, err
    assert out.split() == ["False", "2", "0"]
    assert "batchnorm: compiling" not in err


def _stat(pid: int) -> dict[str, int]:
    """Process group, session and niceness of ``pid`` (proc(5): fields 5, 6 and 19 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"pgrp": int(fields[2]), "session": int(fields[3]), "nice": int(fields[16])}


def test_the_compiler_yields_to_the_processes_waiting_for_it(probe):
    """The compiler runs at the lowest priority in its caller's session, in a process group of its
    own. Under autogroup scheduling (Linux's default for desktop and many server kernels) every
    session is one scheduling group with an equal share of the machine: a compiler started in a
    session of its own took a whole core from the two demo workers computing on the reference
    backend meanwhile, whatever its niceness (`batchnorm demo` from an empty cache on 2 cores:
    208 s, against 59 s with the compiler in the workers' session). Its own process group keeps
    the terminal's Ctrl-C, sent to the foreground group, from interrupting it."""
    asker = 'import bn_jit_probe as p, time, os\nprint(p.KERNELS.ready("_f", "float64"))\n'
    asker += 'for _ in range(400):\n    if "float64" in p.KERNELS._procs: break\n    time.sleep(0.05)\n'
    asker += 'print(p.KERNELS._procs["float64"].pid, os.getsid(0), flush=True)\n'
    asker += 'p.KERNELS.ready("_g", "float64", wait=True)\n'
    p = _run(asker, {**probe, "BN_PROBE_SLOW": "3"})
    try:
        assert p.stdout.readline().strip() == "False"
        pid, session = map(int, p.stdout.readline().split())
        seen = _stat(pid)  # the compiler sleeps 3 s in its signature function: alive a while
        deadline = time.monotonic() + 60
        while seen != {**seen, "pgrp": pid, "nice": 19} and time.monotonic() < deadline:  # its first step
            time.sleep(0.05)
            seen = _stat(pid)
    finally:
        out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert seen == {"pgrp": pid, "session": session, "nice": 19}, seen
    assert session == os.getsid(0)


@pytest.mark.skipif("cpu" not in bn.available_backends(), reason="numba is not installed")
def test_first_call_computes_on_reference_while_the_kernels_compile(tmp_path):
    """With an empty numba cache the first training forward+backward runs on the reference
    backend (equal to torch's) while a compiler process starts."""
    code = textwrap.dedent('''
        import time, torch
        import batchnorm as bn
        from batchnorm import kernels
        from batchnorm.kernels import cpu
        torch.manual_seed(0)
        ours, theirs = bn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
        x = torch.randn(8, 16, 8, 8)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours(xa).square().sum().backward()
        theirs(xb).square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        print(kernels.select("forward_train", x).name, kernels.select("backward_train", x).name)
        for _ in range(200):
            if "float32" in cpu.KERNELS._procs:
                break
            time.sleep(0.05)
        print(cpu.KERNELS._procs["float32"].pid)
    ''')
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "BATCHNORM_QUIET": "1"}
    for var in ("BATCHNORM_COMPILE", "BATCHNORM_BACKEND"):
        env.pop(var, None)
    p = _run(code, env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    names, pid = out.split("\n")[:2]
    assert names == "reference reference"
    assert _alive(int(pid))
    os.kill(int(pid), 9)  # the test's cache is thrown away: no need to finish


@pytest.fixture
def cpu_kernels():
    if "cpu" not in bn.available_backends():
        pytest.fail("the cpu backend is not available (numba missing?)")
    from batchnorm.kernels import cpu

    for dtype in ("float32", "float64"):
        for entry in cpu.KERNELS.entries:
            cpu.KERNELS.ready(entry, dtype, wait=True)
    return cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loaded_signatures_are_the_ones_the_calls_use(cpu_kernels, dtype):
    """After the kernels are made ready, no call of the cpu backend compiles anything more: the
    sample arguments give exactly the types the wrappers pass (else the first real call would
    compile in the caller, minutes)."""
    cpu = cpu_kernels
    counts = {name: len(d.overloads) for name, d in cpu.KERNELS.entries.items()}
    for shape, fmt in (((64, 8), torch.contiguous_format), ((4, 8, 5, 5), torch.contiguous_format),
                       ((4, 8, 5, 5), torch.channels_last), ((2, 8, 20, 20), torch.contiguous_format)):
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
        w, b = torch.rand(8, dtype=dtype) + 0.5, torch.randn(8, dtype=dtype)
        r = torch.randn_like(x)
        from batchnorm.kernels.reference import Running

        running = Running(torch.zeros(8, dtype=dtype), torch.ones(8, dtype=dtype), 0.1, skip_nonfinite=True)
        y, mean, var, count = cpu.forward_train(x, 1e-5, w, b, None, 0, running)
        cpu.forward_train_act(x, r, 1e-5, None, None, None, 0, "leaky_relu", 0.1)
        cpu.forward_apply(x, mean[0], var[0], 1e-5, w, b)
        cpu.forward_apply_act(x, r, mean[0], var[0], 1e-5, None, b, "relu", 0.0)
        cpu.backward_train(y, x, mean, var, 1e-5, w, None, count, 0, 1)
        cpu.backward_apply(y, x, mean[0], var[0], 1e-5, None, False)
        cpu.backward_train_act(y, x, r, mean, var, 1e-5, w, b, None, count, 0, "silu", 0.0, True, True)
    assert {name: len(d.overloads) for name, d in cpu.KERNELS.entries.items()} == counts


@pytest.mark.parametrize("forward, backward", [("reference", "cpu"), ("cpu", "reference")])
@pytest.mark.parametrize("layer", ["plain", "act"])
def test_forward_and_backward_on_different_backends(cpu_kernels, forward, backward, layer):
    """The dispatcher may switch to the cpu backend between a forward and its backward (the
    kernels became ready): the gradients still equal torch's."""
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU()) if layer == "act" else nn.BatchNorm2d(6)
    ours = bn.BatchNormAct2d(6, act="relu") if layer == "act" else bn.BatchNorm2d(6)
    tbn = theirs[0] if layer == "act" else theirs
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(tbn.state_dict())
    x = torch.randn(4, 6, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = theirs(xa)
    with bn.use_backend(forward):
        yb = ours(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    with bn.use_backend(backward):
        yb.backward(dy)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, tbn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, tbn.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, tbn.running_var)
