"""Training activation memory of a small CNN with and without the in-place activated mode.

Rota Bulo et al. (2018): with an invertible activation, BN+act can keep only its output for the
backward and recover what it needs from it, instead of keeping its input as well. This script
builds the same CNN (conv -> BN+leaky_relu blocks) three ways and reports the bytes autograd
saves for one training step (unique storages, counted with ``saved_tensors_hooks``), which is the
activation memory a training step holds at its peak, plus a check that the gradients agree.

    python benchmarks/inplace_abn_memory.py [--batch 32] [--size 64] [--width 32] [--depth 6]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import batchnorm


def make_cnn(kind: str, width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False)]
    for i in range(depth):
        if kind == "torch":
            layers += [nn.BatchNorm2d(width), nn.LeakyReLU(0.01, inplace=True)]
        else:
            layers += [batchnorm.BatchNormAct2d(width, act="leaky_relu", negative_slope=0.01,
                                                inplace_abn=(kind == "inplace_abn"))]
        if i < depth - 1:
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return sum(storages.values()), grads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=6)
    args = p.parse_args(argv)
    x = torch.randn(args.batch, 3, args.size, args.size)
    results = {}
    for kind in ("torch", "fused", "inplace_abn"):
        torch.manual_seed(0)
        model = make_cnn(kind, args.width, args.depth)
        results[kind] = saved_bytes(model, x)
    base = results["torch"][0]
    for kind, (nbytes, _) in results.items():
        share = nbytes / base
        print(f"{kind:12s} saved for backward: {nbytes / 2**20:8.1f} MiB  ({share:.0%} of torch BN + LeakyReLU)")
    for kind in ("fused", "inplace_abn"):
        worst = max((a - b).abs().max().item() for a, b in zip(results[kind][1], results["torch"][1]))
        print(f"{kind:12s} max |grad - torch grad| = {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
