"""Tile sweep of the Triton backend (rerun it on any machine with a CUDA GPU).

Times the backend's own entry points (training forward, backward, inference; plain and with ReLU)
for a few settings of its tiling constants, measured like ``batchnorm bench --device cuda`` (CUDA
events, L2 flushed before each call, settings interleaved per repeat), and prints one row per
setting with the sum over the cases. The defaults in ``batchnorm/kernels/triton_gpu.py`` come
from the run recorded in ``benchmarks/results/gpu_tile_sweep_h200_2026-11-30.json``
(docs/results/2026-11-30-gpu-h200.md).

    python benchmarks/gpu_tile_sweep.py [--shape 256,64,56,56] [--dtype bfloat16] [--repeats 60] [--out sweep.json]

``--device cpu`` (under ``TRITON_INTERPRET=1 BATCHNORM_TRITON=1``) is a dry run: every case runs
once in Triton's interpreter, untimed, for one setting per code path (CI runs it on a tiny shape,
so that a script broken by a change of the backends fails in CI, not on a GPU).

Settings are ``programs per SM, statistics tile in bytes, elementwise tile in elements``
(``_PROGRAMS_PER_SM``, ``_STATS_TILE_BYTES``, ``_APPLY_TILE``). Run it per dtype: the 2026-11-30
run (bfloat16) and the 2026-12-04 run (float32) chose the same 8 KiB statistics tile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

SETTINGS = [(8, 8192, 2048), (8, 16384, 2048), (8, 4096, 2048), (4, 8192, 2048), (16, 8192, 2048),
            (8, 8192, 4096), (8, 8192, 1024), (4, 8192, 4096)]
_KNOBS = ("_PROGRAMS_PER_SM", "_STATS_TILE_BYTES", "_APPLY_TILE")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="256,64,56,56")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--out", default=None, metavar="FILE", help="write the results to this JSON file")
    p.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1 BATCHNORM_TRITON=1")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure")
        return 0
    from batchnorm import bench
    from batchnorm.kernels import triton_gpu as tg

    dev = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cases = {}
    for layout in ("nchw", "channels_last"):
        x = torch.randn(shape, device=dev, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        w, b = torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev)
        dy = torch.randn_like(x)
        _, m, v, n = tg.forward_train(x, 1e-5, w, b, None, 0)
        for act in ("identity", "relu"):
            cases[f"{layout} train {act}"] = (
                lambda x=x, w=w, b=b, act=act: tg.forward_train_act(x, None, 1e-5, w, b, None, 0, act, 0.0))
            cases[f"{layout} backward {act}"] = (
                lambda x=x, w=w, b=b, dy=dy, m=m, v=v, n=n, act=act:
                tg.backward_train_act(dy, x, None, m, v, 1e-5, w, b, None, n, 0, act, 0.0))
        cases[f"{layout} eval"] = (lambda x=x, w=w, b=b, m=m, v=v: tg.forward_apply(x, m, v, 1e-5, w, b))
    defaults = tuple(getattr(tg, k) for k in _KNOBS)
    results: dict[str, dict[str, float]] = {}
    try:
        settings = SETTINGS if dev.type == "cuda" else SETTINGS[:1]  # a dry run: the kernels' one code path
        for setting in settings:
            for k, v in zip(_KNOBS, setting):
                setattr(tg, k, v)
            for fn in cases.values():  # compile this setting's kernels outside the timing
                fn()
            if dev.type != "cuda":  # dry run: each case ran once
                print(f"{setting}: ran {len(cases)} cases", flush=True)
                continue
            times = bench._cuda_times(cases, args.repeats, dev)
            med = {k: statistics.median(t) * 1e6 for k, t in times.items()}
            results[str(setting)] = med
            print(f"{setting}: total {sum(med.values()):7.1f} us | "
                  + " | ".join(f"{k} {t:.1f}" for k, t in med.items()), flush=True)
    finally:
        for k, v in zip(_KNOBS, defaults):
            setattr(tg, k, v)
    if not results:
        print("dry run: every setting ran")
        return 0
    best = min(results, key=lambda s: sum(results[s].values()))
    print(f"fastest: {best} (defaults {defaults})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(dev), "shape": shape, "dtype": args.dtype,
                       "repeats": args.repeats, "defaults": defaults, "results": results, "fastest": best},
                      fh, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
