"""Getting the cpu backend's compiled kernels without making a call wait for numba.

Numba compiles a kernel at its first call (about 3 minutes for the float32 training forward and
backward on 2 cores, measured with an empty cache) and caches it on disk; loading it from that
cache still takes ~0.5 s. So, by default (``BATCHNORM_COMPILE=background``), the dispatcher asks
:meth:`Kernels.ready` before it picks the cpu backend, and until the answer is yes it runs the
reference backend (plain torch, the same math within the documented tolerance) while a thread
of this process gets the kernels:

1. an entry (one of the backend's three compiled drivers, for one dtype) whose *marker file*
   exists in numba's cache directory has been compiled there: the thread loads it
   (``Dispatcher.compile`` with the exact argument types the backend passes; a cache hit) and
   from then on the dispatcher uses it;
2. otherwise the thread starts a compiler process (``python -m batchnorm.kernels._compile``), which
   takes a lock file next to the markers, compiles the missing entries one by one into numba's
   cache, writes each one's marker, and says so on stderr (one line when it starts, one when it
   is done; ``BATCHNORM_QUIET=1`` silences them). A process that finds the lock taken starts
   no compiler of its own: it waits for the markers, so workers compile once per machine (per
   cache directory), not once each. The compiler finishes what it started even when the process
   that started it exits first (short-lived workers still fill the cache); it then stops writing
   to that process's stderr, so a pipe reading it is not held open.

Each entry switches on its own, so a training forward may run on the reference backend and its
backward on the cpu one, or the reverse: both backends take and return the same statistics
(``mean``, biased ``var`` over one group), so the pairing is exact up to rounding
(``tests/core/test_jit.py`` checks it).

A forced backend (``set_backend("cpu")``, ``use_backend("cpu")``, ``BATCHNORM_BACKEND=cpu``)
waits for its entry. ``BATCHNORM_COMPILE=wait`` restores numba's behaviour: compile in the
calling process at first use, blocking (still under the lock, once per machine).

Fork: a child forked while an entry was being loaded (numba's compiler lock may be held by the
thread that does not exist in the child) computes on the reference backend; a child forked while
the compiler ran simply starts over (it finds the markers, or the lock).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MODES = ("background", "wait")
POLL_S = 0.25  # how often a waiting thread looks for markers


def mode() -> str:
    """``BATCHNORM_COMPILE``: ``"background"`` (default) or ``"wait"``."""
    value = os.environ.get("BATCHNORM_COMPILE", "") or "background"
    if value not in MODES:
        raise ValueError(f"BATCHNORM_COMPILE must be one of {', '.join(MODES)}, got {value!r}")
    return value


def say(message: str) -> None:
    """One line on stderr, unless ``BATCHNORM_QUIET`` is set to a non-empty value other than 0."""
    if os.environ.get("BATCHNORM_QUIET", "0") in ("", "0"):
        print(f"batchnorm: {message}", file=sys.stderr, flush=True)


@contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if missing); yields whether it was taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class Kernels:
    """The compiled entries of one backend, per dtype, and the thread that gets them.

    ``entries``: name -> numba dispatcher; ``signature(name, dtype)``: the argument types the
    backend's wrappers pass to that entry for that dtype name (``"float32"``, ``"float64"``);
    ``sources``: the files whose content the compiled code depends on (their sizes and
    modification times go into the marker names, as numba keys its cache on them)."""

    def __init__(self, module: str, entries: dict[str, Any], signature: Callable[[str, str], tuple],
                 sources: list[Path]) -> None:
        self.module = module
        self.entries = entries
        self.signature = signature
        self.sources = sources
        self._ready: set[tuple[str, str]] = set()  # (entry, dtype) loaded in this process
        self._failed: dict[str, str] = {}  # dtype -> why it cannot be had in this process
        self._jobs: dict[str, threading.Thread] = {}
        self._procs: dict[str, subprocess.Popen] = {}  # dtype -> the compiler process this process started
        self._loading: set[str] = set()  # dtypes whose thread is inside Dispatcher.compile
        self._cond = threading.Condition()
        os.register_at_fork(after_in_child=self._after_fork)

    # -- where the cache lives ----------------------------------------------------------------

    def cache_dir(self) -> Path | None:
        """Numba's cache directory for these entries (``None``: numba cannot cache them)."""
        cache = getattr(next(iter(self.entries.values())), "_cache", None)
        path = getattr(cache, "_cache_path", None)
        return Path(path) if path else None

    def _key(self, dtype: str) -> str:
        import numba

        h = hashlib.sha1(f"{numba.__version__} {sys.version}".encode())
        for p in self.sources:
            st = p.stat()
            h.update(f"{p.name} {st.st_size} {st.st_mtime_ns}".encode())
        return f"batchnorm-{self.module.rsplit('.', 1)[-1]}-{dtype}-{h.hexdigest()[:12]}"

    def marker(self, entry: str, dtype: str) -> Path | None:
        d = self.cache_dir()
        return None if d is None else d / f"{self._key(dtype)}-{entry}.ready"

    def lock_path(self, dtype: str) -> Path | None:
        d = self.cache_dir()
        return None if d is None else d / f"{self._key(dtype)}.lock"

    # -- the dispatcher's question ---------------------------------------------------------

    def ready(self, entry: str, dtype: str, wait: bool = False) -> bool:
        """Whether ``entry`` for ``dtype`` is compiled and loaded in this process; if not, start
        getting it (``BATCHNORM_COMPILE=background``: in a thread) and, with ``wait``, wait for it
        (raising ``RuntimeError`` if it cannot be had)."""
        if (entry, dtype) in self._ready:
            return True
        if mode() == "wait":
            self._get_now(entry, dtype)
            return True
        with self._cond:
            if dtype not in self._jobs and dtype not in self._failed:
                job = threading.Thread(target=self._run, args=(dtype, entry), daemon=True,
                                       name=f"batchnorm-jit-{dtype}")
                self._jobs[dtype] = job
                job.start()
            if not wait:
                return False
            while (entry, dtype) not in self._ready and dtype not in self._failed:
                self._cond.wait()
            if (entry, dtype) in self._ready:
                return True
        raise RuntimeError(
            f"the cpu backend's kernels for {dtype} are not available: {self._failed[dtype]}; "
            "use the reference backend (batchnorm.set_backend('reference') or BATCHNORM_BACKEND=reference)"
        )

    def failed(self, dtype: str) -> str | None:
        """Why ``dtype``'s kernels cannot be had in this process (``None``: they can)."""
        return self._failed.get(dtype)

    # -- getting the kernels ----------------------------------------------------------------

    def _load(self, entry: str, dtype: str) -> None:
        self.entries[entry].compile(self.signature(entry, dtype))
        with self._cond:
            self._ready.add((entry, dtype))
            self._cond.notify_all()

    def _get_now(self, entry: str, dtype: str) -> None:
        """``BATCHNORM_COMPILE=wait``: compile (or load) ``entry`` in this thread, under the lock."""
        lock, marker = self.lock_path(dtype), self.marker(entry, dtype)
        if lock is None or marker is None:
            self._load(entry, dtype)
            return
        with file_lock(lock):
            start = time.monotonic()
            if not marker.exists():
                say(f"compiling the cpu backend's {entry} kernels for {dtype} (once per machine, "
                    f"about a minute or two); BATCHNORM_COMPILE=background computes meanwhile instead")
            self._load(entry, dtype)
            if not marker.exists():
                marker.touch()
                say(f"compiled {entry} for {dtype} in {time.monotonic() - start:.0f} s")

    def _run(self, dtype: str, first: str) -> None:
        """The thread: load each entry whose marker exists, start a compiler process for the
        others unless one runs already (the lock is taken), until every entry is loaded."""
        try:
            order = [first] + [e for e in self.entries if e != first]
            lock = self.lock_path(dtype)
            if lock is None:  # numba cannot cache here: compile in this thread (no other way)
                for entry in order:
                    self._load_guarded(entry, dtype)
                return
            proc: subprocess.Popen | None = None
            while True:
                pending = [e for e in order if (e, dtype) not in self._ready]
                for entry in pending:
                    if self.marker(entry, dtype).exists():  # type: ignore[union-attr]
                        self._load_guarded(entry, dtype)
                if all((e, dtype) in self._ready for e in order):
                    if proc is not None:  # it exits after its last marker: reap it, so that no zombie
                        proc.wait()       # stays beside a long-lived process (a training run, a notebook)
                    return
                if proc is not None and proc.poll() is not None:
                    if any(not self.marker(e, dtype).exists() for e in order):  # type: ignore[union-attr]
                        raise RuntimeError(f"the compiler process exited with status {proc.returncode} "
                                           "(its error is on stderr above)")
                    continue  # it finished: load the rest
                if proc is None:
                    with file_lock(lock, blocking=False) as free:
                        pass
                    if free:  # nobody compiles: start the compiler (it takes the lock itself)
                        proc = self._spawn(dtype, [e for e in order if (e, dtype) not in self._ready])
                        self._procs[dtype] = proc
                time.sleep(POLL_S)
        except BaseException as exc:  # reported to every waiter, then on stderr
            with self._cond:
                self._failed[dtype] = f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
            say(f"the cpu backend's kernels for {dtype} are not available ({self._failed[dtype]}); "
                "batch norm computes on the reference backend")

    def _load_guarded(self, entry: str, dtype: str) -> None:
        with self._cond:
            self._loading.add(dtype)
        try:
            self._load(entry, dtype)
        finally:
            with self._cond:
                self._loading.discard(dtype)

    def _spawn(self, dtype: str, entries: list[str]) -> subprocess.Popen:
        return spawn_module("batchnorm.kernels._compile", [self.module, dtype, str(os.getpid()), *entries],
                            BATCHNORM_COMPILE="wait")

    def _after_fork(self) -> None:
        """In a forked child: no thread of the parent exists here."""
        self._cond = threading.Condition()
        for dtype in list(self._jobs):
            if dtype in self._loading:
                self._failed[dtype] = ("this process was forked while the kernels were being loaded "
                                       "(numba's compiler lock may be held by a thread that is not here)")
            elif self._jobs[dtype].ident is not None:
                self._jobs.pop(dtype)
        self._loading.clear()
        self._procs.clear()


