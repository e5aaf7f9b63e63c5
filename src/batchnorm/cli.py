"""The ``batchnorm`` command line.

Each area of the package registers its own sub-commands (``register(subparsers)``):
the lab (demo, train, compare, figure1, claims, report) and the benchmarks (bench).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands; each exposes ``register(subparsers)``.
_COMMAND_MODULES = ("batchnorm.lab.commands", "batchnorm.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm",
        description="Batch normalization lab: train with and without BN, test the claims, benchmark kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an area not built yet must not break the others
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished runs are stored and will be reused", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
