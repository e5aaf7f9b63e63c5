"""The first-use and small-tensor performance targets, each as a ratio against torch measured in the same run.

* ``first_call``: the first ``BatchNorm2d`` training forward+backward in a fresh process with an
  empty numba cache (a new ``NUMBA_CACHE_DIR`` per run), against torch's ``nn.BatchNorm2d`` first
  call in a fresh process; runs alternate. Target: ours <= 3x torch's (``ratio`` here is ours /
  torch, lower is better; every other ratio is torch / ours, higher is better).
* ``small``: ``BatchNorm1d`` (256, 100) and ``BatchNorm2d`` (64, 64, 8, 8) training
  forward+backward (target >= 1.0x), (256, 100) eval forward (>= 1.0x), layers against torch's.
* ``mlp``: a training step of Linear-BN-ReLU x3 (width 256, batch 128, a Linear head, cross
  entropy, Adam) with our ``BatchNorm1d`` against the same model with torch's (>= 0.95x).
* ``large``: (32, 64, 56, 56) float32 backward (>= 1.2x) and training forward, NCHW and
  channels_last, as ``batchnorm bench`` times them (our backward op against ATen's).
* ``rows``: where ATen's route beats ours for ``(N, C)`` training (what
  ``kernels.aten.TRAIN_MAX_NUMEL`` is set from): our ``BatchNorm1d`` forward+backward on the ATen
  route (the limit lifted for the call) and on our numba route (the cpu backend forced), each
  against torch's layer, from (512, 256) to (8192, 512). No target; not in the default set.

Ratios are medians over interleaved repeats (ours, torch, ours, torch, ...), ``--threads``
intra-op threads (default 2). Our layers run the backend the dispatcher picks; the compiled cpu
kernels are made ready before anything is timed (``first_call`` aside, which is about that).
Results go to ``--out`` as JSON (nothing is written without it) and a table to stdout::

    python benchmarks/first_call_bench.py --out first_call_small_tensors.json
    python benchmarks/first_call_bench.py --only small,mlp --repeats 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TARGETS = ("first_call", "small", "mlp", "large", "rows")
DEFAULT = ("first_call", "small", "mlp", "large")
ROWS = [(512, 256), (1024, 256), (2048, 256), (4096, 512), (8192, 512)]

_FIRST_CALL = r"""
import sys, time
import torch
torch.set_num_threads({threads})
if sys.argv[1] == "ours":
    import batchnorm as bn
    layer = bn.BatchNorm2d(16)
else:
    layer = torch.nn.BatchNorm2d(16)
x = torch.randn(8, 16, 8, 8, requires_grad=True)
t0 = time.perf_counter()
layer(x).sum().backward()
t1 = time.perf_counter()
print(t1 - t0)
if sys.argv[1] == "ours" and "cpu" in bn.available_backends():  # the compiler it started, to stop
    from batchnorm.kernels import cpu
    for _ in range(100):
        if "float32" in cpu.KERNELS._procs:
            print(cpu.KERNELS._procs["float32"].pid)
            break
        time.sleep(0.05)
"""


def first_call(runs: int, threads: int) -> dict[str, Any]:
    """Seconds of the first training forward+backward, fresh processes, ours with an empty cache."""
    code = _FIRST_CALL.format(threads=threads)
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for _ in range(runs):
        for who in ("ours", "torch"):
            with tempfile.TemporaryDirectory(prefix="bn-numba-cache-") as cache:
                env = {**os.environ, "NUMBA_CACHE_DIR": cache, "BATCHNORM_QUIET": "1"}
                env.pop("BATCHNORM_BACKEND", None)
                env.pop("BATCHNORM_COMPILE", None)
                out = subprocess.run([sys.executable, "-c", code, who], env=env, capture_output=True,
                                     text=True, timeout=1200, check=True)
                lines = out.stdout.split()
                times[who].append(float(lines[0]))
                if len(lines) > 1:  # the compiler outlives its process; its cache is thrown away here
                    try:
                        os.kill(int(lines[1]), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["torch"])
    return {"what": "first BatchNorm2d(16) training forward+backward on (8, 16, 8, 8), fresh process, "
                    "empty numba cache; ratio = ours / torch (target <= 3)",
            "ours_s": ours, "torch_s": theirs, "ratio": ours / theirs, "goal": 3.0, "runs": times}


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, inner: int, warmup: int = 20) -> dict[str, float]:
    """Median seconds per call of each function; each repeat times ``inner`` calls of each in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def _pair(name: str, ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int, inner: int,
          target: float) -> dict[str, Any]:
    t = _interleaved({"ours": ours, "torch": theirs}, repeats, inner)
    return {"what": name, "ours_s": t["ours"], "torch_s": t["torch"], "ratio": t["torch"] / t["ours"],
            "goal": target}


