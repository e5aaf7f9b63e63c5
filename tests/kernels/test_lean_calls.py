"""The cpu backend's lean calls (train_lean, backward_lean: the layers' common training call)
compute exactly what its general wrappers compute, and match the reference backend."""

from __future__ import annotations

import pytest
import torch

from batchnorm.kernels import reference
from batchnorm.kernels.reference import Running

SHAPES = [((64, 12), torch.contiguous_format), ((6, 5, 7), torch.contiguous_format),
          ((4, 8, 9, 9), torch.contiguous_format), ((4, 8, 9, 9), torch.channels_last),
          ((3, 2, 33, 20), torch.contiguous_format)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, fmt", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_lean_calls_equal_the_general_ones(cpu_backend, shape, fmt, dtype, affine):
    cpu = cpu_backend
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).contiguous(memory_format=fmt)
    dy = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.rand(c, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    run_a = Running(torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), 0.1, skip_nonfinite=True)
    run_b = Running(torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), 0.1, skip_nonfinite=True)
    y, mean, var, count = cpu.forward_train(x, 1e-5, w, b, None, 0, run_a)
    y_lean, stats = cpu.train_lean(x, 1e-5, w, b, run_b)
    assert torch.equal(y_lean, y) and y_lean.stride() == y.stride()
    lm, lv, lc = cpu.lean_stats(stats)
    assert torch.equal(lm, mean) and torch.equal(lv, var) and torch.equal(lc, count)
    assert torch.equal(run_b.mean, run_a.mean) and torch.equal(run_b.var, run_a.var) and run_b.accepted
    dx, dw, db = cpu.backward_train(dy, x, mean, var, 1e-5, w, None, count, 0, True)
    dx_lean, dw_lean, db_lean = cpu.backward_lean(dy, x, stats, 1e-5, w, True)
    assert torch.equal(dx_lean, dx) and torch.equal(dw_lean, dw) and torch.equal(db_lean, db)
    assert cpu.backward_lean(dy, x, stats, 1e-5, w, False)[0] is None
    # an expanded incoming gradient (``y.sum().backward()``) is read through a copy
    ones = torch.ones((), dtype=dtype).expand(shape)
    torch.testing.assert_close(cpu.backward_lean(ones, x, stats, 1e-5, w, True)[0],
                               cpu.backward_train(ones.contiguous(), x, mean, var, 1e-5, w, None, count, 0, True)[0])
    rdx, rdw, rdb = reference.backward_train(dy, x, mean, var, 1e-5, w, None, count, 0, True)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(dx_lean, rdx, **tol)
    torch.testing.assert_close(dw_lean, rdw.reshape(-1), rtol=tol["rtol"], atol=tol["atol"] * 100)
    torch.testing.assert_close(db_lean, rdb.reshape(-1), rtol=tol["rtol"], atol=tol["atol"] * 100)


def test_lean_forward_skips_a_nonfinite_batch(cpu_backend):
    x = torch.randn(32, 4)
    x[5, 1] = float("inf")
    run = Running(torch.zeros(4), torch.ones(4), 0.1, skip_nonfinite=True)
    cpu_backend.train_lean(x, 1e-5, None, None, run)
    assert not run.accepted
    assert torch.equal(run.mean, torch.zeros(4)) and torch.equal(run.var, torch.ones(4))
