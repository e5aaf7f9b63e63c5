"""Multi-process helpers: run a function on N gloo ranks on 127.0.0.1 and collect what each returns."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    torch.set_num_threads(1)
    # the numba backend would JIT-compile in every fresh process; the math under test is the same
    os.environ["BATCHNORM_BACKEND"] = "reference"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` gloo processes; returns the list of their results."""
    out = str(tmp_path)
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, out), nprocs=world, join=True,
                           start_method="fork")
    except Exception as e:
        errs = [open(os.path.join(out, f)).read() for f in sorted(os.listdir(out)) if f.endswith(".err")]
        raise AssertionError("a rank failed:\n" + "\n".join(errs)) from e
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
