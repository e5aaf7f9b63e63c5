"""CPU inference of a small ResNet-style CNN with its BN layers folded into the convolutions vs not.

    python benchmarks/fold_bench.py [--bn torch|batchnorm] [--batch 32] [--size 32] [--repeats 200]

Both models are timed in alternation (so load on the machine hits both alike), each repeat is
one forward under ``torch.inference_mode``; the script prints the median, the ratio
``unfolded / folded`` (> 1 means folding is faster) and the largest relative output difference.
With one thread it also reports the thread's CPU time, which time slices lost to other
processes on a shared machine do not inflate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import batchnorm as B


def bn(c: int, kind: str) -> nn.Module:
    return nn.BatchNorm2d(c) if kind == "torch" else B.BatchNorm2d(c)


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, kind: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout, kind)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout, kind)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout, kind))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def resnet(kind: str, width: int = 16) -> nn.Module:
    """ResNet-20-like for 32x32 inputs: stem + 3 stages of 3 basic blocks (19 BN layers)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), bn(width, kind), nn.ReLU()]
    cin = width
    for i, c in enumerate((width, 2 * width, 4 * width)):
        for j in range(3):
            layers.append(Basic(cin, c, 2 if (i > 0 and j == 0) else 1, kind))
            cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def calibrated(model: nn.Module, shape) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if B.is_batchnorm(m):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
        model.train()
        for _ in range(3):
            model(torch.randn(*shape, generator=g))
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bn", choices=("torch", "batchnorm"), default="torch")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    model = calibrated(resnet(args.bn, args.width), shape)
    folded, report = B.fold(model, report=True)
    x = torch.randn(*shape)
    with torch.inference_mode():
        ref, out = model(x), folded(x)
        err = float((out - ref).abs().max() / ref.abs().max())
        for _ in range(10):  # warm-up (allocator, kernel selection, JIT)
            model(x), folded(x)
        wall: dict[str, list[float]] = {"unfolded": [], "folded": []}
        cpu: dict[str, list[float]] = {"unfolded": [], "folded": []}
        pair = [("unfolded", model), ("folded", folded)]
        for r in range(args.repeats):
            for name, m in pair if r % 2 == 0 else pair[::-1]:  # alternate which one goes first
                t, c = time.perf_counter(), time.thread_time()
                m(x)
                cpu[name].append(time.thread_time() - c)
                wall[name].append(time.perf_counter() - t)
    print(f"ResNet-20-like, width {args.width}, input {tuple(shape)}, {args.bn} BN, {args.threads} thread(s), "
          f"{args.repeats} repeats")
    print(f"BN layers folded: {len(report.folded)}, left: {len(report.unfolded)}; max relative output error {err:.2e}")
    clocks = [("wall", wall)]
    if args.threads == 1:  # with one thread the ops run in this thread: its CPU time ignores preemption
        clocks.append(("thread CPU", cpu))
    for clock, times in clocks:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{clock} time:")
        for k in ("unfolded", "folded"):
            q = statistics.quantiles(times[k], n=4)
            print(f"  {k:9s} median {med[k] * 1e3:8.3f} ms  (IQR {q[0] * 1e3:.3f}-{q[2] * 1e3:.3f} ms, "
                  f"min {min(times[k]) * 1e3:.3f} ms)")
        ratio = [u / f for u, f in zip(times["unfolded"], times["folded"])]
        print(f"  speed-up (unfolded / folded): {med['unfolded'] / med['folded']:.3f}x of the medians; "
              f"median of the paired ratios {statistics.median(ratio):.3f}x")


if __name__ == "__main__":
    main()
