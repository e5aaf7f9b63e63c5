"""The Ray executor (``run_sweep(..., executor="ray")``): a local Ray instance on 2 CPUs trains the runs, the
driver alone writes them to the store, the results are those of the local executor, a killed driver leaves
no process behind and loses only the runs in flight, a rerun trains nothing, and a missing Ray is refused
before any work with the install command.

The Ray tests skip where ``ray`` is not installed, unless ``BATCHNORM_REQUIRE_RAY=1`` (CI), where they fail.
They start Ray twice (~7-10 s each on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from batchnorm.cli import CommandError, UsageError
from batchnorm.lab import sweep as S
from batchnorm.lab.store import Store
from batchnorm.lab.sweep import ExecutorUnavailable, run_sweep
from batchnorm.lab.train import RunConfig, config_hash

try:
    import ray
except ImportError:
    ray = None

REQUIRE = os.environ.get("BATCHNORM_REQUIRE_RAY") == "1"
needs_ray = pytest.mark.skipif(ray is None and not REQUIRE, reason="ray is not installed (pip install -e '.[ray]'); "
                               "BATCHNORM_REQUIRE_RAY=1 makes this a failure")

CONFIGS = [RunConfig(model="mlp", steps=5, data_limit=200, seed=s, norm=n)
           for s in (0, 1) for n in ("none", "batchnorm")]


@pytest.fixture
def need_ray(monkeypatch):
    if ray is None:
        pytest.fail("BATCHNORM_REQUIRE_RAY=1 but ray is not installed: .venv/bin/pip install 'ray>=2.9'")
    monkeypatch.setenv("BATCHNORM_BACKEND", "reference")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    if ray.is_initialized():  # a failed test must not leave its instance to the next one
        ray.shutdown()


def _timeless(result: dict) -> dict:
    return {k: v for k, v in result.items() if "second" not in k}


def _alive(pid: int, cmd: str) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip() == cmd
    except OSError:
        return False


DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from batchnorm.lab.store import Store
    from batchnorm.lab.sweep import run_sweep
    from batchnorm.lab.train import RunConfig

    def tree(pid):
        out = []
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                for c in (task / "children").read_text().split():
                    cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\\0", b" ").decode().strip()
                    out += [(int(c), cmd)] + tree(int(c))
        except OSError:  # a process that just exited
            pass
        return out

    def on_done(cfg, result, reused):  # the first run is stored: record the processes, die without cleanup
        Path(sys.argv[2]).write_text(json.dumps(tree(os.getpid())))
        os.kill(os.getpid(), signal.SIGKILL)

    cfgs = [RunConfig.from_dict(d) for d in json.loads(sys.argv[3])]
    run_sweep(cfgs, Store(sys.argv[1]), workers=2, executor="ray", on_done=on_done)
""")


@needs_ray
def test_ray_sweep_kill_resume_and_same_results_as_local(tmp_path, need_ray, monkeypatch):
    db = tmp_path / "ray.sqlite"
    procs = tmp_path / "procs.json"
    # 1. a driver killed (-9) right after storing its first run: the rest were in flight or queued
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", DRIVER, str(db), str(procs), json.dumps([c.to_dict() for c in CONFIGS])],
                       env={**os.environ}, capture_output=True, text=True, timeout=240)
    assert p.returncode == -9, p.stderr[-2000:]
    with Store(db) as s:
        assert s.count() == 1, "the driver stores each run as it arrives: one before it was killed"
        first = s.hashes()[0]
    tree = [(pid, cmd) for pid, cmd in json.loads(procs.read_text())]
    assert any("raylet" in cmd for _, cmd in tree) and any("gcs_server" in cmd for _, cmd in tree)
    # every process of the driver's Ray instance dies with it: GCS, raylet and workers by Ray's fate sharing,
    # the dashboard / runtime-env agents (which would linger 60 s) and the reaper itself by the sweep's reaper
    assert any("Agent" in cmd for _, cmd in tree) and any("_RAY_REAPER" in cmd or "os.getppid() == driver" in cmd
                                                           for _, cmd in tree)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(*x) for x in tree):
        time.sleep(0.2)
    assert not [cmd[:80] for pid, cmd in tree if _alive(pid, cmd)]
    t_kill = time.perf_counter() - t0

    # 2. rerun with ray: the stored run is reused, the 3 lost ones are trained, by tasks, stored by the driver
    seen = []
    store = Store(db)

    def on_done(cfg, result, reused):
        assert store.has(config_hash(cfg)), "on_done comes after the driver stored the run"
        seen.append((config_hash(cfg), reused))

    t1 = time.perf_counter()
    ray_runs = run_sweep(CONFIGS, store, workers=2, executor="ray", on_done=on_done)
    t_resume = time.perf_counter() - t1
    assert sorted(seen) == sorted((config_hash(c), config_hash(c) == first) for c in CONFIGS)
    assert not ray.is_initialized(), "the sweep shuts down the Ray instance it started"
    assert store.count() == 4

    # 3. the local executor gives the same runs for the same configurations (train is deterministic)
    local_runs = run_sweep(CONFIGS, Store(tmp_path / "local.sqlite"))
    for a, b in zip(ray_runs, local_runs):
        assert a["hash"] == b["hash"] and a["config"] == b["config"]
        assert _timeless(a["result"]) == _timeless(b["result"])
        assert {k: v for k, v in a["curves"].items() if k != "seconds"} == \
               {k: v for k, v in b["curves"].items() if k != "seconds"}
        assert a["env"]["threads"] == 1

    # 4. a rerun trains nothing and does not even start Ray
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init for a sweep with nothing to train"))
    created = {h: store.get(h)["created"] for h in store.hashes()}
    seen.clear()
    run_sweep(CONFIGS, store, workers=2, executor="ray", on_done=on_done)
    assert all(reused for _, reused in seen) and len(seen) == 4
    assert {h: store.get(h)["created"] for h in store.hashes()} == created
    store.close()
    print(f"ray: killed driver {t_kill:.1f} s, resume {t_resume:.1f} s")


