"""Store and sweeps: atomic writes, reuse, and resume after a worker is killed mid-sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
