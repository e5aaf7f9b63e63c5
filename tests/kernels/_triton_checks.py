"""Triton backend checks, run under Triton's CPU interpreter by test_triton.py (a subprocess:
the interpreter must be chosen before triton is imported). Exit code 0 when every check passes.

On a machine with a CUDA GPU, ``python tests/kernels/_triton_checks.py`` runs the same checks on
the GPU (compiled kernels instead of the interpreter)."""

import itertools
import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert DEVICE == "cuda" or (os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("BATCHNORM_TRITON") == "1")

import batchnorm  # noqa: E402
from batchnorm.kernels import reference_act as ra  # noqa: E402
from batchnorm.kernels import triton_gpu as tg  # noqa: E402
from batchnorm.kernels.common import dense  # noqa: E402
from batchnorm.kernels.reference import Running  # noqa: E402

torch.manual_seed(0)
assert "triton" in batchnorm.available_backends()
failures = []


def close(name, a, e, atol=2e-4, rtol=2e-4):
    try:
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol)
    except AssertionError as exc:
        failures.append(f"{name}: {exc}")


CASES = [((3, 5, 4, 7), "nchw"), ((3, 5, 4, 7), "cl"), ((17, 1), "nchw"), ((2, 3, 9), "nchw"),
         ((2, 3, 2, 3, 5), "cl"), ((70, 40), "nchw"), ((2, 40, 3, 5), "nc"),
         # several chunks per channel (planes split along the positions too), several channel blocks
         ((1, 2, 40, 50), "nchw"), ((6, 130), "nchw")]
ACTS = ("identity", "relu", "leaky_relu", "silu", "gelu")


def check_case(shape, layout, acts=ACTS, dtypes=(torch.float32, torch.bfloat16), label=""):
    """Every entry point on ``shape`` against the float64 reference (``act`` other than the
    identity with a residual)."""
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE) * 2 + 1
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "nc":
        x = torch.cat([x, x], -1)[..., ::2]
    c = shape[1]
    w, b = (torch.randn(c, dtype=torch.float64, device=DEVICE) for _ in range(2))
    r = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    for dtype in dtypes:
        tol = {} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
        xs = x.to(dtype)
        print(label, shape, layout, dtype, flush=True)
        for act in acts:
            res = r.to(dtype) if act != "identity" else None
            res64 = res.double() if res is not None else None
            xs64 = xs.double()
            tag = f"{label}{shape} {layout} {dtype} {act}"
            y, m, v, n = tg.forward_train_act(xs, res, 1e-5, w, b, None, 0, act, 0.1)
            y64, m64, v64, n64 = ra.forward_train_act(xs64, res64, 1e-5, w, b, None, 0, act, 0.1)
            close(f"fwd y {tag}", y, y64, **tol)
            close(f"fwd mean {tag}", m, m64)
            close(f"fwd var {tag}", v, v64, atol=1e-4, rtol=1e-3)
            close(f"fwd count {tag}", n, n64)
            assert y.dtype == dtype and y.shape == xs.shape and y.stride() == dense(xs).stride()
            got = tg.backward_train_act(dy.to(dtype), xs, res, m64, v64, 1e-5, w, b, None, n64, 0, act, 0.1, True,
                                        True)
            exp = ra.backward_train_act(dy.to(dtype).double(), xs64, res64, m64, v64, 1e-5, w, b, None, n64, 0, act,
                                        0.1, True, True)
            for part, a_, e_ in zip(("dx", "dw", "db", "dr"), got, exp):
                close(f"bwd {part} {tag}", a_, e_, **({"atol": 2e-3, "rtol": 2e-3} if not tol else tol))
            ya = tg.forward_apply_act(xs, res, m64[0], v64[0], 1e-5, w, b, act, 0.1)
            close(f"apply {tag}", ya, ra.forward_apply_act(xs64, res64, m64[0], v64[0], 1e-5, w, b, act, 0.1), **tol)
            got = tg.backward_apply_act(dy.to(dtype), xs, res, m64[0], v64[0], 1e-5, w, b, act, 0.1, True, True)
            exp = ra.backward_apply_act(dy.to(dtype).double(), xs64, res64, m64[0], v64[0], 1e-5, w, b, act, 0.1, True,
                                        True)
            for part, a_, e_ in zip(("dx", "dw", "db", "dr"), got, exp):
                close(f"apply bwd {part} {tag}", a_, e_, **({"atol": 2e-3, "rtol": 2e-3} if not tol else tol))


for shape, layout in CASES:
    check_case(shape, layout)

