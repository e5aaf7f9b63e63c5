"""Run a set of configurations through the store: reuse what is stored, train the rest (in worker
processes when ``workers > 1``), store each run the moment it finishes.

A sweep that is killed (Ctrl-C, a worker killed, the machine rebooted) loses only the runs that were
in flight: starting it again trains exactly the missing ones. Workers never outlive the process that
started them: on Linux the kernel kills them when it dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and
everywhere a watchdog thread in each worker exits when its parent process is gone (``kill -9`` included).

Threads: these models are tiny, and PyTorch's intra-op threads slow them down (measured on 2 cores:
an MNIST-1D MLP step takes ~5x longer with 2 threads than with 1), so every run uses one thread and
parallelism comes from processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .store import Store, environment
from .train import RunConfig, config_hash, train, with_recipe

__all__ = ["SweepError", "default_workers", "run_sweep"]


class SweepError(RuntimeError):
    """A sweep stopped early (a worker died); the finished runs are stored, rerun to complete."""


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def auto_workers(n_todo: int) -> int:
    """Worker processes worth starting for ``n_todo`` runs: the CPUs that are actually idle.

    Measured on a shared 2-core VM (8 runs, MNIST-1D MLP and CNN, 1000 steps): both cores idle, 2 workers
    19.4 s vs 1 worker 30.8 s (1.6x); with another job holding one core, 2 workers 38 s vs 32 s (each run
    took twice as long and the workers' start-up was not repaid). So: one worker per idle CPU, measured
    over a quarter of a second from ``/proc/stat`` (CPUs minus the load average elsewhere), and in-process
    for fewer than 4 runs.
    """
    cpus = default_workers()
    if n_todo < 4 or cpus == 1:
        return 1
    idle = idle_cpus()
    return max(1, min(cpus, n_todo, int(idle + 0.35)))


def idle_cpus(interval: float = 0.25) -> float:
    """Number of idle CPUs right now (``/proc/stat``), or CPUs minus the 1-minute load average."""
    cpus = os.cpu_count() or 1

    def sample():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return vals[3] + (vals[4] if len(vals) > 4 else 0), sum(vals)

    try:
        i0, t0 = sample()
        time.sleep(interval)
        i1, t1 = sample()
        if t1 > t0:
            return cpus * (i1 - i0) / (t1 - t0)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return max(0.0, cpus - os.getloadavg()[0])
    except OSError:  # pragma: no cover
        return float(cpus)


_WORKER_STORE: Store | None = None

#: Seconds between two checks of the worker's parent-process watchdog.
WATCHDOG_INTERVAL = 0.5
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, interval: float = WATCHDOG_INTERVAL) -> bool:
    """Make the calling process exit as soon as ``parent_pid`` (its parent) dies, however it dies.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, the kernel kills us when the parent exits. Everywhere: a
    daemon thread polls ``os.getppid()`` (an orphan is re-parented, so it changes) and calls ``os._exit``.
    If the parent already died before this call, exit now. Returns whether the prctl was set.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
    return armed


def _worker_init(store_path: str, threads: int, parent_pid: int | None = None) -> None:
    global _WORKER_STORE
    if parent_pid is not None:
        die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    _WORKER_STORE = Store(store_path)


def _worker_run(cfg_dict: dict) -> tuple[str, dict]:
    cfg = RunConfig.from_dict(cfg_dict)
    run = train(cfg)
    run["env"] = environment()
    assert _WORKER_STORE is not None
    _WORKER_STORE.put(run)
    return run["hash"], run["result"]


def estimated_cost(cfg: RunConfig) -> float:
    """Rough relative cost of a run (steps x layers x norm overhead), to schedule long runs first."""
    full = with_recipe(cfg)
    kw = dict(full.model_kw)
    layers = kw.get("depth", 3) if full.model in ("deep-mlp", "resnet-mlp") else 3
    if full.model == "lstm":
        layers = 40
    norm = 1.0 if full.norm == "none" else 3.0
    probes = 1.0 + 0.5 * len(full.probes)
    return (full.steps + 50) * layers * norm * probes * (3.0 if full.model in ("cnn", "cnn2d") else 1.0)


def run_sweep(
    configs: Iterable[RunConfig],
    store: Store,
    workers: int = 1,
    threads: int = 1,
    on_done: Callable[[RunConfig, dict, bool], None] | None = None,
    on_step: Callable[[RunConfig, int, int, dict], None] | None = None,
) -> list[dict]:
    """Make sure every configuration has a stored run; return the runs in the order given.

    ``on_done(cfg, result, reused)`` is called once per configuration; ``on_step`` forwards the training
    progress of in-process runs (``workers == 1``).
    """
    configs = list(configs)
    hashes = [config_hash(c) for c in configs]
    todo: dict[str, RunConfig] = {}
    for c, h in zip(configs, hashes):
        if store.has(h):
            if on_done:
                on_done(c, store.get(h)["result"], True)
        elif h not in todo:
            todo[h] = c
    if todo and (workers <= 1 or len(todo) == 1):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for c in todo.values():
                full = with_recipe(c)
                cb = (lambda s, t, m, full=full: on_step(full, s, t, m)) if on_step else None
                run = train(c, progress=cb)
                run["env"] = environment()
                store.put(run)
                if on_done:
                    on_done(c, run["result"], False)
        finally:
            torch.set_num_threads(old)
    elif todo:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
            initargs=(str(store.path), 1, os.getpid()),
        ) as pool:
            # longest runs first, so the last worker is not left alone with a long pole
            ordered = sorted(todo.values(), key=estimated_cost, reverse=True)
            futures = {pool.submit(_worker_run, c.to_dict()): c for c in ordered}
            try:
                for fut in cf.as_completed(futures):
                    _, result = fut.result()
                    if on_done:
                        on_done(futures[fut], result, False)
            except cf.process.BrokenProcessPool as exc:
                for f in futures:
                    f.cancel()
                done = sum(store.has(h) for h in todo)
                raise SweepError(
                    f"a worker process died; {done} of {len(todo)} new runs are stored. "
                    "Run the same command again to train the missing ones."
                ) from exc
    out = []
    for h in hashes:
        run = store.get(h)
        if run is None:  # pragma: no cover - a run vanished between put and get
            raise SweepError(f"run {h} missing from {store.path}")
        out.append(run)
    return out


def open_store(out_dir: str | os.PathLike, store: str | None = None, check: bool = False) -> Store:
    """The store of an output directory (``DIR/lab.sqlite``) unless a path is given (``check``: see
    :class:`Store`)."""
    return Store(store or Path(out_dir) / "lab.sqlite", check=check)
