"""Run a set of configurations through the store: reuse what is stored, train the rest (in worker
processes when ``workers > 1``), store each run the moment it finishes.

A sweep that is killed (Ctrl-C, a worker killed, the machine rebooted) loses only the runs that were
in flight: starting it again trains exactly the missing ones. Workers never outlive the process that
started them: on Linux the kernel kills them when it dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and
everywhere a watchdog thread in each worker exits when its parent process is gone (``kill -9`` included).

Threads: these models are tiny, and PyTorch's intra-op threads slow them down (measured on 2 cores:
an MNIST-1D MLP step takes ~5x longer with 2 threads than with 1), so every run uses one thread and
parallelism comes from processes.

Executors: ``executor="local"`` (the default) is the above. ``executor="ray"`` runs the runs as tasks of
Ray (an optional extra, ``pip install "batchnorm[ray]"``): a local Ray instance on ``workers`` CPUs, or the
cluster at ``address``. The tasks only train and *return* the run; the driver (this process) alone writes
the store, as each task finishes, so the SQLite file never needs to be reachable from the cluster's
nodes. The data is loaded and checked on the driver and shipped to the nodes through Ray's object store
(once per node), so the nodes need the package but not the data files.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from .data import Dataset
from .store import Store, environment
from .train import RunConfig, config_hash, load_data, recipe_fields, train, with_recipe

__all__ = ["EXECUTORS", "ExecutorUnavailable", "SweepError", "check_executor",
           "default_workers", "executor_options", "run_sweep"]

#: Where a sweep's runs are trained: worker processes on this machine, or Ray tasks.
from batchnorm_cli import EXECUTORS, RAY_INSTALL  # one list of executors, shared with the front

#: Settings of the driver that change how a run computes; a Ray cluster's workers do not inherit the
#: driver's environment, so these travel with the tasks (``runtime_env``) when the cluster is not ours.
FORWARDED_ENV = ("BATCHNORM_BACKEND", "BATCHNORM_TRITON")


class SweepError(RuntimeError):
    """A sweep stopped early (a worker died); the finished runs are stored, rerun to complete."""


class ExecutorUnavailable(SweepError):
    """The executor cannot run the sweep (Ray not installed, its cluster unreachable or lost); the message
    says what to do. Runs finished before it was raised are stored."""


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


#: Seconds per training step (evaluations included) of each built-in model at its recipe's batch size, on
#: the reference data, one thread: medians of the runs of a `claims --full` store (2-vCPU Xeon VM,
#: 2026-12-04; docs/lab.md). Only the fallback of :class:`CostModel` for runs unlike any stored one.
STEP_SECONDS = {"logistic": 0.0005, "paper-mlp": 0.001, "seed-mlp": 0.001, "mlp": 0.002, "cnn": 0.008,
                "cnn2d": 0.015, "deep-mlp": 0.015, "resnet-mlp": 0.02, "resnet": 0.15, "lstm": 0.012}


#: :class:`CostModel`'s least guess for a run unlike any stored one (one of no training step included).
MIN_RUN_SECONDS = 1.0


def estimated_cost(cfg: RunConfig) -> float:
    """A run's seconds as guessed from its configuration alone (:data:`STEP_SECONDS` per step, a norm
    costing 1.3x, 5x in the LSTM, where it normalizes every time step; probes 1.5x each; Fashion-MNIST's
    784 inputs 1.5x MNIST-1D's 40): :class:`CostModel`'s fallback."""
    full = with_recipe(cfg)
    per_step = STEP_SECONDS.get(full.model, 0.005)
    if full.norm != "none":
        per_step *= 5.0 if full.model == "lstm" else 1.3
    per_step *= (1.0 + 0.5 * len(full.probes)) * (1.5 if full.dataset == "fashion-mnist" else 1.0)
    return per_step * recipe_fields(full).steps


#: Configuration fields that do not change what a training step costs.
_COST_NEUTRAL = ("seed", "lr", "steps", "eval_every", "weight_scale", "blowup")


def _cost_keys(cfg: dict) -> tuple[str, str, str]:
    """From the closest to the loosest: the configuration less its cost-neutral fields; model, data and
    norm; the model."""
    exact = json.dumps({k: v for k, v in cfg.items() if k not in _COST_NEUTRAL}, sort_keys=True, default=str)
    return exact, f"{cfg.get('model')}|{cfg.get('dataset')}|{cfg.get('norm')}", str(cfg.get("model"))


class CostModel:
    """Seconds a run will take, from the stored runs most like it: the median seconds per step of the
    runs that differ from it only in seed, learning rate, step count or other fields that do not change
    a step's cost, else of those with its model, data and norm, else of its model, times its steps; for
    a run unlike any stored one, :func:`estimated_cost` scaled by how the stored runs compared with it
    on this store's machines. A sweep runs the longest first and its progress line tells the time left
    with it (a guess from the configuration alone can be far off: on Fashion-MNIST a small ResNet step
    costs ~60x an MLP's, and a BN-LSTM step 5x an LSTM's)."""

    def __init__(self, timings: Iterable[tuple[dict, float, int]] = ()) -> None:
        per_step: dict[str, list[float]] = {}
        at_init: dict[str, list[float]] = {}  # runs of no training step (probes at initialization)
        ratios = []
        for cfg, seconds, steps in timings:
            if seconds > 0 and steps <= 0 and not cfg.get("steps"):
                for key in _cost_keys(cfg):
                    at_init.setdefault(key, []).append(seconds)
            if seconds <= 0 or steps <= 0:
                continue
            for key in _cost_keys(cfg):
                per_step.setdefault(key, []).append(seconds / steps)
            try:
                guess = estimated_cost(RunConfig.from_dict(cfg))
            except Exception:  # a run of an older configuration format: its timing still counts above
                continue
            planned = cfg.get("steps") or steps  # a run that diverged stopped early
            ratios.append(seconds / (guess * steps / planned))
        self._per_step = {k: float(np.median(v)) for k, v in per_step.items()}
        self._at_init = {k: float(np.median(v)) for k, v in at_init.items()}
        self._scale = float(np.median(ratios)) if ratios else 1.0

    @classmethod
    def of(cls, store: Store) -> CostModel:
        return cls(store.timings())

    def __call__(self, cfg: RunConfig) -> float:
        full = with_recipe(cfg)
        steps = recipe_fields(full).steps
        for key in _cost_keys(full.to_dict()):
            if steps == 0 and key in self._at_init:
                return self._at_init[key]
            if steps > 0 and key in self._per_step:
                return self._per_step[key] * steps
        # building the model and evaluating it cost something even without a training step
        return max(self._scale * estimated_cost(full), MIN_RUN_SECONDS)


def run_sweep(
    configs: Iterable[RunConfig],
    store: Store,
    workers: int = 1,
    threads: int = 1,
    on_done: Callable[[RunConfig, dict, bool], None] | None = None,
    on_step: Callable[[RunConfig, int, int, dict], None] | None = None,
    executor: str = "local",
    address: str | None = None,
    cost: Callable[[RunConfig], float] | None = None,
) -> list[dict]:
    """Make sure every configuration has a stored run; return the runs in the order given.

    The missing runs start longest first by ``cost`` (seconds; default :class:`CostModel` of ``store``).

    ``on_done(cfg, result, reused)`` is called once per configuration; ``on_step`` forwards the training
    progress of in-process runs (``workers == 1``, local executor).

    ``executor="ray"`` trains the missing runs as Ray tasks (see the module's docstring): on a local Ray
    instance with ``workers`` CPUs, or on the cluster at ``address`` (``"auto"``, ``"HOST:6379"``,
    ``"ray://HOST:10001"``; ``$RAY_ADDRESS`` when ``address`` is None and it is set), where ``workers`` is
    unused. A missing Ray raises :class:`ExecutorUnavailable` before anything is loaded, trained or stored.
    """
    check_executor(executor, address)
    configs = list(configs)
    hashes = [config_hash(c) for c in configs]
    todo: dict[str, RunConfig] = {}
    for c, h in zip(configs, hashes):
        if store.has(h):
            if on_done:
                on_done(c, _stored(store, h)["result"], True)
        elif h not in todo:
            todo[h] = c
    order: Callable[[RunConfig], float] = cost or (CostModel.of(store) if todo else estimated_cost)
    if todo and executor == "ray":
        _run_ray(todo, store, workers, address, on_done, order)
    elif todo and (workers <= 1 or len(todo) == 1):
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
            ordered = sorted(todo.values(), key=order, reverse=True)
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
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (batchnorm.cli.run): stop now, not at the end
                _stop_pool(pool)
                raise
    return [_stored(store, h) for h in hashes]


def _stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Drop the queued runs and end the workers' runs in flight: leaving the ``with`` block would
    otherwise wait for every queued run (a Ctrl-C used to let the whole sweep finish first). Finished
    runs are in the store already; a run cut short leaves nothing there (each is one transaction).

    The order matters: the pool's own thread must learn of the shutdown (and cancel the queued runs
    itself) before it sees the workers gone; futures cancelled from here while it still holds them
    make it fail with ``InvalidStateError`` when it marks them broken (seen on a sweep of 1,878 runs)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # no public way before Python 3.14;
    pool.shutdown(wait=False, cancel_futures=True)                   # taken first: shutdown forgets them
    for proc in procs:
        proc.terminate()


def _stored(store: Store, h: str) -> dict:
    """The stored run ``h``, which the sweep found or put there."""
    run = store.get(h)
    if run is None:  # pragma: no cover - a run vanished between put and get
        raise SweepError(f"run {h} missing from {store.path}")
    return run


# --------------------------------------------------------------------------------------------- Ray


def _import_ray():
    """The ``ray`` module, or :class:`ExecutorUnavailable` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"--executor ray needs Ray, which is not installed in this Python environment ({exc}). Install it "
            f"with: {RAY_INSTALL} (from a checkout: pip install -e \".[ray]\"), or use --executor local. "
            "Nothing was trained or stored."
        ) from None
    return ray


