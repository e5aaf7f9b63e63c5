"""GPU benchmark of the Triton backend (rerun it on any machine with a CUDA GPU).

The targets: (256, 64, 56, 56) bfloat16 forward+backward at >= 80% of the measured copy
bandwidth; >= 2x ATen on NCHW bfloat16; fused BN+ReLU >= 1.45x eager BN then ReLU.

    python benchmarks/gpu_bench.py [--shape 256,64,56,56] [--dtype bfloat16] [--repeats 50] [--out gpu.json]

It is ``batchnorm bench --device cuda`` with the issue's defaults (same table and JSON); measured
on an H200 on 2026-11-30: docs/results/2026-11-30-gpu-h200.md. Correctness on the same machine:
``python tests/kernels/_triton_checks.py`` (the CI's interpreter checks, compiled for the GPU).
"""

from __future__ import annotations

import argparse
import sys

import torch

from batchnorm import bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", default=None)
    p.add_argument("--dtype", default="bfloat16,float32")
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--passes", default=",".join(bench.PASSES))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="gpu_bench.json", metavar="FILE")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure (the Triton kernels are tested on the CPU under "
              "TRITON_INTERPRET=1 by tests/kernels/test_triton.py)")
        return 0
    ns = argparse.Namespace(shape=args.shape or ["256,64,56,56"], layouts=args.layouts, dtype=args.dtype,
                            passes=args.passes, repeats=args.repeats, threads=0, device="cuda",
                            compile=args.compile, out=args.out, json=False, quiet=False)
    return bench.handler(ns)


if __name__ == "__main__":
    sys.exit(main())
