"""Store and sweeps: atomic writes, reuse, and resume after a worker is killed mid-sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchnorm.lab.store import Store
from batchnorm.lab.sweep import run_sweep
from batchnorm.lab.train import RunConfig, config_hash


def test_store_roundtrip(tmp_path):
    s = Store(tmp_path / "x.sqlite")
    run = {"hash": "h1", "config": {"a": 1}, "result": {"acc": float("nan")}, "curves": {"step": [0]}, "init": {}}
    s.put(run)
    got = s.get("h1")
    assert got["config"] == {"a": 1} and got["result"]["acc"] is None and got["env"]["torch"]
    assert s.has("h1") and not s.has("h2") and s.count() == 1
    s.put_experiment("e", "compare", {"p": 1}, ["h1"])
    assert s.experiments()[0]["hashes"] == ["h1"]


def test_failed_transaction_leaves_nothing(tmp_path):
    s = Store(tmp_path / "x.sqlite")
    bad = {"hash": "h1", "config": {}, "result": {}, "curves": {}, "init": {}, "env": {"x": object()}}
    try:
        with s._tx():
            s._conn.execute("INSERT INTO runs VALUES ('h0','{}','{}','{}','{}','{}',0)")
            raise RuntimeError("crash mid-transaction")
    except RuntimeError:
        pass
    assert not s.has("h0")
    s.put(bad)  # non-JSON values are stringified, not fatal
    assert s.has("h1")


def test_sweep_reuses(tmp_path):
    s = Store(tmp_path / "lab.sqlite")
    cfgs = [RunConfig(model="mlp", steps=5, data_limit=200, seed=i) for i in range(2)]
    seen = []
    run_sweep(cfgs + cfgs[:1], s, on_done=lambda c, r, reused: seen.append(reused))
    assert s.count() == 2 and seen == [False, False]
    t = s.get(config_hash(cfgs[0]))["created"]
    seen.clear()
    run_sweep(cfgs, s, on_done=lambda c, r, reused: seen.append(reused))
    assert seen == [True, True] and s.get(config_hash(cfgs[0]))["created"] == t


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        f = task / "children"
        if f.exists():
            out += [int(x) for x in f.read_text().split()]
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_resume_after_killing_a_worker(tmp_path):
    """Kill one worker of a 2-worker sweep after the first run is stored; the rerun completes the sweep,
    and the runs stored before the kill are kept (not retrained)."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-c", "import sys; from batchnorm.cli import main; sys.exit(main(sys.argv[1:]))",
           "compare", "--model", "mlp", "--lrs", "0.01,0.03,0.1", "--seeds", "0,1", "--steps", "150",
           "--limit", "300", "--workers", "2", "--no-report", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    db = out / "lab.sqlite"
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        n = 0
        if db.exists():
            try:
                s = Store(db)
                n = s.count()
                s.close()
            except Exception:
                n = 0
        if n >= 1:
            workers = [c for c in _children(proc.pid) if "multiprocessing" in _cmdline(c)
                       and "resource_tracker" not in _cmdline(c)]
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    s = Store(db)
    before = {h: s.get(h)["created"] for h in s.hashes()}
    s.close()
    total = 12
    assert killed is not None, "the sweep finished before a worker could be killed"
    assert proc.returncode == 3, err.decode()[-2000:]
    assert "Run the same command again" in err.decode()
    assert 1 <= len(before) < total
    # rerun: completes exactly the missing runs
    rerun = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    s = Store(db)
    assert s.count() == total
    for h, t in before.items():
        assert s.get(h)["created"] == t


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = _children(p)
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (it waits for init to reap it)


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    """kill -9 of the main process of a 2-worker sweep: its workers and the multiprocessing resource tracker
    exit within seconds (they used to keep running, and writing runs, for good)."""
    cmd = [sys.executable, "-m", "batchnorm.cli", "compare", "--model", "mlp", "--lrs", "0.01,0.1", "--seeds", "0",
           "--steps", "100000", "--limit", "100", "--workers", "2", "--no-report", "--out", str(tmp_path / "o")]
    env = {**os.environ, "BATCHNORM_BACKEND": "reference"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    spawned: list[int] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            spawned = _descendants(proc.pid)
            workers = [c for c in spawned if "spawn_main" in _cmdline(c)]
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert len([c for c in spawned if "spawn_main" in _cmdline(c)]) >= 2, "the sweep did not start 2 workers"
        time.sleep(2.0)  # let them get going (either way, they must go when the parent goes)
        spawned = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 60  # covers a worker still importing torch on a loaded machine
        while time.time() < deadline and any(_alive(p) for p in spawned):
            time.sleep(0.2)
        survivors = {p: _cmdline(p)[:100] for p in spawned if _alive(p)}
        assert not survivors, f"still running after the parent was killed: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _descendants(proc.pid) + spawned:  # never leave a stray process behind, even on failure
            if _alive(p) and "multiprocessing" in _cmdline(p):
                os.kill(p, signal.SIGKILL)


_LEAF = """
import os, sys, time
import batchnorm.lab.sweep as S
sys.platform = "other"  # no prctl: the watchdog thread alone must do it
S.die_with_parent(int(sys.argv[1]), interval=0.1)
print("armed", flush=True)
time.sleep(120)
"""

_MIDDLE = """
import subprocess, sys, os, time
leaf = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())], stdout=subprocess.PIPE, text=True)
assert leaf.stdout.readline().strip() == "armed"
print(leaf.pid, flush=True)
time.sleep(120)
"""


def test_watchdog_alone_ends_an_orphaned_worker():
    """The portable half of ``die_with_parent`` (what systems without prctl get): the child of a killed
    process notices it was re-parented and exits."""
    middle = subprocess.Popen([sys.executable, "-c", _MIDDLE, _LEAF], stdout=subprocess.PIPE, text=True)
    leaf = None
    try:
        leaf = int(middle.stdout.readline())
        assert _alive(leaf)
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and _alive(leaf):
            time.sleep(0.1)
        assert not _alive(leaf), "the orphaned child is still running"
    finally:
        if middle.poll() is None:
            middle.kill()
        if leaf is not None and _alive(leaf):
            os.kill(leaf, signal.SIGKILL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_parallel_sweep_at_once(tmp_path, sig, code):
    """Ctrl-C (SIGINT) or ``kill`` (SIGTERM) stops a sweep with workers within seconds: the runs in
    flight are ended, the queued ones dropped, the message says the finished ones are stored, and
    the exit code says which signal. (Ctrl-C used to wait for every queued run to finish, and SIGTERM
    killed the driver at once, leaving the pool's semaphores for the resource tracker to complain about.)"""
    argv = [sys.executable, "-c", "import sys; from batchnorm.cli import main; sys.exit(main())", "compare",
            "--model", "mlp", "--seeds", "0,1,2,3", "--steps", "500000", "--workers", "2", "--limit", "200",
            "--out", str(tmp_path / "o"), "--no-report"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(10)  # both workers are training (each run would take many minutes)
        assert proc.poll() is None, proc.communicate()
        start = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert took < 10, took
    assert "interrupted; finished runs are stored and will be reused" in err
    # queued runs too (8 runs, 2 workers): the pool's own thread must not trip over them
    assert "Traceback" not in err and "Exception in thread" not in err and "leaked" not in err, err