def check_executor(executor: str, address: str | None = None) -> None:
    """Refuse an unknown executor, an address without Ray, or Ray where it is not installed, before any work."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if address is not None and executor != "ray":
        raise ValueError(f"an address ({address}) is the address of a Ray cluster: it needs executor 'ray', "
                         f"not {executor!r}")
    if executor == "ray":
        _import_ray()


def _data_key(cfg: RunConfig) -> tuple:
    return (cfg.dataset, cfg.data_dir, cfg.data_limit, cfg.task, cfg.data_kw)


#: Datasets a Ray worker process has received, by data key and identity (a worker runs many tasks).
_RAY_DATA: dict[tuple, Dataset] = {}


def _ray_train(cfg_dict: dict, data_key: tuple, shipped: list) -> dict:
    """A Ray task: train one configuration on the data the driver shipped, return the run (stores nothing)."""
    import ray

    torch.set_num_threads(1)
    data = _RAY_DATA.get(data_key)
    if data is None:
        ds = ray.get(shipped[0])  # zero-copy and read-only: copy once, so no run can write into shared memory
        arrays = {f: np.array(getattr(ds, f)) for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        data = dataclasses.replace(ds, **arrays)
        _RAY_DATA.clear()  # keep one dataset per worker
        _RAY_DATA[data_key] = data
    run = train(RunConfig.from_dict(cfg_dict), data=data)
    run["env"] = environment()
    return run


#: Run beside a local Ray instance of ours: until the driver (its parent) dies, it notes the processes of the
#: instance (the trees under the given pids, with their start times); then it kills those still running.
_RAY_REAPER = r"""
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
driver, roots = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
def started(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
def tree(pids):
    out = []
    for pid in pids:
        out.append(pid)
        try:
            kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
        except OSError:
            kids = []
        out += tree(kids)
    return out
known = {}
while os.getppid() == driver:
    for p in tree(roots):  # a process stays known until it exits, even after its parent (raylet) died
        known.setdefault(p, started(p))
    known = {p: t for p, t in known.items() if t is not None and started(p) == t}
    time.sleep(0.25)
for pid, t in known.items():
    if t is not None and started(pid) == t:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()}
    except OSError:
        return set()


