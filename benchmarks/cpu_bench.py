"""CPU benchmark of the numba backend against ATen, at the target shape.

Targets ((32, 64, 56, 56) float32, 2 threads, ATen time / ours): training forward >= 2.0x,
channels_last training forward >= 1.25x, backward >= 1.2x, eval >= 0.9x, fused BN+ReLU
forward+backward >= 1.4x ATen BN then relu_.

    python benchmarks/cpu_bench.py [--threads 2] [--repeats 40] [--out cpu_bench.json]

It is ``batchnorm bench`` with the issue's defaults; it also prints the machine's load average,
because on shared machines other processes' load moves both columns.
"""

from __future__ import annotations

import argparse
import os
import sys

from batchnorm import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--passes", default=",".join(bench.PASSES))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--no-malloc-reuse", dest="malloc_reuse", action="store_false")
    p.add_argument("--out", default=None, metavar="FILE")
    args = p.parse_args(argv)
    print(f"load average before: {os.getloadavg()}")
    ns = argparse.Namespace(shape=args.shape or ["32,64,56,56"], layouts="contiguous,channels_last",
                            dtype=args.dtype, passes=args.passes, repeats=args.repeats, threads=args.threads,
                            device="cpu", compile=args.compile, out=args.out, json=False, quiet=False, clock=args.clock,
                            malloc_reuse=args.malloc_reuse)
    rc = bench.handler(ns)
    print(f"load average after: {os.getloadavg()}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