def _store_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.parent.glob(path.name + "*")}


def test_missing_ray_is_refused_before_any_work(tmp_path, monkeypatch):
    db = tmp_path / "lab.sqlite"
    store = Store(db)
    run_sweep(CONFIGS[:1], store)
    before = _store_bytes(db)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setattr(S, "config_hash", lambda c: pytest.fail("data loaded / configs hashed before the check"))
    with pytest.raises(ExecutorUnavailable, match=r'pip install "batchnorm\[ray\]"'):
        run_sweep(CONFIGS, store, workers=2, executor="ray")
    assert store.count() == 1 and _store_bytes(db) == before
    store.close()
    # the command-line check (made before a command opens its store): a one-line runtime error, exit code 1
    args = argparse.Namespace(executor="ray", address=None)
    with pytest.raises(CommandError, match=r'batchnorm\[ray\]') as exc:
        S.executor_options(args)
    assert exc.value.code == 1 and not isinstance(exc.value, UsageError)
    with pytest.raises(ValueError, match="unknown executor"):
        run_sweep(CONFIGS, Store(tmp_path / "other.sqlite"), executor="dask")


def test_executor_arguments(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))  # options only need ray importable
    import batchnorm_cli

    _, parsers = batchnorm_cli.build_parser()
    p = parsers["train"]  # every lab command has the same executor options (the command line's front)
    help_text = " ".join(p.format_help().split())
    assert "default: local" in help_text and "implies --executor ray" in help_text
    assert S.executor_options(p.parse_args([])) == {"executor": "local", "address": None}
    assert S.executor_options(p.parse_args(["--executor", "ray"])) == {"executor": "ray", "address": None}
    assert S.executor_options(p.parse_args(["--address", "ray://head:10001"])) == \
        {"executor": "ray", "address": "ray://head:10001"}
    with pytest.raises(UsageError, match="--address head:6379 is a Ray cluster address"):
        S.executor_options(p.parse_args(["--executor", "local", "--address", "head:6379"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--executor", "dask"])


@needs_ray
def test_unreachable_cluster_fails_fast(tmp_path, need_ray):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nobody listens there now
    store = Store(tmp_path / "lab.sqlite")
    t = time.monotonic()
    with pytest.raises(ExecutorUnavailable, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        run_sweep(CONFIGS[:1], store, executor="ray", address=f"127.0.0.1:{port}")
    assert time.monotonic() - t < 30 and store.count() == 0 and not ray.is_initialized()
    store.close()


@needs_ray
def test_claims_command_on_ray_matches_local(tmp_path, capsys, need_ray):
    """``batchnorm claims --executor ray``: the same runs, effects and verdicts as the local executor."""
    from batchnorm.cli import main

    argv = ["claims", "--tiny", "--only", "gradients", "--dataset", "mnist1d", "--no-report", "--json"]
    assert main(argv + ["--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(argv + ["--out", str(tmp_path / "ray"), "--workers", "2", "--executor", "ray"]) == 0
    remote = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for a, b in zip(local["claims"][0]["conditions"], remote["claims"][0]["conditions"]):
        assert a["effects"] == b["effects"] and a["verdict"] == b["verdict"]


def test_cli_without_ray_is_one_line_and_stores_nothing(tmp_path, capsys, monkeypatch):
    from batchnorm.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["train", "--steps", "2", "--limit", "50", "--executor", "ray", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert 'pip install "batchnorm[ray]"' in err and "Traceback" not in err
    assert not (tmp_path / "lab.sqlite").exists()