def _start_reaper(ray_pids: set[int]):
    """Make the processes of our local Ray instance die with the driver, ``kill -9`` included.

    Ray's fate sharing kills its core processes (GCS, raylet) and the workers at once, but its dashboard and
    runtime-env agents first try to report the raylet's death to the (dead) GCS and exit only after that
    call's 60 s timeout (Ray 2.60). This process kills them as soon as the driver is gone. Linux only."""
    if not ray_pids or not sys.platform.startswith("linux"):
        return None
    import subprocess

    try:
        return subprocess.Popen([sys.executable, "-c", _RAY_REAPER, str(os.getpid()), *map(str, sorted(ray_pids))],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:  # pragma: no cover - cannot start a process: Ray's own (slower) fate sharing remains
        return None


def _probe(address: str | None, timeout: float = 10.0) -> None:
    """Fail fast on an unreachable ``HOST:PORT`` / ``ray://HOST:PORT`` (Ray itself keeps retrying for minutes)."""
    import socket

    rest = (address or "").split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # "auto" or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ExecutorUnavailable(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}). Check the address (`ray start "
            "--head` prints it; `ray status` on the head node shows the cluster) and that this machine can reach "
            "it, or leave out --address to start a local Ray instance. Nothing was trained."
        ) from None


def _ray_init(ray, address: str | None, workers: int):
    """Start (no address) or join a Ray cluster; returns the reaper process of a local instance, if any."""
    kw: dict = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        before = _children(os.getpid())
        ray.init(address="local", num_cpus=max(1, workers), **kw)  # always a new instance of our own
        return _start_reaper(_children(os.getpid()) - before)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if env:
        kw["runtime_env"] = {"env_vars": env}
    where = address or os.environ.get("RAY_ADDRESS")
    _probe(where)
    try:
        ray.init(address=address or None, **kw)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        if "auth" in f"{exc} {exc.__cause__}".lower():
            raise ExecutorUnavailable(
                f"the Ray cluster at {where} refused this driver's authentication: it uses token authentication "
                "(`ray start` enables it). Set RAY_AUTH_MODE=token and make the cluster's token available here "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN), then run the command again."
            ) from None
        raise ExecutorUnavailable(
            f"cannot connect to the Ray cluster at {where} ({type(exc).__name__}: {exc}). Check the address "
            "(`ray start --head` prints it; `ray status` on the head node shows the cluster) and that this "
            "machine can reach it, or leave out --address to start a local Ray instance. Nothing was trained."
        ) from None
    return None


