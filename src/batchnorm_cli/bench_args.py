"""``batchnorm bench``'s options, stdlib only: the front parser builds the sub-command from them, so
``batchnorm bench --help`` and a bad value are answered before torch is imported."""

from __future__ import annotations

import argparse
import math
import os

PASSES = ("train", "eval", "backward", "bn_relu")
DTYPES = ("float16", "bfloat16", "float32", "float64")
LAYOUTS = ("contiguous", "channels_last")
MAX_ELEMENTS = 1 << 34  # 16 Gi elements: a typo, not a benchmark
DEFAULT_SHAPE = (32, 64, 56, 56)

DESCRIPTION = """\
Time our batch-norm kernels against torch's native batch norm, side by side in one process.

For each case (shape, layout, dtype, pass) it times our public op and torch's native one (optionally
torch.compile of torch's), interleaving the repeats so that both see the same machine load, and reports
the medians, the ratio torch / ours (> 1: ours is faster), our effective bandwidth over the pass's memory
floor and that bandwidth as a fraction of this machine's measured copy bandwidth.

Passes: train (training forward, both update running statistics; floor 1R+1W), eval (inference with
running statistics; 1R+1W), backward (dx, dgamma, dbeta after a training forward; 2R+1W), bn_relu (fused
BN+ReLU forward+backward vs ATen BN then relu_; 3R+2W)."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``N,C[,L | ,H,W | ,D,H,W]`` (``x`` also separates): 2 to 5 integers >= 1."""
    try:
        shape = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; expected 2 to 5 integers >= 1 such as "
                                         "32,64,56,56 (N,C,H,W)") from None
    if not 2 <= len(shape) <= 5:
        raise argparse.ArgumentTypeError(f"{text!r} has {len(shape)} dimension(s); expected 2 to 5 (N,C[,L|H,W|D,H,W])")
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty dimension; every size must be >= 1")
    if shape[0] * math.prod(shape[2:]) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} has one value per channel; training batch norm needs at "
                                         "least 2 (N x spatial sizes >= 2)")
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise argparse.ArgumentTypeError(f"{text!r} has {n} elements; at most {MAX_ELEMENTS}")
    return shape


def _int_range(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {lo}..{hi}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range; expected an integer from {lo} to {hi}")
        return v

    return parse


def _choices_list(choices: tuple[str, ...], what: str):
    def parse(text: str) -> str:
        items = [x for x in text.split(",") if x]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad)) or '(none given)'}; "
                                             f"choose from {', '.join(choices)}")
        return ",".join(items)

    return parse


def output_file(text: str) -> str:
    """Where to write the JSON file: not a directory, and its directory must exist."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name such as "
                                         f"{os.path.join(text, 'bench.json')}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"the directory {os.path.dirname(text) or parent} does not exist")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``batchnorm bench``'s options on ``p``."""
    p.add_argument("--shape", action="append", type=parse_shape, default=None,
                   help="input shape N,C,H,W: 2 to 5 integers >= 1 (repeatable; default: "
                        f"{','.join(map(str, DEFAULT_SHAPE))})")
    p.add_argument("--layouts", type=_choices_list(LAYOUTS, "layout(s)"), default="contiguous,channels_last",
                   help=f"comma-separated subset of {','.join(LAYOUTS)}")
    p.add_argument("--dtype", type=_choices_list(DTYPES, "dtype(s)"), default="float32",
                   help=f"comma-separated subset of {','.join(DTYPES)} (half precision on a GPU)")
    p.add_argument("--passes", type=_choices_list(PASSES, "pass(es)"), default=",".join(PASSES),
                   help=f"comma-separated subset of {','.join(PASSES)}")
    p.add_argument("--repeats", type=_int_range(1, 100000), default=30,
                   help="timed repeats per case (median reported; 1..100000)")
    p.add_argument("--threads", type=_int_range(0, 4096), default=0,
                   help="torch (and numba) threads; 0: torch's default")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of torch's batch norm")
    p.add_argument("--out", type=output_file, default=None, metavar="FILE",
                   help="also write the results to this JSON file (nothing is written without it)")
    p.add_argument("--json", action="store_true", help="print the results as a JSON object on the last line")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="CPU runs: wall time, or this process's CPU time (robust to other processes' load "
                        "with --threads 1; with more threads it also counts threads that spin-wait); "
                        "GPU runs always use CUDA events")
    p.add_argument("--no-malloc-reuse", dest="malloc_reuse", action="store_false",
                   help="keep glibc's default thresholds (freed large outputs go back to the OS)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
