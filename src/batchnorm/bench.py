"""``batchnorm bench``: our kernels against torch's native batch norm, side by side in one process.

For each case (shape, layout, dtype, pass) it times our public op and torch's native one
(optionally ``torch.compile`` of torch's), interleaving the repeats so that both see the same
machine load, and reports the medians, the ratio ``torch / ours`` (> 1: ours is faster), our
effective bandwidth over the pass's memory floor (the bytes the pass must
move at least) and that bandwidth as a fraction of this machine's measured copy bandwidth.
On a GPU (``--device cuda``) each call is timed with CUDA events after flushing L2 (see
``_cuda_times``), and half-precision inputs get float32 weight and bias (autocast's mixed mode).

Passes:

* ``train``: training forward, ``batchnorm.functional.batch_norm(training=True)`` vs
  ``torch.nn.functional.batch_norm`` (both update running statistics). Floor 1R+1W.
* ``eval``: inference forward with running statistics. Floor 1R+1W.
* ``backward``: the training backward (dx, dgamma, dbeta) as eager autograd runs it (the
  implementation behind the ``batchnorm::train_backward`` op) vs the backward autograd runs after
  torch's forward (``native_batch_norm_backward``; cuDNN's on a GPU when it took the forward). Floor 2R+1W.
* ``bn_relu``: fused BN+ReLU forward+backward (``BatchNormAct``'s eager entry point) vs ATen BN
  then ``relu_`` with autograd. Floor 1R+1W forward + 2R+1W backward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as TF

from batchnorm_cli.bench_args import DEFAULT_SHAPE, DTYPES, LAYOUTS, PASSES, parse_shape

__all__ = ["DTYPES", "LAYOUTS", "PASSES", "copy_bandwidth", "handler", "render", "reuse_large_allocations", "run",
           "time_side_by_side"]
FLOOR_PASSES = {"train": 2, "eval": 2, "backward": 3, "bn_relu": 5}  # tensor-sized reads + writes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_TIMER: Callable[[], float] = time.perf_counter


def reuse_large_allocations() -> bool:
    """Make glibc keep freed large blocks for reuse (``mallopt`` mmap/trim thresholds to 1 GiB).

    With glibc's defaults, a freed 25 MB output goes back to the OS and the next call of either
    contender page-faults a fresh mapping: ~10 ms on these machines, landing on whichever call
    comes first in a repeat. Reusing the heap measures the kernels (as a caching allocator would);
    both contenders get the same allocator. Returns whether it could be set.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))  # MMAP, TRIM thresholds
    except (OSError, AttributeError):
        return False