def _run_ray(todo: dict[str, RunConfig], store: Store, workers: int, address: str | None,
             on_done: Callable[[RunConfig, dict, bool], None] | None, cost: Callable[[RunConfig], float]) -> None:
    """Train ``todo`` as Ray tasks; store each returned run here, in the driver, as it arrives."""
    ray = _import_ray()
    ordered = sorted(todo.values(), key=cost, reverse=True)  # longest first, as the local pool
    # the driver loads (and checks) each dataset once, exactly as train() would, and ships it
    datasets: dict[tuple, Dataset] = {}
    for c in ordered:
        if _data_key(c) not in datasets:
            datasets[_data_key(c)] = load_data(c)  # a built-in dataset or the user's file
    started = not ray.is_initialized()
    reaper = _ray_init(ray, address, workers) if started else None
    pending: list = []
    try:
        task = ray.remote(num_cpus=1)(_ray_train)
        shipped = {k: ray.put(ds) for k, ds in datasets.items()}
        futures = {}
        for c in ordered:
            key = _data_key(c) + (datasets[_data_key(c)].info.get("data_id"),)
            futures[task.remote(c.to_dict(), key, [shipped[_data_key(c)]])] = c
        pending = list(futures)
        failed = None
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    run = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # train() raised: store the others, then raise
                    failed = failed or exc
                    continue
                except ray.exceptions.RayError as exc:  # a worker or node died (after Ray's retries)
                    stored = sum(store.has(h) for h in todo)
                    raise ExecutorUnavailable(
                        f"a Ray worker or node was lost ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        f"{stored} of {len(todo)} new runs are stored. Run the same command again to train the "
                        "missing ones."
                    ) from exc
                store.put(run)  # the driver is the store's only writer
                if on_done:
                    on_done(futures[ref], run["result"], False)
        if failed is not None:
            cause = getattr(failed, "cause", None)
            raise (cause if isinstance(cause, Exception) else failed) from failed
    finally:
        for ref in pending:  # interrupted: the runs in flight are lost, the stored ones stay
            try:
                ray.cancel(ref, force=True)
            except Exception:  # pragma: no cover - already finished, or the cluster is gone
                pass
        if started:
            ray.shutdown()
        if reaper is not None:  # the instance is down: the reaper has nothing left to do
            reaper.kill()
            reaper.wait()


# ------------------------------------------------------------------------------------ command line


def executor_options(args: argparse.Namespace) -> dict:
    """``run_sweep``'s executor keywords from the command line's ``--executor``/``--address``, checked now (before
    any store is opened): a missing Ray is a runtime error naming the install command, ``--executor local
    --address`` a usage error."""
    from ..cli import CommandError, UsageError

    address = getattr(args, "address", None)
    executor = getattr(args, "executor", None) or ("ray" if address else "local")
    if address is not None and executor != "ray":
        raise UsageError(f"--address {address} is a Ray cluster address; it needs --executor ray "
                         "(or leave --executor out)")
    try:
        check_executor(executor, address)
    except ExecutorUnavailable as exc:
        raise CommandError(str(exc)) from None
    return {"executor": executor, "address": address}


def open_store(out_dir: str | os.PathLike, store: str | None = None, check: bool = False) -> Store:
    """The store of an output directory (``DIR/lab.sqlite``) unless a path is given (``check``: see
    :class:`Store`)."""
    return Store(store or Path(out_dir) / "lab.sqlite", check=check)
