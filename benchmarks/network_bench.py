"""Our batch norm inside a network: a stack of conv3x3-BN-ReLU layers with torch's BatchNorm2d
against the same stack with ours, on the CPU.

The kernel benchmarks (``batchnorm bench``) time one op in a loop on the same tensors; in a
network the op runs right after a convolution, from cold caches, and the next layer reads its
output. This times what a user sees there:

* the training step (forward, ``sum().backward()``) and the inference forward of both stacks,
  repeats interleaved (torch, ours, torch, ours, ...), median;
* with the torch profiler, each BN call's time (torch: ``aten::native_batch_norm`` and its
  backward; ours: the autograd function of the training op, Python included).

    python benchmarks/network_bench.py [--shape 64,64,8,8] [--layers 4] [--threads 2]
                                       [--repeats 40] [--out network_bench.json]

Weights are copied from the torch stack to ours, so both compute the same function.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import batchnorm
from batchnorm import bench


def stack(bn: type, channels: int, layers: int) -> torch.nn.Sequential:
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False), bn(channels), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods)


def bn_call_times(model: torch.nn.Module, x: torch.Tensor, steps: int, ours: bool) -> dict[str, float]:
    """Microseconds per BN call (forward, backward) from the torch profiler's self CPU time."""
    # ours: the layers' lean path (_TrainLean, the cpu backend) or the operator route (_train_forward)
    names = ((("_TrainLean", "_train_forward"), ("_TrainLeanBackward", "_train_forwardBackward")) if ours
             else (("aten::native_batch_norm",), ("aten::native_batch_norm_backward",)))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model(x).sum().backward()
    found = {e.key: e for e in prof.key_averages()}
    out = {}
    for label, keys in zip(("forward_us", "backward_us"), names):
        e = next((found[k] for k in keys if k in found), None)
        out[label] = float("nan") if e is None else e.self_cpu_time_total / e.count
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64,64,8,8", help="input N,C,H,W")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--out", default=None, metavar="FILE", help="write the results to this JSON file")
    p.add_argument("--no-malloc-reuse", dest="malloc_reuse", action="store_false",
                   help="leave glibc's allocator settings alone (see bench.reuse_large_allocations)")
    args = p.parse_args(argv)
    try:
        n, c, h, w = (int(v) for v in args.shape.split(","))
    except ValueError:
        p.error(f"--shape takes N,C,H,W (four integers), got {args.shape!r}")
    if min(n, c, h, w, args.layers, args.repeats) < 1:
        p.error("--shape entries, --layers and --repeats must be positive")
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, n, c, h, w)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, n: int, c: int, h: int, w: int) -> int:
    if args.malloc_reuse:
        bench.reuse_large_allocations()
    torch.manual_seed(0)
    theirs = stack(torch.nn.BatchNorm2d, c, args.layers)
    ours = stack(batchnorm.nn.BatchNorm2d, c, args.layers)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(n, c, h, w)
    cpu = torch.device("cpu")

    def step(model: torch.nn.Module):  # type: ignore[no-untyped-def]
        return lambda: model(x).sum().backward()

    train = bench.time_side_by_side({"torch": step(theirs), "ours": step(ours)}, args.repeats, cpu)
    with torch.no_grad():
        infer = bench.time_side_by_side({"torch": lambda: theirs(x), "ours": lambda: ours(x)}, args.repeats, cpu)
    calls = {"torch": bn_call_times(theirs, x, 20, False), "ours": bn_call_times(ours, x, 20, True)}
    result = {
        "shape": [n, c, h, w], "layers": args.layers, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "train_step_ms": {k: v["median"] * 1e3 for k, v in train.items()},
        "inference_ms": {k: v["median"] * 1e3 for k, v in infer.items()},
        "bn_call_us": calls,
    }
    print(f"{args.layers} x conv3x3-BN-ReLU on {tuple(x.shape)}, {result['threads']} threads, median of {args.repeats}")
    for label, ms in (("training step", result["train_step_ms"]), ("inference", result["inference_ms"])):
        ratio = ms["torch"] / ms["ours"]
        print(f"{label}: torch {ms['torch']:.2f} ms, ours {ms['ours']:.2f} ms (torch/ours {ratio:.2f}x)")
    for k, v in calls.items():
        print(f"BN per call ({k}): forward {v['forward_us']:.0f} us, backward {v['backward_us']:.0f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