def _clock(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = _TIMER()
    fn()
    _sync(device)
    return _TIMER() - t0


#: Bytes zeroed before each timed call on a GPU, to evict the previous call's data from L2.
L2_FLUSH_BYTES = 256 << 20


def _cuda_times(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call between two CUDA events, L2 flushed before each (triton's ``do_bench``
    method): the GPU time of the call, plus any time the GPU waits for the call's host code."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    events = {k: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            flush.zero_()
            start, end = events[k][i]
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(device)
    return {k: [s.elapsed_time(e) * 1e-3 for s, e in ev] for k, ev in events.items()}


def time_side_by_side(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                      warmup: int = 3, allocator: dict[str, int] | None = None) -> dict[str, dict[str, float]]:
    """Median and min seconds of each function, repeats interleaved (a, b, c, a, b, c, ...).

    CPU: wall (or process) time of each call. GPU: CUDA-event time of each call (see
    :func:`_cuda_times`), and ``allocator`` (when given) gets :func:`_allocator_counts`' increase
    over the timed repeats; calls are not synchronized one by one, so host overhead counts only
    where the GPU has to wait for it, as in a training loop.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    before = _allocator_counts(device)
    if device.type == "cuda":
        times = _cuda_times(fns, repeats, device)
    else:
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(_clock(fn, device))
    if allocator is not None:
        after = _allocator_counts(device)
        allocator.update({k: after[k] - before[k] for k in after})
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}


def _allocator_counts(device: torch.device) -> dict[str, int]:
    """On a GPU, the caching allocator's counts of ``cudaMalloc`` segments and of allocation
    retries (each retry frees cached blocks, and ``cudaFree`` waits for the device): a case whose
    timing window sees new ones measures the allocator, not the kernels. Empty on the CPU."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"cuda_segments_allocated": int(stats.get("segment.all.allocated", 0)),
            "cuda_alloc_retries": int(stats.get("num_alloc_retries", 0))}


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 30) -> float:
    """Measured bytes/s of ``dst.copy_(src)`` (one read + one write) on a buffer of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_side_by_side({"copy": lambda: dst.copy_(src)}, repeats, device)["copy"]["median"]
    return 2 * src.numel() * 4 / t


def _make_cases(shape: tuple[int, ...], layout: str, dtype: torch.dtype, device: torch.device,
                passes: tuple[str, ...], with_compile: bool) -> list[tuple[str, dict[str, Callable[[], Any]]]]:
    import batchnorm.functional as F
    from batchnorm.ops import act_train
    from batchnorm.ops.plain import _train_backward_impl

    c = shape[1]
    x = torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    # half-precision activations get float32 parameters, as under autocast (cuDNN's mixed mode)
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.rand(c, dtype=pdtype, device=device) + 0.5
    b = torch.randn(c, dtype=pdtype, device=device)
    rm_ours, rv_ours = torch.zeros(c, dtype=pdtype, device=device), torch.ones(c, dtype=pdtype, device=device)
    rm_t, rv_t = torch.zeros(c, dtype=pdtype, device=device), torch.ones(c, dtype=pdtype, device=device)
    dy = torch.randn_like(x)
    eps = 1e-5
    cases: list[tuple[str, dict[str, Callable[[], Any]]]] = []
    compiled = None
    if with_compile:
        compiled = torch.compile(TF.batch_norm, dynamic=False)
    for name, training in (("train", True), ("eval", False)):
        if name not in passes:
            continue
        fns: dict[str, Callable[[], Any]] = {
            "ours": partial(F.batch_norm, x, rm_ours, rv_ours, w, b, training, 0.1, eps),
            "torch": partial(TF.batch_norm, x, rm_t, rv_t, w, b, training, 0.1, eps),
        }
        if compiled is not None:
            fns["compile"] = partial(compiled, x, rm_t, rv_t, w, b, training, 0.1, eps)
        cases.append((name, fns))
    if "backward" in passes:
        _, mean, var, count = torch.ops.batchnorm.train_forward(x, eps, w, b, None, 0)
        # torch's side is the backward autograd would run after this forward (native, or cuDNN on
        # a GPU); the running statistics are unused by a training backward
        _, smean, sinv, reserve, impl = torch.ops.aten._batch_norm_impl_index(
            x, w, b, rm_t, rv_t, True, 0.1, eps, True)
        mask3 = [True, True, True]
        cases.append(("backward", {
            "ours": lambda: _train_backward_impl(dy, x, mean, var, eps, w, None, count, 0, True),
            "torch": lambda: torch.ops.aten._batch_norm_impl_index_backward(
                impl, x, dy, w, None, None, smean, sinv, True, eps, mask3, reserve),
        }))
    if "bn_relu" in passes:
        xg = x.detach().clone().requires_grad_()
        wg = w.detach().clone().requires_grad_()
        bg = b.detach().clone().requires_grad_()
        leaves = (xg, wg, bg)

        # torch.autograd.grad: the gradients are returned, not accumulated into .grad (which would
        # add a full-tensor add_ to every call after the first)
        def ours_act() -> None:
            y = act_train(xg, None, eps, wg, bg, None, 0, "relu", 0.0)[0]
            torch.autograd.grad(y, leaves, dy)

        def torch_act() -> None:
            y = TF.batch_norm(xg, rm_t, rv_t, wg, bg, True, 0.1, eps)
            y.relu_()
            torch.autograd.grad(y, leaves, dy)

        fns = {"ours": ours_act, "torch": torch_act}
        if with_compile:
            cact = torch.compile(lambda t: TF.batch_norm(t, rm_t, rv_t, wg, bg, True, 0.1, eps).relu(),
                                 dynamic=False)
            fns["compile"] = lambda: torch.autograd.grad(cact(xg), leaves, dy)
        cases.append(("bn_relu", fns))
    return cases


def run(shapes: list[tuple[int, ...]], layouts: list[str], dtypes: list[torch.dtype], passes: tuple[str, ...],
        device: torch.device, repeats: int, with_compile: bool, log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    """Measure every case; returns the JSON-ready result (machine, copy bandwidth, rows)."""
    biggest = max(int(torch.tensor(s).prod()) for s in shapes) * 4
    bw = copy_bandwidth(biggest, device)
    rows = []
    for shape in shapes:
        for layout in layouts:
            if layout == "channels_last" and len(shape) not in (4, 5):
                continue
            for dtype in dtypes:
                for pname, fns in _make_cases(shape, layout, dtype, device, passes, with_compile):
                    allocator: dict[str, int] = {}
                    t = time_side_by_side(fns, repeats, device, allocator=allocator)
                    nbytes = FLOOR_PASSES[pname] * int(torch.tensor(shape).prod()) * torch.finfo(dtype).bits // 8
                    ours = t["ours"]["median"]
                    row = {
                        "shape": list(shape), "layout": layout, "dtype": str(dtype).replace("torch.", ""),
                        "pass": pname, "ours_ms": ours * 1e3, "torch_ms": t["torch"]["median"] * 1e3,
                        "ours_min_ms": t["ours"]["min"] * 1e3, "torch_min_ms": t["torch"]["min"] * 1e3,
                        "ratio": t["torch"]["median"] / ours,
                        "floor_bytes": nbytes, "gbps": nbytes / ours / 1e9, "copy_fraction": nbytes / ours / bw,
                    }
                    if "compile" in t:
                        row["compile_ms"] = t["compile"]["median"] * 1e3
                    row.update(allocator)  # GPU: new device memory the allocator needed while timing
                    rows.append(row)
                    grew = ", ".join(f"{v} {k}" for k, v in allocator.items() if v)
                    log(f"{pname:9s} {layout:13s} {row['ratio']:.2f}x" + (f" (while timing: {grew})" if grew else ""))
    return {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "clock": "cuda events" if device.type == "cuda" else "cpu" if _TIMER is time.process_time else "wall",
        },
        "copy_gbps": bw / 1e9,
        "repeats": repeats,
        "rows": rows,
    }


def render(result: dict[str, Any], stderr: bool = False) -> None:
    """Print the rows as a rich table (on stderr when stdout carries the JSON line)."""
    from rich.console import Console
    from rich.table import Table

    rows = result["rows"]
    has_compile = any("compile_ms" in r for r in rows)
    dtypes = sorted({r["dtype"] for r in rows})
    m = result["machine"]
    clock = m.get("clock", "wall")
    one_dtype = f"{dtypes[0]}, " if len(dtypes) == 1 else ""
    table = Table(title=f"batchnorm bench: {m['device']}, {one_dtype}{m['threads']} threads, copy "
                        f"{result['copy_gbps']:.1f} GB/s, median of {result['repeats']} ({clock} time)",
                  caption="ratio = torch ms / ours ms (> 1: ours is faster); contig = contiguous, "
                          "chlast = channels_last; %copy: our bandwidth / copy bandwidth",
                  box=None, pad_edge=False, header_style="bold")
    columns = ["shape", "layout", *(["dtype"] if not one_dtype else []), "pass", "ours ms", "torch ms",
               *(["compile ms"] if has_compile else []), "ratio", "GB/s", "%copy"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("layout", "pass", "dtype") else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            "x".join(map(str, r["shape"])), {"contiguous": "contig", "channels_last": "chlast"}[r["layout"]],
            *([r["dtype"]] if not one_dtype else []), r["pass"], f"{r['ours_ms']:.2f}", f"{r['torch_ms']:.2f}",
            *([f"{r['compile_ms']:.2f}" if "compile_ms" in r else "-"] if has_compile else []),
            f"{r['ratio']:.2f}x", f"{r['gbps']:.1f}", f"{r['copy_fraction']:.0%}",
        )
    Console(stderr=stderr).print(table)


def handler(args: argparse.Namespace) -> int:
    threads_before = torch.get_num_threads()
    try:
        return _handle(args)
    finally:
        torch.set_num_threads(threads_before)


def _handle(args: argparse.Namespace) -> int:
    global _TIMER
    malloc_reuse = getattr(args, "malloc_reuse", True) and reuse_large_allocations()
    clock = getattr(args, "clock", "wall")
    _TIMER = time.process_time if clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        from .cli import CommandError

        raise CommandError("no CUDA device available; use --device cpu (or auto)")
    dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    passes = tuple(p for p in args.passes.split(",") if p)
    unknown = set(passes) - set(PASSES)
    if unknown:  # the command line refuses these already; this is for scripts calling handler()
        print(f"error: unknown passes {sorted(unknown)}; choose from {PASSES}", file=sys.stderr)
        return 2
    shapes = [s if isinstance(s, tuple) else parse_shape(s) for s in args.shape]
    as_json = bool(getattr(args, "json", False))  # the JSON line alone on stdout: the rest goes to stderr
    log = partial(print, file=sys.stderr if as_json else sys.stdout)
    result = run(shapes, args.layouts.split(","), dtypes, passes, device,
                 args.repeats, args.compile, log=(lambda s: None) if args.quiet else log)
    result["machine"]["malloc_reuse"] = malloc_reuse
    render(result, stderr=as_json)
    out = getattr(args, "out", None)
    if out:
        tmp = f"{out}.tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(result, fh, indent=2)
            os.replace(tmp, out)
        except OSError as exc:
            from .cli import CommandError

            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise CommandError(f"cannot write {out}: {exc.strerror or exc}") from None
        print(f"wrote {out}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(result), flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    """Run ``batchnorm bench`` from its parsed options (:func:`batchnorm_cli.bench_args.add_arguments`)."""
    if not args.shape:
        args.shape = [DEFAULT_SHAPE]
    return handler(args)
