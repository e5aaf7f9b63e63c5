"""The pipelined single launch of the Triton backend against its three-launch path, at full size
(rerun it on any machine with a CUDA GPU).

At (256, 64, 56, 56) the pipelined kernel has tens of thousands of programs, far more than fit on
the GPU at once, which is where its ticket ordering matters (the small shapes of
``tests/kernels/_triton_checks.py`` fit at once). On an NCHW input it checks the training forward
and backward of both paths against float64 statistics and each other, then times both like ``batchnorm bench``
(CUDA events, L2 flushed before each call, interleaved), and prints the fraction of the copy
bandwidth each reaches over the pass's floor (1R+1W forward, 2R+1W backward).

    python benchmarks/gpu_pipeline_check.py [--shape 256,64,56,56] [--dtype bfloat16] [--repeats 50] [--out F]

Run it under ``timeout``: a pipelined program waiting on a group that never completes would hang.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="256,64,56,56")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default=None, metavar="FILE", help="write the results to this JSON file")
    p.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1 BATCHNORM_TRITON=1")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check (the pipelined kernel is checked on the CPU under "
              "TRITON_INTERPRET=1 by tests/kernels/test_triton.py)")
        return 0
    from batchnorm import bench
    from batchnorm.kernels import triton_gpu as tg

    dev = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(shape, device=dev, dtype=dtype) * 2 + 1
    c = shape[1]
    w, b = torch.rand(c, device=dev) + 0.5, torch.randn(c, device=dev)
    dy = torch.randn_like(x)
    dims = [0] + list(range(2, x.dim()))
    m64 = x.double().mean(dims)
    v64 = x.double().var(dims, unbiased=False)
    var = v64.float()
    mean = m64.float()
    n = torch.tensor([x.numel() // c], dtype=torch.float32, device=dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    out: dict[str, object] = {"device": name, "shape": shape, "dtype": args.dtype}
    geo = tg._geometry(x)
    for pas, values in (("forward", 1), ("backward", 2)):  # tensors the statistics pass reads
        plan = geo.pipeline(x.element_size() * values)
        out[f"plan_{pas}"] = {"channels_per_group": plan.cg, "groups": plan.K, "stats_programs_per_group": plan.S,
                              "elementwise_programs_per_group": plan.A, "programs": plan.grid[0]}
        print(f"{pas} plan: {out[f'plan_{pas}']} (L2 {geo.l2_bytes >> 20} MiB)")
    ok = True
    results = {}
    for pipelined in (False, True):
        tg._PIPELINE = pipelined
        y, m, v, _ = tg.forward_train(x, 1e-5, w, b, None, 0)
        dx, dw, db = tg.backward_train(dy, x, mean, var, 1e-5, w, None, n, 0)
        bench._sync(dev)
        results[pipelined] = (y, dx, dw, db)
        err_m = ((m.double() - m64).abs() / v64.sqrt()).max().item()
        err_v = ((v.double() - v64).abs() / v64).max().item()
        print(f"pipelined={pipelined}: mean error {err_m:.1e} std, variance relative error {err_v:.1e}")
        ok &= err_m < 1e-5 and err_v < 1e-5
    (y0, dx0, dw0, db0), (y1, dx1, dw1, db1) = results[False], results[True]
    diffs = {"y": (y1.float() - y0.float()).abs().max().item(), "dx": (dx1.float() - dx0.float()).abs().max().item(),
             "dw": ((dw1 - dw0).abs() / dw0.abs().clamp_min(1)).max().item(),
             "db": ((db1 - db0).abs() / db0.abs().clamp_min(1)).max().item()}
    print("pipelined vs three launches (max abs; dw, db relative):", {k: f"{d:.1e}" for k, d in diffs.items()})
    tol = 0.05 if dtype in (torch.float16, torch.bfloat16) else 1e-4  # one rounding step of y and dx
    ok &= diffs["y"] <= tol and diffs["dx"] <= tol and diffs["dw"] < 1e-4 and diffs["db"] < 1e-4
    out["diffs"], out["correct"] = diffs, ok

    def run(pipelined: bool, fn):  # type: ignore[no-untyped-def]
        def call() -> None:
            tg._PIPELINE = pipelined
            fn()
        return call

    cases, passes = {}, {}
    for pas, fn in (("train", lambda: tg.forward_train(x, 1e-5, w, b, None, 0)),
                    ("backward", lambda: tg.backward_train(dy, x, mean, var, 1e-5, w, None, n, 0))):
        for pipelined, label in ((False, "three launches"), (True, "pipelined")):
            cases[f"{pas} {label}"] = run(pipelined, fn)
            passes[f"{pas} {label}"] = pas
    times = bench.time_side_by_side(cases, args.repeats, dev)
    bw = bench.copy_bandwidth(x.numel() * 4, dev)
    size = x.numel() * x.element_size()
    timing = {}
    for k, t in times.items():
        floor = bench.FLOOR_PASSES[passes[k]] * size  # the bench's floor for the pass
        timing[k] = {"us": t["median"] * 1e6, "copy_fraction": floor / t["median"] / bw}
        print(f"{k:26s} {t['median'] * 1e6:8.1f} us  {floor / t['median'] / bw:5.1%} of copy")
    out["timing"], out["copy_gbps"] = timing, bw / 1e9
    tg._PIPELINE = False
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {args.out}")
    print("correct" if ok else "WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
