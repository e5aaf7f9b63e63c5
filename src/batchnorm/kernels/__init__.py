"""Kernels: the backends that compute the batch-norm math.

Every backend is a module with the same functions (see :mod:`batchnorm.kernels.reference`
for the conventions and the exact semantics):

* ``forward_train(x, eps, weight, bias, mask, vbs, running=None) -> (y, mean, var, count)``;
  with ``running`` (a :class:`~batchnorm.kernels.reference.Running`: the running buffers and a
  float momentum; eager mode, one group, no mask) the call also moves the running statistics
  (``forward_train_act`` likewise): the cpu backend inside its compiled driver, the triton one
  in its kernel (not with ``skip_nonfinite``), else
  :func:`~batchnorm.kernels.reference.update_running`; with ``running.skip_nonfinite`` a batch
  whose statistics are not finite leaves them alone and sets ``running.accepted`` to False
* ``forward_apply(x, mean, var, eps, weight, bias) -> y``
* ``backward_train(dy, x, mean, var, eps, weight, mask, count, vbs, need_input_grad)``: from the
  training forward's statistics
* ``backward_apply(dy, x, mean, var, eps, weight, need_input_grad)``
* ``supports(op, x, mask, vbs) -> bool``: whether it can run ``op`` on this input.
* optional ``prepared(op, x, wait) -> bool``: whether its code for ``op`` on ``x`` is ready to
  run now (the cpu backend's compiled kernels, see :mod:`batchnorm.kernels._jit`); ``False``
  makes the dispatcher pass to the next backend, and the backend gets ready in the background;
  with ``wait`` (a forced backend) it waits until ready.

Every op takes the variance and ``eps``, never ``1 / sqrt(var + eps)``: each backend computes
that as :func:`~batchnorm.kernels.reference.inverse_std` does (the cpu one inside its compiled
driver, which saves two torch calls per call).

The dispatcher picks, per call, the first registered backend (in priority order) whose
``supports`` says yes and that is ``prepared``; ``reference`` supports everything and comes last.
A user can force a backend with :func:`set_backend`, the :func:`use_backend` context manager, or
the environment variable ``BATCHNORM_BACKEND``. A forced backend that cannot run a given call falls
back to ``reference`` (masks or ghost batches on a backend without them, for instance); one that
is not yet prepared is waited for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

from torch import Tensor

from . import reference

# name -> (priority, module); lower priority runs first.
_REGISTRY: dict[str, tuple[int, ModuleType]] = {"reference": (1000, reference)}
_ORDER: list[ModuleType] = [reference]  # the modules in priority order (kept by register_backend)
_forced: str | None = None


def register_backend(name: str, module: ModuleType, priority: int = 100) -> None:
    """Make ``module`` a backend called ``name``; lower ``priority`` is tried first."""
    _REGISTRY[name] = (priority, module)
    _ORDER[:] = [_REGISTRY[n][1] for n in available_backends()]


def available_backends() -> list[str]:
    """Names of the registered backends, in the order the dispatcher tries them."""
    return [name for name, _ in sorted(_REGISTRY.items(), key=lambda kv: kv[1][0])]


def _check_name(name: str) -> str:
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(
            f"unknown batch-norm backend {name!r}; available: {', '.join(['auto', *available_backends()])}"
        )
    return name


def _env_backend() -> str | None:
    """``BATCHNORM_BACKEND`` as set now (read on every call: it may change at run time), by the
    mapping behind ``os.environ`` where there is one (a tenth of ``os.environ.get``'s cost)."""
    if _ENV is None:
        return os.environ.get("BATCHNORM_BACKEND")
    value = _ENV[0].get(_ENV[1])
    return None if value is None else os.environ.decodevalue(value)  # type: ignore[attr-defined]


try:
    _ENV: tuple | None = (os.environ._data, os.environ.encodekey("BATCHNORM_BACKEND"))  # type: ignore[attr-defined]
except AttributeError:  # an os.environ without CPython's internals
    _ENV = None


def get_backend() -> str:
    """The forced backend name, or ``"auto"`` (the environment variable counts as forcing)."""
    if _forced is not None:
        return _forced
    return _check_name(_env_backend() or "auto")


def set_backend(name: str | None) -> None:
    """Force a backend for every later call (``None`` or ``"auto"``: choose per call)."""
    global _forced
    _forced = None if name in (None, "auto") else _check_name(name)  # type: ignore[arg-type]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager forcing a backend inside the ``with`` block."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


def select(op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> ModuleType:
    """The backend module that will run ``op`` on this input."""
    forced = get_backend()
    if forced != "auto":
        module = _REGISTRY[forced][1]
        if forced in _disabled or not module.supports(op, x, mask, vbs):
            return reference
        prepared = getattr(module, "prepared", None)
        return module if prepared is None or prepared(op, x, True) else reference
    for module in _ORDER:
        if module.name not in _disabled and module.supports(op, x, mask, vbs):
            prepared = getattr(module, "prepared", None)
            if prepared is None or prepared(op, x):
                return module
    return reference


# Backends that cannot run in this process: a child forked from a process whose numba thread pool
# runs on GNU OpenMP (which aborts the child at its first parallel region: "fork() called from a
# process already using GNU OpenMP"). Such a child computes on the reference backend; spawned
# processes (torchrun, mp.spawn, DataLoader with "spawn") are unaffected.
_disabled: set[str] = set()


def _after_fork_in_child() -> None:
    try:
        import numba

        layer = numba.threading_layer()
    except (ImportError, ValueError):  # numba missing, or its pool never started
        return
    if layer == "omp":
        _disabled.add("cpu")


#: backend module -> the third-party package whose absence leaves it unregistered
OPTIONAL_DEPENDENCIES = {"cpu": "numba", "triton_gpu": "triton"}


def _optional_dependency_missing(modname: str, exc: ModuleNotFoundError) -> bool:
    """Whether ``exc`` says that the optional package ``modname`` is built on is not installed
    (a missing ``numba`` for the cpu backend, ``triton`` for the triton one); any other failed
    import (a bug, a broken install of something else) is not tolerated."""
    wanted = OPTIONAL_DEPENDENCIES.get(modname)
    return wanted is not None and (exc.name or "").split(".")[0] == wanted


def _gpu_or_interpreter() -> bool:
    """Whether the triton backend can run here: a CUDA device, or triton's interpreter asked for
    (``TRITON_INTERPRET=1 BATCHNORM_TRITON=1``)."""
    import torch

    interpret = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("BATCHNORM_TRITON") == "1"
    return interpret or torch.cuda.is_available()


def _register_optional() -> None:
    """Register the fast backends. A backend whose optional package (:data:`OPTIONAL_DEPENDENCIES`)
    is not installed is left out; any other import error propagates."""
    import importlib

    for modname in ("aten", "cpu", "triton_gpu"):
        if modname == "triton_gpu" and not _gpu_or_interpreter():
            continue
        try:
            importlib.import_module(f"{__name__}.{modname}")
        except ModuleNotFoundError as exc:
            if not _optional_dependency_missing(modname, exc):
                raise
    if "cpu" in _REGISTRY:
        os.register_at_fork(after_in_child=_after_fork_in_child)


_register_optional()

__all__ = [
    "available_backends",
    "get_backend",
    "reference",
    "register_backend",
    "select",
    "set_backend",
    "use_backend",
]
