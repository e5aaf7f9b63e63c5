"""The model tools on batch-norm layers from other libraries: timm's fused ``BatchNormAct2d`` (a
subclass of ``nn.BatchNorm2d`` that applies its activation itself), torchvision's
``FrozenBatchNorm2d`` and timm's ``FrozenBatchNormAct2d`` (buffers only, not a ``_BatchNorm``),
and a subclass whose forward we cannot see into. Each tool either reproduces what the layer
computes or leaves it alone and says so.

The reference is always the unconverted model itself, on the same input.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm as B


def _eval_close(a: nn.Module, b: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> None:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=rtol, atol=rtol * float(ya.abs().max()))


def _randomize(model: nn.Module) -> nn.Module:
    """Random BN parameters and running statistics (a fresh model's 1/0/0/1 hide mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            for k, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -0.5, 0.5),
                              ("running_var", 0.5, 2.0)):
                t = getattr(m, k, None)
                if B.is_batchnorm(m) and isinstance(t, torch.Tensor):
                    t.uniform_(lo, hi)
    return model


@pytest.mark.parametrize("act", ["ReLU", "SiLU", "GELU", "Hardswish"])
def test_timm_batchnormact_keeps_its_activation_in_every_tool(timm, act):
    from timm.layers import BatchNormAct2d

    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=getattr(nn, act)))).eval()
    x = torch.randn(2, 3, 8, 8)
    fused = act != "Hardswish"  # ours fuses relu/leaky_relu/silu/gelu
    if fused:
        converted = B.convert(model, "batchnorm")
        assert type(converted[1]) is B.BatchNormAct2d
    else:
        with pytest.warns(UserWarning, match=r"1 \(BatchNormAct2d\): applies Identity and Hardswish"):
            converted = B.convert(model, "batchnorm")
        assert type(converted[1]) is BatchNormAct2d
    _eval_close(model, converted, x)
    folded, report = B.fold(model, report=True)
    assert len(report.folded) == 1
    _eval_close(model, folded, x)
    with pytest.raises(ValueError, match="computes more than batch norm"):
        B.convert(model, "sync")
    frozen = copy.deepcopy(model)
    if fused:
        frozen = B.freeze(frozen)
        assert type(frozen[1]) is B.BatchNormAct2d and frozen[1].use_running_stats
    else:
        with pytest.warns(UserWarning, match="left as they are"):
            frozen = B.freeze(frozen)
    frozen.train()
    _eval_close(model, frozen, x) if fused else None


def test_timm_efficientnet_b0_convert_and_fold(timm):
    model = _randomize(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    converted = B.convert(model, "batchnorm")
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(m, B.BatchNormAct2d | B.BatchNorm2d)
                   for m in converted.modules())
    _eval_close(model, converted, x, rtol=1e-3)
    folded, report = B.fold(model, report=True)
    assert report.folded
    _eval_close(model, folded, x, rtol=1e-3)


def test_frozen_batchnorm_from_other_libraries_is_seen_by_every_tool(torchvision):
    """torchvision's FrozenBatchNorm2d (timm 1.0 uses the same class for its frozen plain BN)."""
    frozen_cls = torchvision.ops.misc.FrozenBatchNorm2d
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), frozen_cls(4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    assert B.is_batchnorm(model[1])
    folded, report = B.fold(model, report=True)
    assert [f[0] for f in report.folded] == ["1"]
    _eval_close(model, folded, x)
    ours = B.convert(model, "batchnorm")
    assert type(ours[1]) is B.BatchNorm2d and ours[1].use_running_stats and not ours[1].train_affine
    _eval_close(model, ours.train(), x)  # frozen statistics in training mode too
    as_frozen = B.convert(model, "frozen")
    assert type(as_frozen[1]) is B.FrozenBatchNorm2d
    _eval_close(model, as_frozen, x)
    with pytest.raises(ValueError, match="torch has no frozen BN layer"):
        B.convert(model, "torch")
    diagnosis = B.diagnose(model, [x], show=False)
    assert [r.name for r in diagnosis.layers] == ["1"] and diagnosis.layers[0].frozen
    assert B.recalibrate(model, [x]).skipped == {"1": "frozen"}


def test_timm_frozen_batchnormact_is_folded_with_its_activation(timm):
    from timm.layers import FrozenBatchNormAct2d

    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNormAct2d(4, act_layer=nn.SiLU))).eval()
    x = torch.randn(2, 3, 8, 8)
    folded, report = B.fold(model, report=True)
    assert len(report.folded) == 1
    _eval_close(model, folded, x)
    with pytest.warns(UserWarning, match="kept as they are"):
        kept = B.convert(model, "batchnorm")
    assert type(kept[1]) is FrozenBatchNormAct2d


class _Scaled(nn.BatchNorm2d):
    """A subclass with a forward of its own: nothing any tool can reproduce."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_foreign_subclass_is_left_alone_and_named():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), _Scaled(4))).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"1 \(_Scaled\): computes more than batch norm"):
        converted = B.convert(model, "batchnorm")
    assert type(converted[1]) is _Scaled
    folded, report = B.fold(model, report=True)
    assert not report.folded and "a forward of its own" in report.unfolded[0][1]
    _eval_close(model, folded, x)
