"""insert(): a BN after each linear/conv layer, on Sequential, fx-traceable and shared-module models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import batchnorm as B


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _kinds(model):
    return [type(m).__name__ for m in model.modules() if not isinstance(m, nn.Sequential)]


def test_insert_sequential_before_activation_matches_hand_built():
    model = mlp()
    new = B.insert(model)
    assert _kinds(new) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "Tanh", "Linear"]
    assert _kinds(model) == ["Linear", "ReLU", "Linear", "Tanh", "Linear"]  # original unchanged
    ref = nn.Sequential(model[0], nn.BatchNorm1d(8), nn.ReLU(), model[2], nn.BatchNorm1d(8), nn.Tanh(), model[4])
    x = torch.randn(10, 6)
    torch.testing.assert_close(new(x), ref(x))  # training mode: batch statistics
    new.eval(), ref.eval()
    torch.testing.assert_close(new(x), ref(x))


def test_insert_after_activation_torch_layers_and_last():
    new = B.insert(mlp(), where="after_activation", layer="torch", skip_last=False, momentum=0.2)
    assert _kinds(new) == ["Linear", "ReLU", "BatchNorm1d", "Linear", "Tanh", "BatchNorm1d", "Linear", "BatchNorm1d"]
    bns = [m for m in new.modules() if isinstance(m, nn.BatchNorm1d)]
    assert all(type(m) is nn.BatchNorm1d and m.momentum == 0.2 for m in bns)


def test_insert_drops_redundant_bias_only_where_bn_follows_directly():
    model = mlp()
    new = B.insert(model, bias=False)
    assert new[0].bias is None and new[3].bias is None and new[6].bias is not None
    assert model[0].bias is not None
    kept = B.insert(model, bias=False, where="after_activation")
    assert kept[0].bias is not None  # the BN comes after the activation: the bias is not redundant


def test_insert_conv_rank_follows_layer_and_nested_sequential():
    model = nn.Sequential(
        nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU()),
        nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU()),
        nn.Flatten(), nn.Linear(4 * 6, 2),
    )
    new = B.insert(model)
    assert isinstance(new[0][1], B.BatchNorm1d) and new[0][1].num_features == 4
    assert isinstance(new[1][1], B.BatchNorm1d)
    assert new(torch.randn(5, 2, 10)).shape == (5, 2)
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv3d(4, 5, 1), nn.Conv2d(1, 1, 1))
    kinds = _kinds(B.insert(convs))
    assert kinds == ["Conv2d", "BatchNorm2d", "Conv3d", "BatchNorm3d", "Conv2d"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        h = TF.relu(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def test_insert_fx_traceable_module():
    model = Net()
    new = B.insert(model, where="after_activation")
    assert isinstance(new, torch.fx.GraphModule)
    assert isinstance(new.conv_bn, B.BatchNorm2d) and type(new.fc1_bn) is nn.BatchNorm1d  # layer="auto"
    assert not hasattr(new, "fc2_bn")
    x = torch.randn(6, 3, 5, 5)
    # independent: the same computation written out with torch layers
    bn2, bn1 = nn.BatchNorm2d(4), nn.BatchNorm1d(8)
    h = bn2(TF.relu(model.conv(x))).mean((2, 3))
    ref = model.fc2(bn1(torch.relu(model.fc1(h))))
    torch.testing.assert_close(new(x), ref)
    assert not any(B.is_batchnorm(m) for m in model.modules())


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(x))))


def test_insert_shared_layer_gets_one_bn_per_call():
    new = B.insert(Shared(), bias=False)
    bns = [n for n, m in new.named_modules() if B.is_batchnorm(m)]
    assert bns == ["fc_bn", "fc_bn_1"]
    assert new.fc.bias is None  # every call of fc is followed by a BN
    new2 = B.insert(Shared(), bias=False, skip_last=False, after=(nn.Linear,), where="after_activation")
    assert new2.fc.bias is not None  # the first call's BN follows the activation


def test_insert_errors_leave_model_untouched():
    lazy = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="lazy"):
        B.insert(lazy)
    assert isinstance(lazy[0], nn.LazyLinear) and len(lazy) == 3
    with pytest.raises(ValueError, match="where"):
        B.insert(mlp(), where="middle")

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    model = Dynamic()
    with pytest.raises(ValueError, match="fx"):
        B.insert(model)
    assert list(dict(model.named_modules())) == ["", "fc"]


def test_insert_auto_picks_torch_after_linear_and_ours_after_convolutions():
    """The default ``layer="auto"``: torch's BatchNorm1d after a Linear (small (N, C) tensors, where the
    call path dominates), ours after a convolution; ``layer="batchnorm"`` forces ours everywhere, and an
    option only ours takes selects ours."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.Flatten(), nn.Linear(8, 8),
                          nn.ReLU(), nn.Linear(8, 2))
    new = B.insert(model)
    bns = [m for m in new.modules() if "BatchNorm" in type(m).__name__]
    assert [(type(m).__module__.split(".")[0], type(m).__name__) for m in bns] == [
        ("batchnorm", "BatchNorm2d"), ("batchnorm", "BatchNorm1d"), ("torch", "BatchNorm1d")]
    from batchnorm.tools.insert import fastest_layer

    assert fastest_layer(nn.Linear(2, 2)) == "torch"
    assert fastest_layer(nn.Conv3d(2, 2, 1)) == "batchnorm"
    forced = B.insert(mlp(), layer="batchnorm")
    assert all(isinstance(m, B.BatchNorm1d) for m in forced.modules() if "BatchNorm" in type(m).__name__)
    ghost = B.insert(mlp(), virtual_batch_size=4)
    assert all(isinstance(m, B.BatchNorm1d) and m.virtual_batch_size == 4
               for m in ghost.modules() if "BatchNorm" in type(m).__name__)
    with pytest.raises(ValueError, match="'auto', 'batchnorm', 'torch'"):
        B.insert(mlp(), layer="fast")
