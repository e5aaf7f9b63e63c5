"""Core benchmark: our BN layers against torch's native batch norm, in one process.

For a few shapes, times the training forward, the eval forward and the backward (of the
training forward) of ``batchnorm.BatchNorm*d`` and ``torch.nn.BatchNorm*d`` and prints the
median of many repeats and the ratio torch/ours (> 1: ours is faster). Every backend the
dispatcher can use is measured (``reference`` = plain torch ops, ``auto`` = what a user gets).

    python benchmarks/core_bench.py [--repeats 30] [--threads 2] [--out out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import batchnorm as bn

SHAPES = [(100, 100), (256, 512), (32, 64, 56, 56), (32, 64, 56, 56, "channels_last"), (4, 32, 16, 32, 32)]


def _layers(shape):
    c = shape[1]
    rank = len(shape)
    ours = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}[rank](c)
    theirs = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank](c)
    return ours, theirs


def _median_time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _passes(layer, x, grad):
    def train_forward():
        layer.train()
        with torch.no_grad():
            layer(x)

    def eval_forward():
        layer.eval()
        with torch.no_grad():
            layer(x)

    def backward():
        layer.train()
        y = layer(x)
        y.backward(grad)

    return {"train_fwd": train_forward, "eval_fwd": eval_forward, "train_fwd+bwd": backward}


def run(repeats: int) -> list[dict]:
    rows = []
    for spec in SHAPES:
        layout = "channels_last" if spec[-1] == "channels_last" else "contiguous"
        shape = tuple(s for s in spec if isinstance(s, int))
        x = torch.randn(shape)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        ours, theirs = _layers(shape)
        reps = repeats if x.numel() < 1e6 else max(5, repeats // 3)
        torch_times = {k: _median_time(f, reps) for k, f in _passes(theirs, x, grad).items()}
        for backend in ["reference", "auto"]:
            with bn.use_backend(backend):
                for name, fn in _passes(ours, x, grad).items():
                    t = _median_time(fn, reps)
                    rows.append({
                        "shape": list(shape), "layout": layout, "pass": name, "backend": backend,
                        "ours_ms": t * 1e3, "torch_ms": torch_times[name] * 1e3,
                        "ratio_torch_over_ours": torch_times[name] / t,
                    })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.repeats)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} repeats; "
          "ratio = torch time / ours (> 1: ours faster)")
    print(f"{'shape':<22}{'layout':<15}{'pass':<15}{'backend':<11}{'ours ms':>10}{'torch ms':>10}{'ratio':>8}")
    for r in rows:
        print(f"{str(tuple(r['shape'])):<22}{r['layout']:<15}{r['pass']:<15}{r['backend']:<11}"
              f"{r['ours_ms']:>10.3f}{r['torch_ms']:>10.3f}{r['ratio_torch_over_ours']:>8.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
