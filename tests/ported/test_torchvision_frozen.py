"""torchvision's FrozenBatchNorm2d tests, run on ``batchnorm.FrozenBatchNorm2d``.

Source: pytorch/vision ``test/test_ops.py``, class ``TestFrozenBNT`` (read from the search index's
stored copy of that file; the index lists pytorch/vision's version at commit
e8dd7c6c5c1e21b9acdec623b63d5d5559d9e0d7): ``test_frozenbatchnorm2d_repr`` and
``test_frozenbatchnorm2d_eps`` (seeds 0-9). torchvision is not installed here; the tests need
only ``torch.nn.BatchNorm2d`` as the reference. All tests of the class are ported.
"""

from __future__ import annotations

import pytest
import torch

import batchnorm as B


def test_frozenbatchnorm2d_repr():
    """test/test_ops.py::TestFrozenBNT::test_frozenbatchnorm2d_repr: ``repr`` is
    ``FrozenBatchNorm2d(<num_features>, eps=<eps>)``, as torchvision's."""
    num_features = 32
    eps = 1e-5
    t = B.FrozenBatchNorm2d(num_features, eps=eps)
    assert repr(t) == f"FrozenBatchNorm2d({num_features}, eps={eps})"


@pytest.mark.parametrize("seed", range(10))
def test_frozenbatchnorm2d_eps(seed):
    """test/test_ops.py::TestFrozenBNT::test_frozenbatchnorm2d_eps: a state dict with
    ``num_batches_tracked`` loads (non-strict) into the frozen layer; with the default eps and with
    eps=1e-5 its output equals ``torch.nn.BatchNorm2d`` in eval mode with the same state
    (rtol 1e-5, atol 1e-6)."""
    torch.random.manual_seed(seed)
    sample_size = (4, 32, 28, 28)
    x = torch.rand(sample_size)
    state_dict = dict(
        weight=torch.rand(sample_size[1]),
        bias=torch.rand(sample_size[1]),
        running_mean=torch.rand(sample_size[1]),
        running_var=torch.rand(sample_size[1]),
        num_batches_tracked=torch.tensor(100),
    )
    for kwargs in ({}, {"eps": 1e-5}):
        fbn = B.FrozenBatchNorm2d(sample_size[1], **kwargs)
        fbn.load_state_dict(state_dict, strict=False)
        bn = torch.nn.BatchNorm2d(sample_size[1], **kwargs).eval()
        bn.load_state_dict(state_dict)
        torch.testing.assert_close(fbn(x), bn(x), rtol=1e-5, atol=1e-6)
