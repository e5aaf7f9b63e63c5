"""batchnorm.functional.batch_norm against torch's and against a float64 reference."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm.functional as BF

from .naive import bn_eval, bn_train, rel_err


def test_signature_matches_torch():
    ours = inspect.signature(BF.batch_norm).parameters
    theirs = inspect.signature(torch.nn.functional.batch_norm).parameters
    ours_positional = [p for p in ours.values() if p.kind != p.KEYWORD_ONLY]
    assert [p.name for p in ours_positional] == list(theirs)
    assert [p.default for p in ours_positional] == [p.default for p in theirs.values()]


shapes = st.one_of(
    st.tuples(st.integers(2, 9), st.integers(1, 6)),
    st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(2, 7)),
    st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(2, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(2, 3)),
)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, momentum=st.floats(0.0, 1.0), affine=st.booleans(),
       channels_last=st.booleans(), offset=st.floats(-100, 100))
def test_training_matches_float64_reference_and_torch(shape, momentum, affine, channels_last, offset):
    x = torch.randn(shape) * 3 + offset
    if channels_last and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    c = shape[1]
    w = torch.rand(c) + 0.5 if affine else None
    b = torch.randn(c) if affine else None
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y = BF.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=1e-5)
    y_ref, mean, _, var_u = bn_train(x, w, b, eps=1e-5)
    assert rel_err(y, y_ref) < 1e-5
    assert y.shape == x.shape and y.dtype == x.dtype
    if channels_last and x.dim() in (4, 5) and not x.is_contiguous():
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt)
    assert torch.allclose(rm.double(), (1 - momentum) * rm_t.double() + momentum * mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(rv.double(), (1 - momentum) * rv_t.double() + momentum * var_u, rtol=1e-5, atol=1e-4)
    # and torch agrees, within its own float32 error (ours is held to the float64 truth above)
    rm_t2, rv_t2 = rm_t.clone(), rv_t.clone()
    y_t = torch.nn.functional.batch_norm(x, rm_t2, rv_t2, w, b, True, momentum, 1e-5)
    assert rel_err(y, y_t) < 1e-4
    assert torch.allclose(rm, rm_t2, rtol=1e-5, atol=1e-5)
    assert torch.allclose(rv, rv_t2, rtol=1e-5, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, affine=st.booleans())
def test_inference_is_algorithm_2(shape, affine):
    x = torch.randn(shape, dtype=torch.float64)
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(c, dtype=torch.float64) if affine else None
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.1
    before = (rm.clone(), rv.clone())
    y = BF.batch_norm(x, rm, rv, w, b, training=False)
    assert rel_err(y, bn_eval(x, rm, rv, w, b)) < 1e-12
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_no_running_stats_uses_batch_statistics_in_eval():
    x = torch.randn(6, 3, dtype=torch.float64)
    y = BF.batch_norm(x, None, None, training=False)
    assert rel_err(y, bn_train(x)[0]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_float32_statistics(dtype):
    x = (torch.randn(16, 4, 5) * 2 + 50).to(dtype)
    rm, rv = torch.zeros(4), torch.ones(4)
    y = BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert y.dtype == dtype and rm.dtype == torch.float32
    y_ref, mean, _, var_u = bn_train(x.float())  # statistics of the half values, exactly
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert rel_err(y, y_ref) < tol
    assert torch.allclose(rm.double(), mean, rtol=1e-5)
    assert torch.allclose(rv.double(), var_u, rtol=1e-4)


def test_float64_statistics_are_exact_for_large_offsets():
    # one-pass E[x^2]-E[x]^2 would lose everything here; two-pass keeps it
    x = torch.randn(64, 3, dtype=torch.float64) + 1e8
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert torch.allclose(rv, x.var(0), rtol=1e-6)


def test_float32_statistics_survive_offset():
    x = torch.randn(256, 2) + 1e4
    rm, rv = torch.zeros(2), torch.ones(2)
    y = BF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert rel_err(y, bn_train(x)[0]) < 1e-3
    assert torch.allclose(rv.double(), x.double().var(0), rtol=1e-3)


def test_momentum_tensor_gives_cumulative_average():
    xs = [torch.randn(5, 2, dtype=torch.float64) for _ in range(4)]
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for t, x in enumerate(xs, start=1):
        BF.batch_norm(x, rm, rv, training=True, momentum=torch.tensor(1.0 / t))
    assert torch.allclose(rm, torch.stack([x.mean(0) for x in xs]).mean(0))
    assert torch.allclose(rv, torch.stack([x.var(0) for x in xs]).mean(0))


def test_combine_stats_is_exact():
    parts = [torch.randn(n, 3, dtype=torch.float64) * (i + 1) + i for i, n in enumerate((3, 7, 1, 0, 5))]
    mean = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    var = torch.stack([p.var(0, unbiased=False) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    count = torch.tensor([float(len(p)) for p in parts])
    s = BF.combine_stats(mean, var, count)
    allx = torch.cat(parts)
    assert torch.allclose(s.mean, allx.mean(0)) and torch.allclose(s.var, allx.var(0, unbiased=False))
    assert s.count.item() == len(allx)


def test_batch_stats_with_mask_equals_stats_of_selected_values():
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    mask = torch.rand(4, 6) > 0.4
    mask[0, 0] = True
    s = BF.batch_stats(x, mask)
    sel = x.permute(1, 0, 2)[:, mask]  # (C, valid)
    assert torch.allclose(s.mean, sel.mean(1)) and torch.allclose(s.var, sel.var(1, unbiased=False))
    assert s.count.item() == mask.sum().item()


def test_nonfinite_modes():
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.warns(RuntimeWarning, match="not finite"):
        BF.batch_norm(x, rm, rv, training=True, nonfinite="skip")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(FloatingPointError):
        BF.batch_norm(x, rm, rv, training=True, nonfinite="raise")
    assert torch.equal(rm, torch.zeros(3))
    BF.batch_norm(x, rm, rv, training=True, nonfinite="propagate")
    assert torch.isnan(rm[1]) and torch.isfinite(rm[0])
    with pytest.raises(ValueError, match="nonfinite"):
        BF.batch_norm(x, rm, rv, training=True, nonfinite="ignore")


@pytest.mark.parametrize("nonfinite", ["propagate", "skip", "raise"])
@pytest.mark.parametrize("case", ["normal", "nan", "one_value"])
def test_running_update_eager_path_matches_general_path(nonfinite, case):
    """The eager CPU update (float momentum, branches in Python) against the general masked form
    (taken for a 0-d tensor momentum, as under torch.compile), in float64 for both."""
    mean = torch.randn(5, dtype=torch.float64)
    var = torch.rand(5, dtype=torch.float64) + 0.1
    if case == "nan":
        mean[3] = float("nan")
    count = torch.tensor(1.0 if case == "one_value" else 40.0, dtype=torch.float64)
    stats = BF.Stats(mean, var, count)
    before = (torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 1)
    results = []
    for momentum in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        rm, rv = before[0].clone(), before[1].clone()
        if nonfinite == "raise" and case == "nan":
            with pytest.raises(FloatingPointError):
                BF.update_running_stats(rm, rv, stats, momentum, nonfinite)
            assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
            continue
        ctx = pytest.warns(RuntimeWarning, match="not finite") if (nonfinite, case) == ("skip", "nan") else None
        if ctx is None:
            accepted = BF.update_running_stats(rm, rv, stats, momentum, nonfinite)
        else:
            with ctx:
                accepted = BF.update_running_stats(rm, rv, stats, momentum, nonfinite)
        expect_update = case == "normal" or (case == "nan" and nonfinite == "propagate")
        assert bool(accepted) == expect_update
        if expect_update:
            torch.testing.assert_close(rm, before[0] + 0.3 * (mean - before[0]), equal_nan=True)
            torch.testing.assert_close(rv, before[1] + 0.3 * (var * 40 / 39 - before[1]))
        else:
            assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
        results.append((rm, rv, accepted))
    if len(results) == 2:
        torch.testing.assert_close(results[0][0], results[1][0], equal_nan=True)
        torch.testing.assert_close(results[0][1], results[1][1])


def test_renorm_limits_follow_the_paper_schedule():
    lim = lambda s: [float(v) for v in BF.renorm_limits(s, 3.0, 5.0, 5000, 40000, 25000)]  # noqa: E731
    assert lim(0) == [1.0, 0.0] and lim(4999) == [1.0, 0.0]
    r, d = lim(22500)  # half-way to rmax's end, 87.5% of dmax's ramp
    assert r == pytest.approx(1 + 2 * 17500 / 35000) and d == pytest.approx(5 * 17500 / 20000)
    assert lim(10**6) == [3.0, 5.0]
    assert [float(v) for v in BF.renorm_limits(0, 2.0, 1.0, 0, 0, 0)] == [2.0, 1.0]


def test_keras_momentum_conversion():
    assert BF.keras_to_torch_momentum(0.99) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        BF.keras_to_torch_momentum(1.5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_running_update_in_the_training_call_matches_the_separate_update(backend, channels_last):
    """A float momentum lets the training op move the running statistics itself (``running=``);
    a 0-d tensor momentum takes the separate general update. Both agree, with and without
    autograd, for the functional form and for the layers (num_batches_tracked included)."""
    import batchnorm

    if backend not in batchnorm.available_backends():
        pytest.skip(f"backend {backend} not installed")
    x = torch.randn(6, 5, 7, 9) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    with batchnorm.use_backend(backend):
        for requires_grad in (False, True):
            xx = x.clone().requires_grad_(requires_grad)
            runs = []
            for momentum in (0.2, torch.tensor(0.2)):
                rm, rv = torch.zeros(5), torch.ones(5)
                version = rm._version
                y, accepted = BF.batch_norm_with_update(xx, rm, rv, w, b, normalize_with_batch=True, update=True,
                                                        momentum=momentum)
                assert isinstance(accepted, torch.Tensor) and accepted.shape == () and bool(accepted)
                assert rm._version > version
                runs.append((y, rm, rv))
                _, plain = BF.batch_norm_with_update(xx.detach(), rm.clone(), rv.clone(), w, b,
                                                     normalize_with_batch=True, update=True, momentum=momentum,
                                                     accepted_tensor=False)
                assert plain is True if isinstance(momentum, float) else isinstance(plain, torch.Tensor)
            for a, e in zip(*runs):
                torch.testing.assert_close(a, e)
            if requires_grad:
                runs[0][0].sum().backward()
        for layer, theirs in ((batchnorm.BatchNorm2d(5), torch.nn.BatchNorm2d(5)),
                              (batchnorm.BatchNorm2d(5, momentum=None), torch.nn.BatchNorm2d(5, momentum=None)),
                              (batchnorm.BatchNormAct2d(5, act="identity"), torch.nn.BatchNorm2d(5))):
            for _ in range(3):
                xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
                layer(xa).square().sum().backward()
                theirs(xb).square().sum().backward()
                torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layer.running_mean, theirs.running_mean)
            torch.testing.assert_close(layer.running_var, theirs.running_var)
            assert layer.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
