"""Where ATen's route beats ours for (N, C) training: a layer's forward+backward on each route.

For each shape, torch's ``nn.BatchNorm1d``, our ``BatchNorm1d`` on the ATen route (the limit
``kernels.aten.TRAIN_MAX_NUMEL`` lifted for the call) and on our numba route (the cpu backend
forced), interleaved, median of the rounds; ratios are torch's time / the route's. This is what
``TRAIN_MAX_NUMEL`` is set from (docs/results/2026-12-04-first-use-and-small-rows.md).

    python benchmarks/rows_route_bench.py [--threads 2] [--rounds 25] [--shape 512,256 --shape 4096,512] [--out F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import batchnorm as bn
from batchnorm import kernels
from batchnorm.kernels import aten

SHAPES = [(512, 256), (1024, 256), (2048, 256), (4096, 512), (8192, 512)]


def measure(shape: tuple[int, int], rounds: int) -> dict:
    from batchnorm.kernels import cpu

    for entry in cpu.KERNELS.entries:
        cpu.KERNELS.ready(entry, "float32", wait=True)
    x, g = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
    theirs, ours = torch.nn.BatchNorm1d(shape[1]), bn.BatchNorm1d(shape[1])
    limit = aten.TRAIN_MAX_NUMEL

    def on_aten() -> None:
        aten.TRAIN_MAX_NUMEL = 1 << 62
        try:
            ours(x).backward(g)
        finally:
            aten.TRAIN_MAX_NUMEL = limit

    def on_numba() -> None:
        with kernels.use_backend("cpu"):
            ours(x).backward(g)

    cases = {"torch": lambda: theirs(x).backward(g), "aten": on_aten, "numba": on_numba}
    for f in cases.values():
        for _ in range(10):
            f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    n = max(2, int(3e6 // (x.numel() + 20_000)))
    for _ in range(rounds):
        for k, f in cases.items():
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t0) / n * 1e6)
    us = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": list(shape), "us": us, "ratio_aten": us["torch"] / us["aten"],
            "ratio_numba": us["torch"] / us["numba"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--shape", action="append", help="N,C (repeatable; default: a ladder from 512x256 to 8192x512)")
    ap.add_argument("--out", help="write the results as JSON to this path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else SHAPES
    results = []
    for shape in shapes:
        r = measure(shape, args.rounds)  # type: ignore[arg-type]
        results.append(r)
        print(f"{str(tuple(shape)):>14} torch {r['us']['torch']:8.0f} us  ATen route {r['ratio_aten']:.2f}x  "
              f"numba route {r['ratio_numba']:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "rounds": args.rounds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
