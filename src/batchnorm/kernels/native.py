"""A native training call for small ``(N, C)`` inputs: ATen's kernel and the non-finite guard in
one C++ function (``native_train.cpp``), built once per machine in the background.

At ``(256, 100)`` a layer's training call is ATen's kernel (~45 us) plus what Python adds around
it; the guard that keeps a non-finite batch out of the running statistics
(:func:`batchnorm.kernels.aten.train`) costs 4-6 us of that in Python (numpy calls on the
buffers before and after ATen's), which left the layer at 0.91-0.93x torch's. Inside one native
call the guard is a copy and a test of ``2 C`` values, and the layer's call reaches torch's
(docs/performance.md). The guard's meaning is the same either way; until the extension is
loaded, and wherever it cannot be built, :func:`batchnorm.kernels.aten.train` runs the Python one.

Building: the first guarded call of a process asks :meth:`Native.request`, which (by default,
``BATCHNORM_COMPILE=background``) starts a thread that runs ``python -m
batchnorm.kernels._build_native`` at the lowest CPU priority; that process builds the file with
``torch.utils.cpp_extension.load`` (a C++ compiler and ninja: the ``fast`` and ``test`` extras
install ninja) into torch's extensions directory (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), under a directory named after the source's and torch's versions,
and the thread then imports the library. One line on stderr says when a build starts and one
when it ends (``BATCHNORM_QUIET=1`` silences them); about 20-40 s on 2 cores. A file lock makes
other processes wait for that build instead of starting their own (once per machine); a library
counts as built once a ``built`` marker beside it says so, and what a killed build left (torch's
lock file, a half-linked library) is cleared before the next build. A build that fails leaves a
``failed`` file with the compiler's message beside it, so later processes do not try again (delete
the directory to retry), and says once which guard is used instead. ``BATCHNORM_COMPILE=wait``
makes the first guarded call wait for the build (its builder at normal priority), and
``BATCHNORM_NATIVE=0`` turns the native call off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _jit

SOURCE = Path(__file__).with_name("native_train.cpp")
#: how long the thread waits for another process's build before it gives up (a compiler that hangs)
BUILD_TIMEOUT_S = 1800.0


def enabled() -> bool:
    """``BATCHNORM_NATIVE``: unset or ``1`` builds and uses the native call, ``0`` does not."""
    value = os.environ.get("BATCHNORM_NATIVE", "1") or "1"
    if value not in ("0", "1"):
        raise ValueError(f"BATCHNORM_NATIVE must be 0 or 1, got {value!r}")
    return value == "1"


def build_name() -> str:
    """The extension's name (and its directory's): the source's and torch's versions in it, so a
    changed source or another torch builds anew instead of loading a stale library."""
    import torch

    h = hashlib.sha1(SOURCE.read_bytes())
    h.update(f"{torch.__version__} {sys.version}".encode())
    return f"batchnorm_native_{h.hexdigest()[:12]}"


def build_dir(name: str) -> Path:
    """torch's directory for extension ``name`` (``TORCH_EXTENSIONS_DIR`` or its default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def _library(directory: Path, name: str) -> Path:
    return directory / f"{name}.so"


def _built(directory: Path) -> Path:
    """The marker written once a build has finished (a library without it may be half-linked)."""
    return directory / "built"


def _ninja_dirs() -> list[str]:
    try:
        import ninja  # the PyPI package: its binary sits in BIN_DIR
    except ImportError:
        return []
    return [str(ninja.BIN_DIR)]