# the finish kernels merging the chunks' partial sums in several steps, 16 channels per program
# and 2 (the last program of (200, 41) padded)
finish = tg._FINISH_CHUNKS, tg._FINISH_TILE
for (tg._FINISH_CHUNKS, tg._FINISH_TILE), shape in itertools.product(
        ((2, 2048), (2, 4)), ((200, 40), (200, 41), (1, 1, 60, 60))):
    assert tg._finish_grid(tg._geometry(torch.empty(shape)).G, shape[1])[1] == (16 if tg._FINISH_TILE > 4 else 2)
    x = torch.randn(shape, device=DEVICE) * 3 + 2
    c = shape[1]
    w, b = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    dy = torch.randn_like(x)
    assert tg._geometry(x).G > 2, tg._geometry(x).G
    y, m, v, n = tg.forward_train(x, 1e-5, w, b, None, 0)
    y64, m64, v64, n64 = ra.forward_train_act(x.double(), None, 1e-5, w.double(), b.double(), None, 0, "identity", 0.0)
    close(f"merged fwd y {shape}", y, y64)
    close(f"merged fwd var {shape}", v, v64, atol=1e-4, rtol=1e-4)
    got = tg.backward_train(dy, x, m64, v64, 1e-5, w, None, n64, 0)
    exp = ra.backward_train_act(dy.double(), x.double(), None, m64, v64, 1e-5, w.double(), None, None, n64, 0,
                                "identity", 0.0)
    for part, a_, e_ in zip(("dx", "dw", "db"), got, exp):
        close(f"merged bwd {part} {shape}", a_, e_, atol=2e-3, rtol=2e-3)
tg._FINISH_CHUNKS, tg._FINISH_TILE = finish

# float16, the input gradient not needed, no weight/bias, the running statistics moved in the call
x = torch.randn(5, 6, 7, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
dy = torch.randn_like(x)
x16 = x.half()
y, m, v, n = tg.forward_train(x16, 1e-5, None, None, None, 0)
y64, m64, v64, n64 = ra.forward_train_act(x16.double(), None, 1e-5, None, None, None, 0, "identity", 0.0)
close("fp16 fwd y", y, y64, atol=5e-3, rtol=5e-3)
assert y.dtype == torch.float16 and m.dtype == torch.float32
dx, dw, db = tg.backward_train(dy.half(), x16, m64, v64, 1e-5, None, None, n64, 0, need_input_grad=False)
exp = ra.backward_train_act(dy.half().double(), x16.double(), None, m64, v64, 1e-5, None, None, None, n64, 0,
                            "identity", 0.0)
assert dx is None
close("fp16 bwd dw", dw, exp[1], atol=5e-3, rtol=5e-3)
close("fp16 bwd db", db, exp[2], atol=5e-3, rtol=5e-3)
rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
versions = rm._version, rv._version
tg.forward_train(x, 1e-5, None, None, None, 0, running=Running(rm, rv, 0.25))
cnt = x.numel() // 6
m64 = x.double().mean((0, 2, 3))
v64 = x.double().var((0, 2, 3), unbiased=False)
close("running mean moved in the call", rm, 0.25 * m64, atol=1e-6, rtol=1e-5)
close("running var moved in the call", rv, 0.75 + 0.25 * v64 * cnt / (cnt - 1), atol=1e-6, rtol=1e-5)
assert rm._version > versions[0] and rv._version > versions[1], "the in-kernel update must bump the versions"
rm64, rv64 = torch.zeros(6, device=DEVICE, dtype=torch.float64), torch.ones(6, device=DEVICE, dtype=torch.float64)
tg.forward_train(x, 1e-5, None, None, None, 0, running=Running(rm64, rv64, 0.25))  # torch's update (float64)
close("running mean, float64 buffers", rm64, 0.25 * m64, atol=1e-6, rtol=1e-5)

# through the public layer, the dispatcher choosing triton
x = torch.randn(4, 3, 5, 5, device=DEVICE, requires_grad=True)
layer = batchnorm.BatchNormAct2d(3, act="relu").to(DEVICE)
ref_layer = torch.nn.BatchNorm2d(3).to(DEVICE)
with batchnorm.use_backend("triton"):
    from batchnorm import kernels

    assert kernels.select("forward_train", x.detach()) is tg
    # masks and ghost batches are not the triton backend's: the dispatcher routes them to reference
    mask = torch.ones(4, 5, 5, dtype=torch.bool, device=DEVICE)
    assert kernels.select("forward_train", x.detach(), mask) is kernels.reference
    assert kernels.select("backward_train", x.detach(), None, 2) is kernels.reference
    ym = batchnorm.functional.batch_norm(x.detach(), None, None, training=True, mask=mask)  # all valid
    close("masked batch through the dispatcher", ym,
          torch.nn.functional.batch_norm(x.detach(), None, None, training=True), atol=1e-5, rtol=1e-5)
    y = layer(x)
y2 = torch.relu(ref_layer(x))
close("layer", y, y2, atol=1e-5, rtol=1e-5)
g1 = torch.autograd.grad(y.sum(), x)[0]
g2 = torch.autograd.grad(y2.sum(), x)[0]
close("layer grad", g1, g2, atol=1e-5, rtol=1e-5)
close("running_var", layer.running_var, ref_layer.running_var, atol=1e-6, rtol=1e-5)

if failures:
    print("\n".join(failures[:20]))
    print(f"{len(failures)} failures")
    sys.exit(1)
print(f"triton {'GPU' if DEVICE == 'cuda' else 'interpreter'} checks passed")
