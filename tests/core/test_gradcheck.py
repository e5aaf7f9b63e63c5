"""torch.autograd.gradcheck of the closed-form backward (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import batchnorm as bn
import batchnorm.functional as BF


def _check(fn, *inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (2, 3, 2, 3), (2, 2, 2, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_train_and_eval(shape, training):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

    _check(f, x, w, b)


def test_gradcheck_channels_last():
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    _check(lambda x, w: BF.batch_norm(x, None, None, w, None, training=True), x, w)


def test_gradcheck_mask():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.4
    mask[0, :2] = True
    _check(lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True, mask=mask), x, w, b)


@pytest.mark.parametrize("n,k", [(8, 4), (7, 3)])
def test_gradcheck_ghost(n, k):
    x = torch.randn(n, 2, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    _check(lambda x, w, b: BF.batch_norm(x, None, None, w, b, training=True, virtual_batch_size=k), x, w, b)


def test_gradcheck_renorm_with_active_clipping():
    # r and d are stop-gradient; where both sit on their clipping bounds they are truly constant,
    # so the numerical gradient must equal ours there
    layer = bn.BatchRenorm1d(3, rmax=1.2, dmax=0.3, warmup_steps=0, rmax_steps=0, dmax_steps=0).double()
    with torch.no_grad():
        layer.running_mean.fill_(2.0)
        layer.running_var.fill_(4.0)
    x = (torch.randn(6, 3, dtype=torch.float64) * 0.5).requires_grad_()

    def f(x, w, b):
        layer.running_mean.fill_(2.0)
        layer.running_var.fill_(4.0)
        return BF.batch_renorm(x, layer.running_mean, layer.running_var, w, b, rmax=1.2, dmax=0.3,
                               training=True, update=False)[0]

    _check(f, x, layer.weight, layer.bias)


def test_gradcheck_frozen_statistics_in_training():
    layer = bn.BatchNorm2d(2).double()
    layer(torch.randn(4, 2, 3, 3, dtype=torch.float64))
    bn.freeze(layer, stats=True, affine=False)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    _check(lambda x, w: layer(x), x, layer.weight)
