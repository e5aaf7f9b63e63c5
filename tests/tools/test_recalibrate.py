"""recalibrate(): exact population statistics, state restored, errors change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import batchnorm as B

from .models import SharedNet, small_cnn, trained


def _pop(t):
    """Mean and unbiased variance per channel (dim 1) over everything else, float64."""
    t = t.double().transpose(0, 1).reshape(t.shape[1], -1)
    return t.mean(1), t.var(1, unbiased=True)


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, 3, 6, 6, generator=g) * 2 + 1 for n in (5, 2, 7)]


@pytest.mark.parametrize("torch_bn", [False, True])
def test_recalibrate_small_cnn_population_statistics(torch_bn):
    model = trained(small_cnn(torch_bn=torch_bn))
    data = _batches()
    # independent reference: each BN's inputs over all batches, upstream BN with batch statistics
    conv1, bn1, conv2 = model[0], model[1], model[3]
    with torch.no_grad():
        in1 = [conv1(x) for x in data]
        in2 = [conv2(TF.relu(TF.batch_norm(h, None, None, bn1.weight, bn1.bias, True, 0.0, bn1.eps))) for h in in1]
    nbt = [int(model[i].num_batches_tracked) for i in (1, 4)]
    res = B.recalibrate(model, data)
    for idx, inputs in ((1, in1), (4, in2)):
        mean, var = _pop(torch.cat(inputs))
        torch.testing.assert_close(model[idx].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[idx].running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert res.batches == 3 and res.counts == {"1": 14 * 36, "4": 14 * 36}
    assert [int(model[i].num_batches_tracked) for i in (1, 4)] == nbt
    assert not any(m.training for m in model.modules())


def test_recalibrate_restores_flags_and_momentum_num_batches_and_dict_batches():
    model = trained(small_cnn())
    model[2].train()  # a module in an odd mode stays in it
    model[4].momentum = None
    flags = [m.training for m in model.modules()]
    data = [{"input": x} for x in _batches()]
    res = B.recalibrate(model, data, num_batches=2)
    assert res.batches == 2
    # (inputs, targets) pairs from a DataLoader: the model gets the inputs
    pairs = B.recalibrate(model, [(x, torch.zeros(len(x))) for x in _batches()[:2]])
    assert pairs.counts == res.counts
    assert [m.training for m in model.modules()] == flags and model[4].momentum is None
    assert model[1].update_running_stats and not model[1].use_running_stats


def test_recalibrate_mask_and_forward_fn():
    bn = B.BatchNorm1d(3)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 5, generator=g), torch.rand(4, 5, generator=g) > 0.4) for _ in range(3)]
    B.recalibrate(bn, data, forward_fn=lambda m, b: m(b[0], mask=b[1]))
    valid = torch.cat([x.transpose(1, 2)[m] for x, m in data])  # (n_valid, C)
    torch.testing.assert_close(bn.running_mean.double(), valid.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), valid.double().var(0), rtol=1e-6, atol=1e-6)


def test_recalibrate_interrupted_changes_nothing():
    model = trained(small_cnn(torch_bn=True))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(m, batch):
        if batch.shape[0] == 2:
            raise RuntimeError("data loader died")
        return m(batch)

    with pytest.raises(RuntimeError, match="died"):
        B.recalibrate(model, _batches(), forward_fn=boom)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(m.training for m in model.modules())


def test_recalibrate_reused_bn_error_then_pool():
    model = trained(SharedNet())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = _batches()
    with pytest.raises(ValueError, match="reused"):
        B.recalibrate(model, data)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    res = B.recalibrate(model, data, reused="pool")
    assert res.counts["shared_bn"] == 2 * res.counts["bn"]


def test_recalibrate_skips_frozen_and_untracked():
    model = nn.Sequential(nn.Linear(3, 4), B.BatchNorm1d(4), nn.Linear(4, 4),
                          B.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 4), B.FrozenBatchNorm1d(4))
    B.freeze(model[1])
    res = B.recalibrate(model, [torch.randn(8, 3)])
    assert set(res.skipped) == {"1", "3", "5"} and res.counts == {}
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    with pytest.raises(ValueError, match="no batches"):
        B.recalibrate(model, [])


@pytest.mark.parametrize("torch_bn", [False, True])
def test_recalibrate_custom_fx_module_against_collected_inputs(torch_bn):
    from .models import CustomNet

    model = trained(CustomNet(torch_bn=torch_bn))
    data = _batches()
    # reference: a copy in training mode whose BN inputs are collected and reduced at once
    ref = copy.deepcopy(model).train()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, m in ref.named_modules():
        if B.is_batchnorm(m):
            m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0]))
    with torch.no_grad():
        for x in data:
            ref(x)
    res = B.recalibrate(model, data)
    assert set(res.counts) == set(seen)
    for name, inputs in seen.items():
        mean, var = _pop(torch.cat(inputs))
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
