"""Data-parallel training on the CPU with DDP and batchnorm.SyncBatchNorm (gloo backend).

Launch one process per worker (here 2, on one machine; add --nnodes/--node_rank/--master_addr
to span several machines):

    torchrun --nproc_per_node 2 examples/ddp_train.py --epochs 8

Each rank trains on its own shard of MNIST-1D (generated locally by the ``mnist1d`` package;
``--synthetic`` for random data), with per-rank batches of different sizes on purpose
(``--batch`` on rank 0, ``--batch + --uneven`` on the others): SyncBatchNorm merges the ranks'
counts, means and variances exactly, so every BN layer normalizes with the statistics of the
global batch, and DDP averages the gradients. At the end the script checks that every rank
holds identical parameters and running statistics and evaluates the model on the test set.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import batchnorm as B


def load_data(synthetic: bool, seed: int = 0):
    if not synthetic:
        try:
            from mnist1d.data import get_dataset_args, make_dataset

            args = get_dataset_args()
            args.seed = seed
            d = make_dataset(args)
            as_t = lambda a: torch.as_tensor(a)  # noqa: E731
            return (as_t(d["x"]).float(), as_t(d["y"]).long(), as_t(d["x_test"]).float(), as_t(d["y_test"]).long())
        except ImportError:
            print("mnist1d is not installed: using synthetic data")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 10, generator=g)
    x = torch.randn(5000, 40, generator=g)
    y = (x @ w + 0.5 * torch.randn(5000, 10, generator=g)).argmax(1)
    return x[:4000], y[:4000], x[4000:], y[4000:]


def make_model() -> nn.Module:
    """A small 1-D CNN written with plain torch layers, then converted to SyncBatchNorm."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 32, 5, padding=2, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 32, 3, padding=1, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 64, 3, padding=1, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=48, help="per-rank batch on rank 0")
    p.add_argument("--uneven", type=int, default=32, help="extra samples per batch on the other ranks")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # reads RANK, WORLD_SIZE, MASTER_ADDR/PORT set by torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere (DDP broadcasts rank 0's anyway)

    x, y, x_test, y_test = load_data(args.synthetic)
    x_mean, x_std = x.mean(0), x.std(0)
    x, x_test = (x - x_mean) / x_std, (x_test - x_mean) / x_std
    shard = torch.arange(rank, len(x), world)  # rank r gets samples r, r + world, ...
    xs, ys = x[shard], y[shard]
    batch = args.batch + (args.uneven if rank > 0 else 0)

    model = DDP(B.convert(make_model(), "sync"))  # every BN becomes batchnorm.SyncBatchNorm
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps = len(xs) // (args.batch + args.uneven)  # the same number of steps on every rank
    if rank == 0:
        print(f"world {world}, per-rank batches {[args.batch] + [args.batch + args.uneven] * (world - 1)}, "
              f"{steps} steps/epoch, model: {sum(p.numel() for p in model.parameters())} parameters")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        g = torch.Generator().manual_seed(1000 * epoch + rank)
        order = torch.randperm(len(xs), generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        t0 = time.perf_counter()
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            out = model(xs[idx])
            loss = TF.cross_entropy(out, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == ys[idx]).sum())
            total += len(idx)
        stats = torch.tensor([loss_sum, correct, total], dtype=torch.float64)
        dist.all_reduce(stats)
        # eval on the test set: SyncBatchNorm does not communicate in eval mode
        net = model.module.eval()
        with torch.no_grad():
            acc = float((net(x_test).argmax(1) == y_test).float().mean())
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {stats[0] / stats[2]:.4f} acc {stats[1] / stats[2]:.4f} "
                  f"test acc {acc:.4f} ({time.perf_counter() - t0:.1f}s)")
    elapsed = time.perf_counter() - start

    # every rank must hold the same parameters and running statistics
    flat = torch.cat([t.detach().double().reshape(-1) for t in model.module.state_dict().values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
    if rank == 0:
        n_sync = sum(isinstance(m, B.SyncBatchNorm) for m in model.module.modules())
        print(f"done in {elapsed:.1f}s; {n_sync} SyncBatchNorm layers; max difference of the state across "
              f"ranks: {diff:.3g}; final test accuracy {acc:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" not in os.environ:
        raise SystemExit("launch with: torchrun --nproc_per_node 2 examples/ddp_train.py")
    main()
