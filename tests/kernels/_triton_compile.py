"""Compile the Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, with the
ptxas that ships in Triton's wheel: catches what the interpreter cannot (the interpreter runs the
kernels as Python, so a name whose type differs between the branches of an ``if``, or an
operation the GPU code generator lacks, only shows when compiling). Nothing is executed.
The kernels are compiled knowing what a real launch tells Triton about a typical shape (tensor
pointers 16-byte aligned, sizes divisible by 16), and the ones that stream tensors must then read
them with 16-byte vector loads (``ld.global...v4``): a change that hides the contiguity from
Triton fails here instead of halving the bandwidth on a GPU.
Run by test_triton.py in a subprocess; exit code 0 when every variant compiled."""

import inspect
import itertools
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not the interpreter's

import torch

torch.cuda.is_available = lambda: True  # type: ignore[assignment]  # the backend imports only with a device

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from batchnorm.kernels import triton_gpu as tg  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"count", "eps", "momentum", "unbias", "slope"}
TENSORS = {"x_ptr", "y_ptr", "dy_ptr", "r_ptr", "dr_ptr"}
#: Arguments a launch on (N, 64, 56, 56) or channels_last (N, 64, ...) tells Triton are multiples of 16.
DIVISIBLE = TENSORS | {"C", "L", "LSEG", "NB"}


def compile_variant(fn, dtype: str, consts: dict) -> triton.compiler.CompiledKernel:
    names = list(inspect.signature(fn.fn).parameters)
    signature = {}
    for n in names:
        if n in consts:
            signature[n] = "constexpr"
        elif n in TENSORS:
            signature[n] = f"*{dtype}"
        elif n.endswith("_ptr"):
            signature[n] = "*fp32"
        else:
            signature[n] = "fp32" if n in FLOATS else "i32"
    missing = set(consts) - set(names)
    assert not missing, f"{fn.fn.__name__} has no parameters {missing}"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in DIVISIBLE and n not in consts}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=TARGET)


def variants():
    """Every kernel in each of its geometries and directions, each dtype with another activation."""
    flags = dict(HAS_R=True, HAS_W=True, HAS_B=True)
    for dtype, act in (("fp32", 4), ("bf16", 1), ("fp16", 3)):
        for rows, backward in itertools.product((False, True), (False, True)):
            q = 64 if rows else 1024
            yield "_stats", tg._stats, dtype, dict(ROWS=rows, BACKWARD=backward, ACT=act, BLOCK_P=4096 // q,
                                                   BLOCK_Q=q, **flags)
            yield "_apply", tg._apply, dtype, dict(ROWS=rows, BACKWARD=backward, TRAIN=True, ACT=act, NEED_DX=True,
                                                   NEED_DR=backward, BLOCK_P=2048 // q, BLOCK_Q=q, **flags)
    for block, block_g in ((16, 128), (2, 1024)):  # planes (few chunks), rows (~1000 chunks)
        yield "_finish_fwd", tg._finish_fwd, "fp32", dict(UPDATE=True, BLOCK=block, BLOCK_G=block_g)
        yield "_finish_bwd", tg._finish_bwd, "fp32", dict(TRAIN=True, HAS_W=True, BLOCK=block, BLOCK_G=block_g)


failures = 0
for name, fn, dtype, consts in variants():
    try:
        ptx = compile_variant(fn, dtype, consts).asm["ptx"]
        if name != "_finish_fwd" and name != "_finish_bwd" and not re.search(r"ld\.global\.[^ ]*v4", ptx):
            raise AssertionError("no 16-byte vector loads: the tensor reads lost their contiguity")
        print(f"{name} {dtype} {consts}: ok", flush=True)
    except Exception as exc:  # report every variant, then fail
        failures += 1
        print(f"{name} {dtype} {consts}: FAILED\n{exc}", flush=True)
if failures:
    print(f"{failures} variants failed to compile")
    sys.exit(1)
print("triton sm_90 compile checks passed")