def _layer_fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], Any]:
    params = [p for p in layer.parameters()]

    def step() -> None:
        y = layer(x)
        torch.autograd.grad(y, [x, *params], dy)

    return step


def _layer_eval(layer: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


def _python_guard(step: Callable[[], Any]) -> Callable[[], Any]:
    """``step`` with the native training call hidden: the layer runs the Python guard."""
    from batchnorm.kernels.native import NATIVE

    def run() -> None:
        call, NATIVE.train = NATIVE.train, None
        try:
            step()
        finally:
            NATIVE.train = call

    return run


def small(repeats: int) -> list[dict[str, Any]]:
    import batchnorm as bn
    from batchnorm.kernels.native import NATIVE

    out = []
    native = NATIVE.wait() is not None  # built once per machine (kernels/native.py)
    for shape, ours_cls, torch_cls in (((256, 100), bn.BatchNorm1d, nn.BatchNorm1d),
                                      ((64, 64, 8, 8), bn.BatchNorm2d, nn.BatchNorm2d)):
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        name = f"{torch_cls.__name__} {shape} training forward+backward"
        # more contenders in the same interleaving, not targets: our layer without its non-finite guard,
        # and (where the guard runs natively) with the guard in Python, as before the native call is loaded
        steps = {"ours": _layer_fwd_bwd(ours_cls(shape[1]), x, dy),
                 "unguarded": _layer_fwd_bwd(ours_cls(shape[1], nonfinite="propagate"), x, dy),
                 "torch": _layer_fwd_bwd(torch_cls(shape[1]), x, dy)}
        if native and len(shape) == 2:
            steps["python_guard"] = _python_guard(_layer_fwd_bwd(ours_cls(shape[1]), x, dy))
        t = _interleaved(steps, repeats, 10)
        out.append({"what": name, "ours_s": t["ours"], "torch_s": t["torch"], "ratio": t["torch"] / t["ours"],
                    "goal": 1.0, "native_guard": native})
        out.append({"what": name + ", nonfinite='propagate' (no guard; not a target)", "ours_s": t["unguarded"],
                    "torch_s": t["torch"], "ratio": t["torch"] / t["unguarded"], "goal": None})
        if "python_guard" in t:
            out.append({"what": name + ", guard in Python (not a target)", "ours_s": t["python_guard"],
                        "torch_s": t["torch"], "ratio": t["torch"] / t["python_guard"], "goal": None})
    x = torch.randn(256, 100)
    ours, theirs = bn.BatchNorm1d(100).eval(), nn.BatchNorm1d(100).eval()
    out.append(_pair("BatchNorm1d (256, 100) eval forward", _layer_eval(ours, x), _layer_eval(theirs, x),
                     repeats, 20, 1.0))
    return out


def _mlp(norm: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(256, 256, bias=False), norm(256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def mlp(repeats: int) -> dict[str, Any]:
    import batchnorm as bn

    x, target = torch.randn(128, 256), torch.randint(0, 10, (128,))
    steps = {}
    for who, norm in (("ours", bn.BatchNorm1d), ("torch", nn.BatchNorm1d)):
        model = _mlp(norm, 0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), target).backward()
            opt.step()

        steps[who] = step
    t = _interleaved(steps, repeats, 5)
    return {"what": "MLP training step: (Linear(256, 256)-BN-ReLU) x3 + Linear(256, 10), batch 128, Adam",
            "ours_s": t["ours"], "torch_s": t["torch"], "ratio": t["torch"] / t["ours"], "goal": 0.95}


def large(repeats: int) -> list[dict[str, Any]]:
    import batchnorm.functional as F
    from batchnorm.ops.plain import _train_backward_impl

    out = []
    shape = (32, 64, 56, 56)
    eps = 1e-5
    for layout in ("contiguous", "channels_last"):
        x = torch.randn(shape)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        w, b = torch.rand(c) + 0.5, torch.randn(c)
        dy = torch.randn_like(x)
        rm, rv, rm_t, rv_t = torch.zeros(c), torch.ones(c), torch.zeros(c), torch.ones(c)
        _, mean, var, count = torch.ops.batchnorm.train_forward(x, eps, w, b, None, 0)
        _, smean, sinv, reserve, impl = torch.ops.aten._batch_norm_impl_index(x, w, b, rm_t, rv_t, True, 0.1, eps, True)
        out.append(_pair(
            f"{shape} float32 {layout} backward",
            lambda x=x, dy=dy, w=w, mean=mean, var=var, count=count: _train_backward_impl(
                dy, x, mean, var, eps, w, None, count, 0, True),
            lambda x=x, dy=dy, w=w, smean=smean, sinv=sinv, reserve=reserve, impl=impl:
                torch.ops.aten._batch_norm_impl_index_backward(impl, x, dy, w, None, None, smean, sinv, True, eps,
                                                               [True, True, True], reserve),
            repeats, 1, 1.2))
        out.append(_pair(
            f"{shape} float32 {layout} training forward",
            lambda x=x, w=w, b=b, rm=rm, rv=rv: F.batch_norm(x, rm, rv, w, b, True, 0.1, eps),
            lambda x=x, w=w, b=b, rm=rm_t, rv=rv_t: torch.nn.functional.batch_norm(x, rm, rv, w, b, True, 0.1, eps),
            repeats, 1, 1.25 if layout == "channels_last" else 2.0))
    return out


def rows(repeats: int) -> list[dict[str, Any]]:
    import batchnorm as bn
    from batchnorm import kernels
    from batchnorm.kernels import aten

    out = []
    for shape in ROWS:
        x, dy = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
        step = _layer_fwd_bwd(bn.BatchNorm1d(shape[1]), x, dy)
        limit = aten.TRAIN_MAX_NUMEL

        def on_aten(step=step, limit=limit) -> None:
            aten.TRAIN_MAX_NUMEL = 1 << 62
            try:
                step()
            finally:
                aten.TRAIN_MAX_NUMEL = limit

        def on_numba(step=step) -> None:
            with kernels.use_backend("cpu"):
                step()

        inner = max(1, int(3e6 // (x.numel() + 20_000)))
        t = _interleaved({"torch": _layer_fwd_bwd(nn.BatchNorm1d(shape[1]), x, dy), "aten": on_aten,
                          "numba": on_numba}, repeats, inner, warmup=5)
        out += [{"what": f"BatchNorm1d {shape} training forward+backward, {route} route", "ours_s": t[route],
                 "torch_s": t["torch"], "ratio": t["torch"] / t[route], "goal": None} for route in ("aten", "numba")]
    return out


def _ready_kernels() -> str:
    """Make the cpu backend's float32 kernels ready (compiled or loaded) before timing."""
    import batchnorm as bn

    if "cpu" not in bn.available_backends():
        return "reference (numba not installed)"
    from batchnorm.kernels import cpu

    for entry in cpu.KERNELS.entries:
        cpu.KERNELS.ready(entry, "float32", wait=True)
    return "cpu kernels ready"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help=f"comma-separated subset of {', '.join(TARGETS)} (default: {', '.join(DEFAULT)})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200, help="interleaved repeats (small, mlp; large: a fifth)")
    parser.add_argument("--first-call-runs", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(only) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from batchnorm.bench import reuse_large_allocations

    reuse_large_allocations()
    result: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load": os.getloadavg()},
        "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "results": [],
    }
    if "first_call" in only:
        result["results"].append({"target": "first_call", **first_call(args.first_call_runs, args.threads)})
    if set(only) - {"first_call"}:
        result["backend"] = _ready_kernels()
    if "small" in only:
        result["results"] += [{"target": "small", **r} for r in small(args.repeats)]
    if "mlp" in only:
        result["results"].append({"target": "mlp", **mlp(args.repeats)})
    if "large" in only:
        result["results"] += [{"target": "large", **r} for r in large(max(10, args.repeats // 5))]
    if "rows" in only:
        result["results"] += [{"target": "rows", **r} for r in rows(max(10, args.repeats // 8))]
    result["machine"]["load_after"] = os.getloadavg()
    for r in result["results"]:
        print(f"{r['target']:>10}  {r['ratio']:6.2f}x  ours {r['ours_s'] * 1e3:9.3f} ms  "
              f"torch {r['torch_s'] * 1e3:9.3f} ms  {r['what']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
