"""The primitives the kernels are written in (element access, selects, reductions' lanes, the
stores that run a formula over a span), from one of two modules chosen when the package is
imported:

* :mod:`.simd` (the default): a 32-byte vector type and non-temporal stores, built on numba's
  type and lowering internals;
* :mod:`.plain` with ``BATCHNORM_CPU_SIMD=0``: scalar loops that LLVM vectorizes itself (no
  streaming stores), on numba's public API only -- the fallback when a numba release changes
  those internals.

Numba's cache does not key compiled code on the modules a kernel calls into, so the plain-loop
kernels are cached in a directory of their own (:data:`CACHE_DIR`, set while the kernel modules
are decorated, see :func:`decorating` and :func:`decorated`).
"""

from __future__ import annotations

import os
import sys

import numba

_VALUE = os.environ.get("BATCHNORM_CPU_SIMD", "")
if _VALUE not in ("", "0", "1"):
    raise ValueError(f"BATCHNORM_CPU_SIMD must be 0 or 1, got {_VALUE!r}")
#: Whether the kernels use the vector type of :mod:`.simd` (``BATCHNORM_CPU_SIMD`` unset or 1).
SIMD = _VALUE != "0"

if SIMD:
    from .simd import (
        LINE_BYTES,
        add_at,
        at,
        atc,
        hsum,
        keep,
        lanes,
        lanewise,
        pointers,
        store_rows,
        store_span,
        vfill,
        voidptr,
        vpos,
        where_gt,
        where_le,
        where_lt,
        widen,
    )
else:
    from .plain import (  # type: ignore[assignment]
        LINE_BYTES,
        add_at,
        at,
        atc,
        hsum,
        keep,
        lanes,
        lanewise,
        pointers,
        store_rows,
        store_span,
        vfill,
        voidptr,
        vpos,
        where_gt,
        where_le,
        where_lt,
        widen,
    )

__all__ = ["CACHE", "CACHE_DIR", "LINE_BYTES", "SIMD", "add_at", "at", "atc", "hsum", "keep", "lanes", "lanewise",
           "pointers", "store_rows", "store_span", "vfill", "voidptr", "vpos", "where_gt", "where_le", "where_lt",
           "widen"]


def _plain_cache_dir() -> str | None:
    """Where the plain-loop kernels are cached: ``plain-loops`` under ``NUMBA_CACHE_DIR`` or this
    package's ``__pycache__``; ``None`` if it cannot be written (they are then not cached)."""
    base = numba.config.CACHE_DIR or os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    path = os.path.join(base, "plain-loops")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None


#: ``numba.config.CACHE_DIR`` while the kernels are decorated (``None``: numba's own choice).
CACHE_DIR = None if SIMD else _plain_cache_dir()
#: Whether the kernels are cached on disk.
CACHE = SIMD or CACHE_DIR is not None
_SAVED = numba.config.CACHE_DIR


def decorating() -> None:
    """Point numba's cache at :data:`CACHE_DIR` (called before the first kernel is decorated)."""
    if CACHE_DIR is not None:
        numba.config.CACHE_DIR = CACHE_DIR


def decorated() -> None:
    """Give numba its cache directory back and key every kernel's cache on all the kernel modules
    (called after the last kernel is decorated).

    Numba keys a cached function on its own file's size and time, but a kernel's compiled code
    includes the functions it calls from the other modules: each kernel's key becomes those of
    every module of this package that this mode's kernels are built from (not ``__init__.py``,
    the Python entry points), so that editing any of them recompiles every kernel. (Numba's
    cache file object and its ``_source_stamp`` are internals: without them, the keys stay per
    file.)"""
    if CACHE_DIR is not None:
        numba.config.CACHE_DIR = _SAVED
    here = os.path.dirname(os.path.abspath(__file__))
    unused = {"__init__.py"} | ({"plain.py"} if SIMD else {"simd.py", "vector.py"})
    names = sorted(n for n in os.listdir(here) if n.endswith(".py") and n not in unused)
    stats = [os.stat(os.path.join(here, n)) for n in names]
    stamp = ("batchnorm-kernels", tuple((n, s.st_mtime, s.st_size) for n, s in zip(names, stats)))
    package = __name__.rpartition(".")[0]
    for name, module in list(sys.modules.items()):
        if not name.startswith(package + "."):
            continue
        for value in vars(module).values():
            cache_file = getattr(getattr(value, "_cache", None), "_cache_file", None)
            if hasattr(cache_file, "_source_stamp"):  # a numba dispatcher that caches
                cache_file._source_stamp = stamp
