"""The model tools never fake, lose or leak a result: fused layers keep their activation, folds
that cannot be checked refuse wrong inputs, NaN batches do not poison recalibration, diagnose does
not raise false alarms after it, and SyncBatchNorm agrees across ranks or fails on all of them.

References are the unconverted models themselves and torch's BN over the concatenated batch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchnorm as B

from ._dist import run_ranks


def _trained(model, shape, steps=3):
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "gelu"])
def test_fold_keeps_the_activation_of_fused_layers(act):
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), B.BatchNormAct2d(4, act=act, negative_slope=0.2)), (8, 3, 6, 6))
    folded, report = B.fold(model, report=True)
    assert len(report.folded) == 1
    assert not isinstance(folded[1], nn.Identity)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_convert_refuses_to_drop_a_fused_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), B.BatchNormAct2d(4, act="relu")).eval()
    for to in ("torch", "frozen", "sync"):
        with pytest.raises(ValueError, match=r"1 \(BatchNormAct2d\)"):
            B.convert(model, to)
    assert type(B.convert(model, "batchnorm")[1]) is B.BatchNormAct2d  # already ours: kept


def test_fold_linear_bn_without_example_refuses_3d_input():
    """Linear -> BatchNorm1d on (N, L, C) input normalizes L, not the Linear's features: without an
    example to show the rank, the fold may not silently compute something else."""
    model = _trained(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), (16, 4, 5))  # (N, L=4, C=5)
    folded = B.fold(model)
    x = torch.randn(3, 4, 5)
    with pytest.raises(RuntimeError, match=r"folded into a Linear layer for 2D \(N, C\) input.*example="):
        folded(x)
    # with an example, the fold sees the rank and keeps the BN: exact
    folded, report = B.fold(model, report=True, example=x)
    assert not report.folded and "not the linear layer's features" in report.unfolded[0][1]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    # a plain MLP still folds without an example, and 2D input works
    mlp = _trained(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU()), (16, 5))
    x2 = torch.randn(6, 5)
    with torch.no_grad():
        torch.testing.assert_close(B.fold(mlp)(x2), mlp(x2), rtol=1e-5, atol=1e-6)


def _model():
    return nn.Sequential(nn.Linear(4, 6), B.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6))


def test_recalibrate_skips_nonfinite_batches_with_a_warning():
    torch.manual_seed(3)
    data = [torch.randn(8, 4) for _ in range(5)]
    bad = data[:2] + [torch.full((8, 4), float("nan"))] + data[2:] + [torch.full((8, 4), float("inf"))]
    clean, dirty = _model(), _model()
    dirty.load_state_dict(clean.state_dict())
    B.recalibrate(clean, data)
    with pytest.warns(RuntimeWarning, match="NaN or inf were left out"):
        result = B.recalibrate(dirty, bad)
    assert result.nonfinite == {"1": 2, "4": 2}
    for k, v in clean.state_dict().items():
        torch.testing.assert_close(dirty.state_dict()[k], v)
    before = {k: v.clone() for k, v in dirty.state_dict().items()}
    with pytest.raises(FloatingPointError, match="nothing was changed"):
        B.recalibrate(dirty, bad, nonfinite="raise")
    assert all(torch.equal(v, before[k]) for k, v in dirty.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        B.recalibrate(dirty, bad, nonfinite="propagate")
    assert not torch.isfinite(dirty[1].running_mean).all()


def test_diagnose_after_recalibrate_raises_no_initialization_alarm():
    torch.manual_seed(4)
    model = _model().eval()
    data = [torch.randn(16, 4) * 3 + 2 for _ in range(4)]
    before = B.diagnose(model, data, show=False)
    assert any("initialization" in w for w in before.all_warnings())  # never updated: a true alarm
    B.recalibrate(model, data)
    after = B.diagnose(model, data, show=False)
    assert not any("initialization" in w for w in after.all_warnings()), after.all_warnings()
    assert all(r.init_weight != r.init_weight for r in after.layers)  # NaN: "-" in the table
    assert all(r.updates == 0 for r in after.layers)  # num_batches_tracked is reported as it is


def _mismatch_worker(rank, world):
    layer = B.SyncBatchNorm(3 + rank)  # rank 1 runs a different model
    try:
        layer(torch.randn(4, 3 + rank, 2))
    except ValueError as e:
        return {"error": str(e), "rm": layer.running_mean.clone(), "nbt": int(layer.num_batches_tracked)}
    return {"error": None}


def test_sync_ranks_with_different_channel_counts_all_raise(tmp_path):
    results = run_ranks(_mismatch_worker, 2, tmp_path)
    for r in results:
        assert r["error"] is not None and "rank 0: 3 channels" in r["error"] and "rank 1: 4 channels" in r["error"]
        assert torch.equal(r["rm"], torch.zeros_like(r["rm"])) and r["nbt"] == 0


def _dtype_worker(rank, world):
    layer = B.SyncBatchNorm(3).to(torch.float64 if rank else torch.float32)
    try:
        layer(torch.randn(4, 3, dtype=torch.float64 if rank else torch.float32))
    except ValueError as e:
        return str(e)
    return None


def test_sync_ranks_with_different_dtypes_all_raise(tmp_path):
    for msg in run_ranks(_dtype_worker, 2, tmp_path):
        assert msg is not None and "torch.float32" in msg and "torch.float64" in msg


def _all_empty_worker(rank, world):
    layer = B.SyncBatchNorm(3)
    x = torch.randn(0, 3, 2, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    return {"shape": tuple(y.shape), "nbt": int(layer.num_batches_tracked), "rm": layer.running_mean.clone(),
            "wgrad": layer.weight.grad}


def test_sync_all_ranks_empty_is_an_empty_batch_as_in_one_process(tmp_path):
    single = B.BatchNorm1d(3)
    x = torch.randn(0, 3, 2, requires_grad=True)
    single(x).sum().backward()
    for r in run_ranks(_all_empty_worker, 2, tmp_path):
        assert r["shape"] == (0, 3, 2)
        assert r["nbt"] == int(single.num_batches_tracked) == 1
        assert torch.equal(r["rm"], single.running_mean) and torch.equal(r["wgrad"], single.weight.grad)
