"""The ``batchnorm`` command line.

The arguments are parsed by :mod:`batchnorm_cli` without importing torch (so ``--help`` and usage errors
are instant); :func:`run` then imports the command (the lab's in :mod:`batchnorm.lab.commands`, ``bench``
in :mod:`batchnorm.bench`) and runs it.

Errors never show a traceback. Exit codes:

* ``0``: done;
* ``2``: usage error, the command line asks for something invalid (a value out of range, an unknown
  model or norm, a path of the wrong kind); nothing was run or stored;
* ``1``: runtime failure, something the command needed failed (data files missing, corrupt or not the
  official ones, an unreadable store, an I/O error, a run that crashed);
* ``3``: a sweep stopped because a worker process died; the finished runs are stored, run it again;
* ``130``: interrupted (Ctrl-C); ``143``: terminated (SIGTERM). Either stops a sweep within seconds (its
  workers end their runs in flight); the finished runs are stored, run it again to go on.

Set ``BATCHNORM_TRACEBACK=1`` to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback
from typing import Any

__all__ = ["CommandError", "UsageError", "build_parser", "main", "run"]

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure to report as one ``error: ...`` line with an exit code (1: runtime failure)."""

    code = EXIT_RUNTIME

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(CommandError):
    """The command line asks for something invalid (exit code 2)."""

    code = EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The ``batchnorm`` parser (:mod:`batchnorm_cli`: built without importing torch)."""
    from batchnorm_cli import build_parser as _build

    return _build()[0]


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The ``batchnorm`` command: :func:`batchnorm_cli.main` (parse, then :func:`run`)."""
    from batchnorm_cli import main as _main

    return _main(argv)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: one ``error: ...`` line and an exit code for every failure (module docstring)."""
    from batchnorm_cli import COMMANDS

    previous = _on_sigterm(_terminate)
    try:
        module, name = COMMANDS[args.command]
        func = getattr(importlib.import_module(module), name)
        return int(func(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through _terminate
        print("interrupted; finished runs are stored and will be reused", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except CommandError as exc:
        _error(str(exc))
        return exc.code
    except Exception as exc:  # never a raw traceback; the message says how to get one
        if os.environ.get("BATCHNORM_TRACEBACK"):
            traceback.print_exc()
        _error(f"unexpected failure: {type(exc).__name__}: {exc} (set BATCHNORM_TRACEBACK=1 to see where; "
               "please report it)")
        return EXIT_RUNTIME
    finally:
        _on_sigterm(previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, a container stopping), turned into the same orderly stop as
    Ctrl-C: sweeps end their workers, finished runs stay stored, the exit code is 143 (128 + 15)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _on_sigterm(handler: Any) -> Any:
    """Install ``handler`` for SIGTERM where a handler can be installed (the main thread); return the
    previous one (``None`` where nothing was changed)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
