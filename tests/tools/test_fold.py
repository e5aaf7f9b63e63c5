"""fold(): outputs equal the original's, nothing foldable left, shared modules never changed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import batchnorm as B

from .models import CustomNet, SharedNet, small_cnn, trained


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def _bns(model):
    return [n for n, m in model.named_modules() if B.is_batchnorm(m)]


@pytest.mark.parametrize("torch_bn", [False, True])
@pytest.mark.parametrize("make", [small_cnn, CustomNet])
def test_fold_everything_and_outputs_equal(make, torch_bn):
    model = trained(make(torch_bn=torch_bn))
    before = _state(model)
    x = torch.randn(4, 3, 8, 8)
    folded, report = B.fold(model, report=True)
    assert report.unfolded == [] and report.traced
    assert _bns(folded) == []
    assert type(folded) is type(model)
    assert _rel(folded(x), model(x)) < 1e-5
    _assert_same_state(model, before)  # the original is untouched
    assert _bns(model) != []


def test_fold_directions_reported():
    _, report = B.fold(trained(CustomNet()), report=True)
    sides = {bn: (layer, side) for bn, layer, side in report.folded}
    assert sides["bn"] == ("stem", "after")
    assert sides["up_bn"] == ("up", "after")  # transposed conv with groups
    assert sides["head_bn"] == ("head", "before")  # BN -> Linear
    assert "head_bn" in str(report)


def test_fold_shared_modules_left_alone():
    model = trained(SharedNet())
    x = torch.randn(3, 3, 8, 8)
    folded, report = B.fold(model, report=True)
    kept = dict(report.unfolded)
    assert "called 2 times" in kept["bn"]  # its conv is reused on a path without BN
    assert "called 2 times" in kept["shared_bn"]  # the BN itself is reused
    assert torch.equal(folded.conv.weight, model.conv.weight)
    assert _rel(folded(x), model(x)) < 1e-5
    with pytest.warns(UserWarning, match="left unfolded"):
        B.fold(model)


def test_fold_refuses_training_mode_and_leaves_model_untouched():
    model = trained(small_cnn())
    model.train()
    before = _state(model)
    with pytest.raises(ValueError, match="eval"):
        B.fold(model)
    _assert_same_state(model, before)
    assert model.training


def _fill(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.normal_(0, 1, generator=g)
        bn.running_var.uniform_(0.5, 2, generator=g)
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5, generator=g)
        if bn.bias is not None:
            bn.bias.normal_(0, 1, generator=g)
    return bn


@pytest.mark.parametrize(
    "layers, folded_count",
    [
        (lambda: [_fill(nn.BatchNorm2d(4), 0), nn.Conv2d(4, 6, 3)], 1),  # BN -> conv, no padding: exact
        (lambda: [_fill(nn.BatchNorm2d(4), 0), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2)], 1),
        (lambda: [_fill(nn.BatchNorm2d(4), 0), nn.Conv2d(4, 6, 3, padding=1)], 0),  # zero padding: not exact
        (lambda: [nn.Linear(5, 7), _fill(B.BatchNorm1d(7, affine=False), 1), nn.ReLU()], 1),
        (lambda: [nn.Conv1d(5, 4, 3), _fill(B.BatchNorm1d(4, bias=False), 2)], 1),
        (lambda: [nn.Conv3d(2, 3, 1, bias=False), _fill(B.BatchNorm3d(3), 3)], 1),
        (lambda: [nn.Flatten(), _fill(B.BatchNorm1d(12), 4), nn.Linear(12, 3)], 1),
        (lambda: [nn.Linear(5, 3), _fill(B.FrozenBatchNorm1d(3), 5)], 1),
    ],
)
def test_fold_patterns_exact(layers, folded_count):
    model = nn.Sequential(*layers()).eval()
    first = model[0] if not isinstance(model[0], nn.Flatten) else model[1]
    shape = {nn.Conv2d: (3, 4, 6, 6), nn.BatchNorm2d: (3, 4, 6, 6), nn.Conv1d: (3, 5, 9), nn.Conv3d: (3, 2, 3, 4, 4),
             nn.Linear: (3, 5), nn.Flatten: (3, 3, 4)}
    x = torch.randn(*next(v for k, v in shape.items() if isinstance(model[0], k)))
    folded, report = B.fold(model, report=True)
    assert len(report.folded) == folded_count, report
    assert _rel(folded(x), model(x)) < 1e-5
    del first


def test_fold_float64_against_closed_form():
    conv = nn.Conv2d(2, 3, 1, dtype=torch.float64)
    bn = _fill(nn.BatchNorm2d(3, dtype=torch.float64), 7)
    folded = B.fold(nn.Sequential(conv, bn).eval())[0]
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded.weight, conv.weight * s.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(folded.bias, (conv.bias - bn.running_mean) * s + bn.bias)


def test_fold_tied_weights_not_changed():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, _fill(nn.BatchNorm1d(4), 1), b).eval()
    folded, report = B.fold(model, report=True)
    assert report.folded == [] and "shared" in report.unfolded[0][1]
    assert folded[0].weight is folded[2].weight


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), _fill(nn.BatchNorm2d(4), 3), nn.ReLU())
        self.alt = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: fx cannot trace it
            return self.body(x)
        return self.alt(x)


def test_fold_untraceable_falls_back_to_sequential():
    model = Untraceable().eval()
    x = torch.randn(2, 3, 7, 7)
    folded, report = B.fold(model, report=True)
    assert not report.traced and report.folded == [("body.1", "body.0", "after")]
    assert _rel(folded(x), model(x)) < 1e-5
    assert isinstance(folded.body[1], nn.Identity)


def test_fold_functional_relu_model_and_mask_call():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 1)
            self.bn = _fill(B.BatchNorm1d(3), 4)

        def forward(self, x, mask):
            return TF.relu(self.bn(self.conv(x), mask))

    model = Masked().eval()
    _, report = B.fold(copy.deepcopy(model), report=True)
    assert report.folded == [] and "mask" in report.unfolded[0][1]


def test_fold_example_input_reveals_linear_on_sequences():
    # Linear over the last axis of (N, 7, 5), then BatchNorm1d(7) over axis 1 (the 7 positions):
    # the counts match, but the BN does not normalize the linear layer's features
    model = nn.Sequential(nn.Linear(5, 7), _fill(nn.BatchNorm1d(7), 2)).eval()
    x = torch.randn(4, 7, 5)
    folded, report = B.fold(model, report=True, example=x)
    assert report.folded == [] and "3D input" in report.unfolded[0][1]
    assert report.max_rel_error == 0.0
    torch.testing.assert_close(folded(x), model(x))
    good, rep2 = B.fold(small_cnn().eval(), report=True, example=torch.randn(2, 3, 8, 8))
    assert len(rep2.folded) == 2 and rep2.max_rel_error < 1e-5 and "largest relative" in str(rep2)
    seq = nn.Sequential(nn.Linear(5, 7), _fill(B.BatchNorm(7, axis=-1), 2)).eval()  # features on the last axis
    _, rep3 = B.fold(seq, report=True, example=x)
    assert len(rep3.folded) == 1 and rep3.max_rel_error < 1e-5


def test_fold_clone_shared_folds_into_a_copy_for_that_call():
    model = trained(SharedNet())
    x = torch.randn(3, 3, 8, 8)
    folded, report = B.fold(model, report=True, clone_shared=True)
    assert isinstance(folded, torch.fx.GraphModule)
    assert report.folded == [("bn", "conv (cloned as conv_folded)", "after")]
    assert dict(report.unfolded).keys() == {"shared_bn"}
    assert torch.equal(folded.conv.weight, model.conv.weight)  # the other call keeps the original
    assert not torch.equal(folded.conv_folded.weight, model.conv.weight)
    assert _rel(folded(x), model(x)) < 1e-5
