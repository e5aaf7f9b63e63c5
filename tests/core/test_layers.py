"""The layers against torch.nn.BatchNorm* and against the float64 reference."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchnorm as bn

from .naive import bn_eval, bn_train, channel_matrix, rel_err

PAIRS = [
    (bn.BatchNorm1d, nn.BatchNorm1d, (6, 4)),
    (bn.BatchNorm1d, nn.BatchNorm1d, (3, 4, 5)),
    (bn.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 2)),
    (bn.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 2)),
]


def test_constructor_signature_matches_torch():
    for ours, theirs in ((bn.BatchNorm1d, nn.BatchNorm1d), (bn.LazyBatchNorm2d, nn.LazyBatchNorm2d)):
        p_ours = inspect.signature(ours.__init__).parameters
        p_theirs = inspect.signature(theirs.__init__).parameters
        for name, p in p_theirs.items():
            assert name in p_ours, name
            assert p_ours[name].default == p.default, name
            assert p_ours[name].kind == p.kind, name


@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(PAIRS), affine=st.booleans(), track=st.booleans(),
       momentum=st.sampled_from([0.1, 0.3, None]), bias=st.booleans(), steps=st.integers(1, 3))
def test_matches_torch_over_training_and_eval(case, affine, track, momentum, bias, steps):
    ours_cls, torch_cls, shape = case
    c = shape[1]
    ours = ours_cls(c, momentum=momentum, affine=affine, track_running_stats=track, bias=bias).double()
    theirs = torch_cls(c, momentum=momentum, affine=affine, track_running_stats=track, bias=bias).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.uniform_(0.5, 1.5)
            q.copy_(p)
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y1, y2 = ours(x), theirs(x)
        assert rel_err(y1, y2) < 1e-10
        g = torch.randn_like(y1)
        params1, params2 = list(ours.parameters()), list(theirs.parameters())
        g1 = torch.autograd.grad(y1, [x, *params1], g)
        g2 = torch.autograd.grad(y2, [x, *params2], g)
        for a, b in zip(g1, g2):
            assert rel_err(a, b) < 1e-9
    for k, v in theirs.state_dict().items():
        assert torch.allclose(ours.state_dict()[k].double(), v.double(), rtol=1e-10, atol=1e-12), k
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert rel_err(ours(x), theirs(x)) < 1e-10


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
def test_state_dict_round_trip_both_ways(ours_cls, torch_cls, shape):
    theirs = torch_cls(shape[1])
    theirs(torch.randn(shape))  # non-trivial running statistics
    ours = ours_cls(shape[1])
    ours.load_state_dict(theirs.state_dict())
    back = torch_cls(shape[1])
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape)
    assert rel_err(ours(x), theirs(x)) < 1e-6


def test_old_checkpoint_without_num_batches_tracked_loads():
    sd = nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    m = bn.BatchNorm2d(3)
    m.load_state_dict(sd, strict=False)
    assert m.num_batches_tracked.item() == 0


def test_lazy_layers_infer_features_and_become_eager():
    ours, theirs = bn.LazyBatchNorm2d(), nn.LazyBatchNorm2d()
    x = torch.randn(4, 7, 3, 3)
    y1, y2 = ours(x), theirs(x)
    assert type(ours) is bn.BatchNorm2d and ours.num_features == 7
    assert rel_err(y1, y2) < 1e-6
    assert torch.allclose(ours.running_var, theirs.running_var)
    lazy1d = bn.LazyBatchNorm1d(affine=False)
    lazy1d(torch.randn(5, 3))
    assert lazy1d.weight is None and lazy1d.running_mean.shape == (3,)


def test_features_on_any_axis():
    x = torch.randn(4, 9, 5, dtype=torch.float64)  # (N, L, C)
    seq = bn.BatchNorm(5, axis=-1).double()
    ref = nn.BatchNorm1d(5).double()
    y = seq(x)
    assert y.shape == x.shape
    assert rel_err(y, ref(x.transpose(1, 2)).transpose(1, 2)) < 1e-12
    assert torch.allclose(seq.running_var, ref.running_var)
    mask = torch.rand(4, 9) > 0.3
    seq(x, mask=mask)  # mask shape: input without the features axis
    with pytest.raises(ValueError, match="axis"):
        bn.BatchNorm(5, axis=0)


def test_from_keras_converts_conventions_and_warns_on_keras_momentum():
    m = bn.BatchNorm2d.from_keras(8, momentum=0.99, epsilon=1e-3)
    assert m.momentum == pytest.approx(0.01) and m.eps == 1e-3
    m2 = bn.BatchNorm1d.from_keras(4, center=False, scale=True)
    assert m2.bias is None and m2.weight is not None
    m3 = bn.BatchNorm1d.from_keras(4, center=True, scale=False)
    assert m3.weight is None and m3.bias is not None
    x = torch.randn(10, 4, dtype=torch.float64)
    y = m3.double()(x)
    assert rel_err(y, bn_train(x, eps=1e-3)[0]) < 1e-12
    with pytest.warns(UserWarning, match="Keras"):
        bn.BatchNorm2d(8, momentum=0.99)


def test_mask_statistics_use_only_valid_positions():
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    layer = bn.BatchNorm1d(2, momentum=None).double()  # first update = the batch
    y = layer(x, mask=mask)
    valid = x.permute(1, 0, 2)[:, mask]
    mean, var = valid.mean(1), valid.var(1, unbiased=False)
    expect = (x - mean.view(1, 2, 1)) / torch.sqrt(var.view(1, 2, 1) + 1e-5)
    assert rel_err(y, expect) < 1e-12
    assert torch.allclose(layer.running_var, valid.var(1))
    # broadcastable mask (N, 1): whole samples masked out
    keep = torch.tensor([[True], [False], [True]])
    layer2 = bn.BatchNorm1d(2).double()
    y2 = layer2(x, mask=keep)
    kept = torch.cat([x[0], x[2]], dim=1)
    expect2 = (x - kept.mean(1).view(1, 2, 1)) / torch.sqrt(kept.var(1, unbiased=False).view(1, 2, 1) + 1e-5)
    assert rel_err(y2, expect2) < 1e-12


@pytest.mark.parametrize("n,k", [(12, 4), (10, 4), (9, 3), (5, 8)])
def test_ghost_batches_match_chunked_torch_bn(n, k):
    x = torch.randn(n, 3, 4, dtype=torch.float64)
    ghost = bn.BatchNorm1d(3, virtual_batch_size=k).double()
    y = ghost(x)
    expect = torch.cat([bn_train(chunk)[0] for chunk in x.split(k)])
    assert rel_err(y, expect) < 1e-12
    whole = nn.BatchNorm1d(3).double()
    whole(x)
    assert torch.allclose(ghost.running_mean, whole.running_mean)
    assert torch.allclose(ghost.running_var, whole.running_var)
    ghost.eval()
    whole.eval()
    assert rel_err(ghost(x), whole(x)) < 1e-12


def _naive_renorm(x, rm, rv, w, b, rmax, dmax, eps):
    xm = channel_matrix(x)
    mu, var = xm.mean(1), xm.var(1, unbiased=False)
    sig_b, sig = torch.sqrt(var + eps), torch.sqrt(rv + eps)
    r = (sig_b / sig).clamp(1 / rmax, rmax).detach()
    d = ((mu - rm) / sig).clamp(-dmax, dmax).detach()
    shape = [1, -1] + [1] * (x.dim() - 2)
    xhat = (x - mu.view(shape)) / sig_b.view(shape)
    return w.view(shape) * (xhat * r.view(shape) + d.view(shape)) + b.view(shape)


def test_batch_renorm_warmup_is_plain_bn_then_clipped_correction():
    layer = bn.BatchRenorm2d(3, warmup_steps=2, rmax_steps=2, dmax_steps=2, rmax=1.5, dmax=0.5).double()
    plain = nn.BatchNorm2d(3, momentum=0.01).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) * 3 + 2
    for _ in range(2):  # warm-up: r_max = 1, d_max = 0
        assert rel_err(layer(x), plain(x)) < 1e-12
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
    xr = x.clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    expect = _naive_renorm(xr, layer.running_mean.clone(), layer.running_var.clone(), w, b, 1.5, 0.5, 1e-5)
    xo = x.clone().requires_grad_(True)
    y = layer(xo)
    assert rel_err(y, expect) < 1e-12
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, [xo, layer.weight, layer.bias], g)
    theirs = torch.autograd.grad(expect, [xr, w, b], g)
    for a, c in zip(ours, theirs):
        assert rel_err(a, c) < 1e-10


def test_freeze_survives_train_and_unfreeze_restores():
    model = nn.Sequential(nn.Linear(4, 3), bn.BatchNorm1d(3), nn.ReLU(), nn.BatchNorm1d(3))
    model(torch.randn(16, 4))
    bn.freeze(model)
    model.train()
    assert isinstance(model[3], bn.BatchNorm1d)  # torch's BN was swapped for ours
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    y = model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    h = model[0](x)
    expect = bn_eval(h, model[1].running_mean, model[1].running_var, model[1].weight, model[1].bias)
    assert rel_err(model[1](h), expect) < 1e-6
    y.sum().backward()
    assert model[1].weight.grad is None and model[0].weight.grad is not None
    model[1].weight.requires_grad_(True)  # even re-enabling grads does not train a frozen gamma
    model(x).sum().backward()
    assert model[1].weight.grad is None
    bn.unfreeze(model)
    model(x)
    assert model[1].num_batches_tracked.item() == before["1.num_batches_tracked"].item() + 1


def test_freeze_knobs_are_independent():
    layer = bn.BatchNorm1d(2)
    layer.update_running_stats = False  # batch statistics, but running ones stay
    layer(torch.randn(5, 2) + 3)
    assert torch.equal(layer.running_mean, torch.zeros(2)) and layer.num_batches_tracked.item() == 0
    layer.update_running_stats, layer.use_running_stats = True, True  # running stats, still updated
    x = torch.randn(5, 2, dtype=torch.float32) + 3
    y = layer(x)
    assert rel_err(y, bn_eval(x, torch.zeros(2), torch.ones(2), layer.weight, layer.bias)) < 1e-6
    assert torch.allclose(layer.running_mean, 0.1 * x.mean(0))


def test_frozen_bn_loads_torch_checkpoints_exactly():
    src = nn.BatchNorm2d(5, eps=1e-3)
    src(torch.randn(4, 5, 3, 3))
    with torch.no_grad():
        src.weight.uniform_(0.5, 1.5)
        src.bias.uniform_(-1, 1)
    src.eval()
    frozen = bn.FrozenBatchNorm2d(5, eps=1e-3)
    frozen.load_state_dict(src.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 5, 4, 4)
    assert rel_err(frozen(x), src(x)) < 1e-6
    assert frozen.eps == 1e-3
    assert rel_err(bn.FrozenBatchNorm2d.from_module(src)(x), src(x)) < 1e-6
    # torchvision's FrozenBatchNorm2d state dict: buffers weight, bias, running_mean, running_var
    tv_state = {k: v for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    frozen2 = bn.FrozenBatchNorm2d(5, eps=1e-3)
    frozen2.load_state_dict(tv_state)
    assert torch.equal(frozen2(x), frozen(x))
    assert list(frozen.parameters()) == []


def test_nonfinite_batch_keeps_running_statistics_and_counter():
    layer = bn.BatchNorm1d(3)
    layer(torch.randn(8, 3))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(8, 3)
    bad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="last good values"):
        layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch_layer = bn.BatchNorm1d(3, nonfinite="propagate")
    torch_layer(bad)
    assert not torch.isfinite(torch_layer.running_mean).all()


# ----------------------------------------------------------------------------- bad input


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, snap):
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k]), k


@pytest.mark.parametrize(
    "layer,x,exc,match",
    [
        (lambda: bn.BatchNorm2d(4), torch.randn(2, 4, 3), ValueError, r"expected 4D input \(got 3D input\)"),
        (lambda: bn.BatchNorm1d(4), torch.randn(2, 4, 3, 3), ValueError, r"expected 2D or 3D input \(got 4D input\)"),
        (lambda: bn.BatchNorm3d(4), torch.randn(2, 4, 3, 3), ValueError, r"expected 5D input \(got 4D input\)"),
        (lambda: bn.BatchNorm2d(4), torch.randn(2, 3, 3, 3), ValueError, "expected input with 4 features.*got 3"),
        (lambda: bn.BatchNorm1d(4), torch.ones(2, 4, dtype=torch.int64), TypeError,
         "expected a floating-point input, got torch.int64"),
        (lambda: bn.BatchNorm1d(4), torch.ones(2, 4, dtype=torch.bool), TypeError, "floating-point"),
        (lambda: bn.BatchNorm1d(8), torch.randn(1, 8), ValueError,
         r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 8\]\).*drop_last"),
        (lambda: bn.BatchNorm2d(8), torch.randn(1, 8, 1, 1), ValueError, "more than 1 value per channel"),
    ],
)
def test_bad_input_raises_and_changes_nothing(layer, x, exc, match):
    m = layer()
    m(torch.randn(4, m.num_features, *([3] * (m._valid_dims[-1] - 2))))
    snap = _snapshot(m)
    with pytest.raises(exc, match=match):
        m(x)
    _assert_unchanged(m, snap)


def test_bad_mask_raises_and_changes_nothing():
    m = bn.BatchNorm1d(3)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match="mask of shape"):
        m(torch.randn(4, 3, 5), mask=torch.ones(4, 6, dtype=torch.bool))
    _assert_unchanged(m, snap)


def test_buffer_length_mismatch_uses_torch_wording():
    import batchnorm.functional as BF

    x = torch.randn(5, 4, 2, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="running_mean should contain 4 elements not 3"):
        BF.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3))
    with pytest.raises(ValueError, match="weight should contain 4 elements not 2"):
        BF.batch_norm(x, torch.zeros(4), torch.ones(4), torch.ones(2), training=True)
    with pytest.raises(ValueError, match="eps must be positive during training, but got 0.0"):
        BF.batch_norm(x, torch.zeros(4), torch.ones(4), training=True, eps=0.0)


def test_empty_batch_returns_empty_and_leaves_statistics():
    m = bn.BatchNorm2d(3)
    snap = _snapshot(m)
    y = m(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    assert m.num_batches_tracked.item() == 1  # counted, as torch counts it (tests/core/test_torch_parity.py)
    snap["num_batches_tracked"] += 1
    _assert_unchanged(m, snap)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_features": 0}, "num_features"),
        ({"num_features": 4, "momentum": 1.5}, "momentum"),
        ({"num_features": 4, "momentum": -0.1}, "momentum"),
        ({"num_features": 4, "eps": -1e-5}, "eps"),
        ({"num_features": 4, "virtual_batch_size": 0}, "virtual_batch_size"),
        ({"num_features": 4, "nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bn.BatchNorm2d(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"rmax": 0.5}, "rmax"), ({"dmax": -1.0}, "dmax"),
                                          ({"track_running_stats": False}, "track_running_stats")])
def test_bad_renorm_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bn.BatchRenorm1d(4, **kwargs)


def test_deepcopy_and_repr():
    m = bn.BatchNorm2d(4, virtual_batch_size=8)
    m.use_running_stats = True
    c = copy.deepcopy(m)
    assert c.use_running_stats and c.virtual_batch_size == 8
    assert "virtual_batch_size=8" in repr(m) and "use_running_stats=True" in repr(m)