def build(directory: Path, name: str, background: bool = False) -> None:
    """Build the extension into ``directory`` (made if missing) unless it is there, under the
    lock; a failure is written to ``directory / "failed"`` and raised. Run by the builder
    process (:mod:`batchnorm.kernels._build_native`)."""
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    with _jit.file_lock(directory / "batchnorm.lock"):
        failed = directory / "failed"
        if failed.exists():
            raise RuntimeError(failed.read_text().strip())
        if _built(directory).exists():
            return
        # what a killed build left: torch's own lock file (its FileBaton), which would make every
        # later load wait for ever, and perhaps a half-linked library, which ninja could take for
        # up to date; under our lock nobody of ours is building
        (directory / "lock").unlink(missing_ok=True)
        _library(directory, name).unlink(missing_ok=True)
        start = time.monotonic()
        _jit.say("building the native training call for small inputs" + (" in the background" if background else "")
                 + ", once per machine (about 20-40 s on 2 cores"
                 + ("; until then the Python guard runs, a few microseconds slower)" if background else ")"))
        try:
            load(name, [str(SOURCE)], build_directory=str(directory), extra_cflags=["-O2"], verbose=False)
        except Exception as exc:
            message = " ".join(str(exc).split())[-2000:]
            failed.write_text(f"building {SOURCE.name} failed (delete {directory} to try again): "
                              f"{type(exc).__name__}: {message}\n")
            raise
        _built(directory).touch()
        _jit.say(f"built the native training call in {time.monotonic() - start:.0f} s")


class Native:
    """The native training call of this process: :attr:`train` is ``None`` until it is loaded."""

    def __init__(self) -> None:
        self.train: Callable[..., tuple[Any, bool]] | None = None
        self.state = "idle"  # idle, building, ready, failed, off
        self.reason = ""  # why it is failed or off
        self._lock = threading.Lock()
        self._done = threading.Event()
        os.register_at_fork(after_in_child=self._after_fork)

    def request(self) -> Callable[..., tuple[Any, bool]] | None:
        """The call if it is loaded; else start getting it (in a thread; with
        ``BATCHNORM_COMPILE=wait`` now, returning it) and return ``None`` (the caller runs the Python guard)."""
        if self.train is not None or self.state != "idle":
            return self.train
        with self._lock:
            if self.state != "idle":
                return self.train
            if not enabled():
                self.state, self.reason = "off", "BATCHNORM_NATIVE=0"
                return None
            self.state = "building"
            if _jit.mode() == "wait":
                self._get(in_process=True)
                return self.train
            threading.Thread(target=self._get, kwargs={"in_process": False}, daemon=True,
                             name="batchnorm-native").start()
        return None

    def wait(self, timeout: float | None = None) -> Callable[..., tuple[Any, bool]] | None:
        """Request the call and wait until it is loaded or cannot be had; the call or ``None``."""
        self.request()
        if self.state == "building":
            self._done.wait(timeout)
        return self.train

    def _get(self, in_process: bool) -> None:
        try:
            name = build_name()
            directory = build_dir(name)
            failed = directory / "failed"
            if failed.exists():  # said by the process whose build failed; not tried again
                self.state, self.reason = "failed", failed.read_text().strip()
                return
            if not _built(directory).exists():
                self._build_elsewhere(directory, name, background=not in_process)
            module = self._import(directory, name)
            self.train = module.train
            self.state = "ready"
        except BaseException as exc:
            self.state, self.reason = "failed", f"{type(exc).__name__}: {exc}"
            _jit.say(f"the native training call is not available ({self.reason[:300]}); small training "
                     "calls use the Python guard")
        finally:
            self._done.set()

    @staticmethod
    def _build_elsewhere(directory: Path, name: str, background: bool) -> None:
        """Run the builder process and wait for it (the lowest CPU priority when ``background``)."""
        # torch runs `ninja` from PATH: the one pip installed beside this Python first (a virtual
        # environment's bin directory is on PATH only when it is activated)
        proc = _jit.spawn_module("batchnorm.kernels._build_native",
                                 [str(directory), name, str(os.getpid()), "background" if background else "wait"],
                                 path_first=_ninja_dirs())
        try:
            code = proc.wait(BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the build did not finish in {BUILD_TIMEOUT_S:.0f} s") from None
        if code != 0:
            failed = directory / "failed"
            raise RuntimeError(failed.read_text().strip() if failed.exists()
                               else f"the builder exited with status {code}")

    @staticmethod
    def _import(directory: Path, name: str) -> Any:
        path = _library(directory, name)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def _after_fork(self) -> None:
        """In a forked child: a thread that was building is not here; start over when asked."""
        self._lock = threading.Lock()
        if self.state == "building":
            self.state = "idle"
            self._done = threading.Event()


#: This process's native training call (:func:`batchnorm.kernels.aten.train` asks it).
NATIVE = Native()
