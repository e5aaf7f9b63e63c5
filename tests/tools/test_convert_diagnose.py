"""convert() between implementations and diagnose() of train/eval mismatch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm as B

from .models import CustomNet, SharedNet, small_cnn, trained


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bn_types(model):
    return {type(m) for m in model.modules() if B.is_batchnorm(m)}


@pytest.mark.parametrize("make", [small_cnn, CustomNet, SharedNet])
def test_convert_round_trips_preserve_state_and_outputs(make):
    model = trained(make(torch_bn=True))
    x = torch.randn(4, 3, 8, 8)
    ref_eval = model(x)
    ours = B.convert(model, "batchnorm")
    assert _bn_types(ours) <= {B.BatchNorm1d, B.BatchNorm2d}
    assert _bn_types(model) <= {nn.BatchNorm1d, nn.BatchNorm2d}  # original unchanged
    sync = B.convert(ours, "sync")
    assert _bn_types(sync) == {B.SyncBatchNorm}
    back = B.convert(B.convert(sync, "batchnorm"), "torch")
    assert _bn_types(back) == _bn_types(model)
    for m in (ours, sync, back):
        assert m.state_dict().keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
        torch.testing.assert_close(m(x), ref_eval)
    frozen = B.convert(model, "frozen")
    assert all(isinstance(m, B.FrozenBatchNorm1d | B.FrozenBatchNorm2d) for m in frozen.modules() if B.is_batchnorm(m))
    torch.testing.assert_close(frozen(x), ref_eval)
    # training mode: same batch statistics and the same running-statistic updates
    for m in (model, ours, sync, back):
        m.train()
    outs = [m(x) for m in (model, ours, sync, back)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)
    for m in (ours, sync, back):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_convert_keeps_configuration_knobs_and_sharing():
    bn = B.BatchNorm2d(4, eps=1e-3, momentum=None, nonfinite="raise")
    bn.train_affine = False
    model = nn.Sequential(nn.Conv2d(2, 4, 1), bn, nn.ReLU())
    model.again = bn  # the same BN registered twice
    sync = B.convert(model, "sync")
    s = sync[1]
    assert sync.again is s and s.eps == 1e-3 and s.momentum is None and s.nonfinite == "raise"
    assert not s.weight.requires_grad and not s.train_affine
    rev = B.SyncBatchNorm.revert_sync_batchnorm(sync)
    assert type(rev[1]) is B.BatchNorm2d and rev.again is rev[1] and rev[1].momentum is None
    t = B.convert(model, "torch")
    assert type(t[1]) is nn.BatchNorm2d and t[1].momentum is None and not t[1].weight.requires_grad
    assert type(B.SyncBatchNorm.revert_sync_batchnorm(B.convert(t, "sync"))[1]) is nn.BatchNorm2d
    assert type(B.convert(nn.SyncBatchNorm(3), "batchnorm")) is B.BatchNorm


def test_convert_errors_name_the_layer_and_change_nothing():
    model = nn.Sequential(nn.Linear(3, 4), B.BatchNorm(4, axis=-1), B.BatchRenorm1d(4))
    state = _state(model)
    with pytest.raises(ValueError, match=r"1 \(BatchNorm\): features on axis -1") as e:
        B.convert(model, "torch")
    assert "2 (BatchRenorm1d)" in str(e.value)
    with pytest.raises(ValueError, match="renormalization"):
        B.convert(model, "sync")
    with pytest.raises(ValueError, match="to must be"):
        B.convert(model, "keras")
    assert type(model[1]) is B.BatchNorm and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    frozen_knobs = B.freeze(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="frozen statistics"):
        B.convert(frozen_knobs, "torch")
    back = B.convert(B.convert(nn.Sequential(nn.BatchNorm1d(3)).eval(), "frozen"), "batchnorm")
    assert back[0].use_running_stats and not back[0].train_affine


# ---------------------------------------------------------------------------------- diagnose


def test_diagnose_values_against_direct_computation_and_state_untouched():
    model = trained(small_cnn(), steps=2)
    state = _state(model)
    g = torch.Generator().manual_seed(5)
    data = [torch.randn(8, 3, 8, 8, generator=g) * 3 for _ in range(2)]
    d = B.diagnose(model, data, show=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(m.training for m in model.modules())
    row = d.layers[0]
    assert row.name == "1" and row.updates == 2 and row.values_per_batch == 8 * 64
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in data]).double()
    mu = h.mean((0, 2, 3))
    var = h.transpose(0, 1).reshape(8, -1).var(1)
    shift = ((model[1].running_mean.double() - mu).abs() / (var + 1e-5).sqrt()).max()
    assert row.mean_shift == pytest.approx(float(shift), rel=1e-6)
    assert row.init_weight == pytest.approx(0.9**2)
    assert row.gap > 0.1 and d.output_gap > 0.1
    assert any("update(s) with momentum" in w for w in row.warnings)
    # after recalibrating on the same data, the gap and shift are small
    B.recalibrate(model, data)
    d2 = B.diagnose(model, data, show=False)
    assert d2.layers[0].mean_shift < 1e-4 and d2.layers[0].gap < row.gap
    assert not any("update(s) with momentum" in w for w in d2.layers[0].warnings)  # statistics are right now


def test_diagnose_warnings_train_mode_frozen_tiny_nonfinite(capsys):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), B.BatchNorm1d(4))
    B.freeze(model[3])
    with torch.no_grad():
        model[1].running_var[0] = float("nan")
    model.train()
    d = B.diagnose(model, [torch.randn(3, 3)])
    text = " | ".join(d.all_warnings())
    assert "training mode" in text and "call model.eval()" in text
    assert "3: frozen" in text
    assert "tiny batches (3 values" in text
    assert "non-finite" in text
    out = capsys.readouterr().out
    assert "batch-norm diagnosis" in out and "warning" in out
    assert model.training and model[1].training
    assert "batch-norm diagnosis" in str(d)


@pytest.mark.parametrize("make", [CustomNet, SharedNet])
@pytest.mark.parametrize("torch_bn", [False, True])
def test_diagnose_custom_and_shared_models(make, torch_bn):
    model = trained(make(torch_bn=torch_bn))
    state = _state(model)
    data = [torch.randn(6, 3, 8, 8) for _ in range(2)]
    d = B.diagnose(model, data, show=False)
    assert [r.name for r in d.layers] == [n for n, m in model.named_modules() if B.is_batchnorm(m)]
    assert all(r.values_per_batch > 0 and r.gap >= 0 for r in d.layers)
    assert d.output_gap is not None and d.output_gap > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