def spawn_module(module: str, args: list[str], path_first: list[str] | None = None,
                 **env_extra: str) -> subprocess.Popen:
    """Start ``python -m module *args`` with this package importable (its directory first on
    ``PYTHONPATH``), ``path_first`` ahead of ``PATH``, ``env_extra`` set, no stdin and no stdout.
    The child is not a Unix session of its own: see :func:`_run_in_background`."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the package
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    if path_first:
        env["PATH"] = os.pathsep.join([*path_first, *filter(None, [env.get("PATH")])])
    env.update(env_extra)
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def _watch_parent(pid: int) -> None:
    """When the process that started this compiler is gone, point stdout and stderr at
    ``/dev/null`` (a pipe that reads the parent's output must not wait for the compiler) and
    keep compiling."""
    while os.getppid() == pid:
        time.sleep(0.5)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def compile_entries(kernels: Kernels, dtype: str, entries: list[str]) -> None:
    """Compile ``entries`` for ``dtype`` into numba's cache, under the lock, with a marker each."""
    lock = kernels.lock_path(dtype)
    if lock is None:
        raise RuntimeError("numba has no writable cache directory for the cpu backend (set NUMBA_CACHE_DIR)")
    with file_lock(lock):
        todo = [e for e in entries if not kernels.marker(e, dtype).exists()]  # type: ignore[union-attr]
        if not todo:
            return
        start = time.monotonic()
        name = kernels.module.rsplit(".", 1)[-1]
        say(f"compiling the {name} backend's kernels for {dtype} in the background, once per machine "
            f"(about 2-3 minutes on 2 cores; until then batch norm computes on the reference backend)")
        for entry in todo:
            kernels.entries[entry].compile(kernels.signature(entry, dtype))
            kernels.marker(entry, dtype).touch()  # type: ignore[union-attr]
        say(f"compiled the {name} backend's kernels for {dtype} in {time.monotonic() - start:.0f} s")


NICE = 19  # the compiler's niceness: the work of the processes that wait for it goes first


def _run_in_background() -> None:
    """The compiler's first step: a process group of its own, so that the terminal's Ctrl-C (sent to
    the foreground group) does not stop it half-way, and the lowest CPU priority, because until the
    kernels exist its callers compute on the reference backend, and a compiler that takes a core
    from them slows them more than the kernels, once there, speed them up. It stays in its caller's
    session: with the kernel's autogroup scheduling each session is one scheduling group with an
    equal share of the CPUs, and a compiler in a Unix session of its own took a whole core from the
    workers waiting for it whatever its niceness (``batchnorm demo`` from an empty cache on 2 cores:
    208 s that way, 59 s this way)."""
    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted (it leads its Unix session): stay in the caller's group
        pass
    try:
        os.nice(NICE - os.nice(0))
    except OSError:  # not permitted here: compile at the priority we have
        pass


def main(argv: list[str]) -> int:
    import importlib

    module, dtype, parent, *entries = argv
    _run_in_background()
    threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    kernels = importlib.import_module(module).KERNELS
    compile_entries(kernels, dtype, entries or list(kernels.entries))
    return 0
