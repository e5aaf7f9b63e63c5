"""Where the time of one ``batchnorm bench`` case goes on a GPU: torch's profiler around a few
calls of ours and of torch's side, the kernels (and the host ops) with their CUDA and CPU time.

    python benchmarks/gpu_profile.py [--shape 256,64,56,56] [--layout channels_last] [--dtype float32]
                                     [--pass bn_relu] [--calls 5] [--trace DIR]

The cases are ``batchnorm.bench``'s own (same tensors, same calls), so a ratio in the bench table
can be taken apart here. ``--trace DIR`` also writes a Chrome trace per side (chrome://tracing,
Perfetto). ``--device cpu`` profiles the CPU side instead (a dry run of the script, run in CI).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="256,64,56,56")
    p.add_argument("--layout", default="channels_last", choices=("contiguous", "channels_last"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--pass", dest="pas", default="bn_relu", help="train, eval, backward or bn_relu")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rows", type=int, default=15, help="rows of each table")
    p.add_argument("--trace", default=None, metavar="DIR")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to profile")
        return 0
    from torch.profiler import ProfilerActivity, profile

    from batchnorm import bench

    dev = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    cases = dict(bench._make_cases(shape, args.layout, getattr(torch, args.dtype), dev, (args.pas,), False))
    if args.pas not in cases:
        print(f"unknown pass {args.pas!r}: one of {', '.join(bench.PASSES)}")
        return 2
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    for side, fn in cases[args.pas].items():
        for _ in range(3):  # compiled and allocated outside the profile
            fn()
        bench._sync(dev)
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                fn()
            bench._sync(dev)
        print(f"== {side}: {args.pas} {args.layout} {args.dtype} {shape}, {args.calls} calls", flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60), flush=True)
        if args.trace:
            path = f"{args.trace}/{side}_{args.pas}_{args.layout}_{args.dtype}.json"
            prof.export_chrome_trace(path)
            print(f"wrote {path}")
    print("profiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
