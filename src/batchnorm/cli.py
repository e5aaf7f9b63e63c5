"""The ``batchnorm`` command line.

Each area of the package registers its own sub-commands (``register(subparsers)``):
the lab (demo, train, compare, figure1, claims, report) and the benchmarks (bench).

Errors never show a traceback. Exit codes:

* ``0``: done;
* ``2``: usage error, the command line asks for something invalid (a value out of range, an unknown
  model or norm, a path of the wrong kind); nothing was run or stored;
* ``1``: runtime failure, something the command needed failed (data files missing, corrupt or not the
  official ones, an unreadable store, an I/O error, a run that crashed);
* ``3``: a sweep stopped because a worker process died; the finished runs are stored, run it again;
* ``130``: interrupted (Ctrl-C).

Set ``BATCHNORM_TRACEBACK=1`` to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

__all__ = ["CommandError", "UsageError", "build_parser", "main"]

# Modules that contribute sub-commands; each exposes ``register(subparsers)``.
_COMMAND_MODULES = ("batchnorm.lab.commands", "batchnorm.bench")

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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): ``batchnorm train: error: argument --steps: ...``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchnorm",
        description="Batch normalization lab: train with and without BN, test the claims, benchmark kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an area not built yet must not break the others
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished runs are stored and will be reused", file=sys.stderr)
        return 130
    except CommandError as exc:
        _error(str(exc))
        return exc.code
    except Exception as exc:  # never a raw traceback; the message says how to get one
        if os.environ.get("BATCHNORM_TRACEBACK"):
            traceback.print_exc()
        _error(f"unexpected failure: {type(exc).__name__}: {exc} (set BATCHNORM_TRACEBACK=1 to see where; "
               "please report it)")
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
