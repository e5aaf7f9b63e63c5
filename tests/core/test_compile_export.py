"""torch.compile(fullgraph=True) and torch.export over our layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm as bn


def _model(momentum=0.1):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), bn.BatchNorm2d(6, momentum=momentum), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5), bn.BatchNorm1d(5, virtual_batch_size=2), nn.Linear(5, 2),
    )


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph_matches_eager(momentum):
    torch._dynamo.reset()
    eager = _model(momentum)
    compiled_src = copy.deepcopy(eager)
    compiled = torch.compile(compiled_src, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = torch.randn(4, 3, 6, 6)
        y1, y2 = eager(x), compiled(x)
        assert torch.allclose(y1, y2, atol=1e-6), step
        y1.square().sum().backward()
        y2.square().sum().backward()
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled_src.state_dict().items()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6), k
    for a, b in zip(eager.parameters(), compiled_src.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    eager.eval()
    compiled_src.eval()
    x = torch.randn(3, 3, 6, 6)
    assert torch.allclose(eager(x), compiled(x), atol=1e-6)


def test_export_eval_and_train():
    m = _model().eval()
    x = torch.randn(4, 3, 6, 6)
    ep = torch.export.export(m, (x,))
    assert torch.allclose(ep.module()(x), m(x), atol=1e-6)
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("batchnorm.apply_forward" in t for t in names), names
    m.train()
    ep_train = torch.export.export(m, (x,))
    assert any("batchnorm.train_forward" in str(n.target) for n in ep_train.graph.nodes)


def test_custom_ops_pass_opcheck():
    x = torch.randn(4, 3, 5)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    torch.library.opcheck(torch.ops.batchnorm.train_forward.default, (x, 1e-5, w, b, None, 0))
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    torch.library.opcheck(torch.ops.batchnorm.apply_forward.default, (x, mean, var, 1e-5, w, b))
