"""SyncBatchNorm on 2-3 gloo processes against one BN over the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import batchnorm as B

from ._dist import run_ranks

# (world sizes per rank, input shape without N, dtype, masked, momentum)
CASES = [
    ((3, 5), (4, 3, 2), torch.float32, False, 0.1),
    ((0, 6), (5,), torch.float64, False, 0.1),
    ((4, 4), (3, 7), torch.float64, True, 0.1),
    ((1, 2), (2, 5), torch.float64, False, None),
]
CASES3 = [((2, 0, 5), (3, 4), torch.float64, False, 0.1), ((3, 5, 1), (6,), torch.float64, True, 0.2)]


def _global_case(i: int, sizes, shape, dtype, masked):
    g = torch.Generator().manual_seed(100 + i)
    n = sum(sizes)
    x = (torch.randn(n, *shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    dy = torch.randn(n, *shape, generator=g, dtype=torch.float64).to(dtype)
    mask = None
    if masked:
        spatial = (n, *shape[1:])
        mask = torch.rand(spatial, generator=g) > 0.3
        if len(shape) == 1:
            mask = torch.rand((n,), generator=g) > 0.3
    weight = torch.rand(shape[0], generator=g, dtype=torch.float64).to(dtype) + 0.5
    bias = torch.randn(shape[0], generator=g, dtype=torch.float64).to(dtype)
    return x, dy, mask, weight, bias


def _layer(cls, c, momentum, weight, bias, dtype):
    kw = {"axis": 1} if cls in (B.BatchNorm, B.SyncBatchNorm) else {}
    bn = cls(c, momentum=momentum, dtype=dtype, **kw)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def _run(bn, x, dy, mask, steps=2):
    """Two training steps (running statistics move twice), grads of the last one."""
    outs = {}
    for _ in range(steps):
        bn.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = bn(xi, mask) if mask is not None else bn(xi)
        (y * dy).sum().backward()
    outs.update(y=y.detach(), dx=xi.grad, dw=bn.weight.grad.clone(), db=bn.bias.grad.clone(),
                rm=bn.running_mean.clone(), rv=bn.running_var.clone(), nbt=int(bn.num_batches_tracked))
    return outs


def _sync_worker(rank, world, cases):
    results = []
    calls = {"n": 0}
    for name in ("all_gather", "all_reduce"):
        orig = getattr(dist, name)

        def counted(*a, _orig=orig, **k):
            calls["n"] += 1
            return _orig(*a, **k)

        setattr(dist, name, counted)
    for i, (sizes, shape, dtype, masked, momentum) in cases:
        x, dy, mask, weight, bias = _global_case(i, sizes, shape, dtype, masked)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        bn = _layer(B.SyncBatchNorm, shape[0], momentum, weight, bias, dtype)
        out = _run(bn, x[lo:hi], dy[lo:hi], None if mask is None else mask[lo:hi])
        # eval mode: the running statistics, no communication at all
        bn.eval()
        before = calls["n"]
        out["eval"] = bn(x[lo:hi]).detach()
        out["eval_calls"] = calls["n"] - before
        results.append(out)
    return results


def _reference(i, sizes, shape, dtype, masked, momentum, cls):
    x, dy, mask, weight, bias = _global_case(i, sizes, shape, dtype, masked)
    bn = _layer(cls, shape[0], momentum, weight, bias, dtype)
    out = _run(bn, x, dy, mask)
    bn.eval()
    out["eval"] = bn(x).detach()
    return out


def _check(results, i, case):
    sizes, shape, dtype, masked, momentum = case
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    refs = [_reference(i, *case, B.BatchNorm)]
    if not masked and momentum is not None:
        refs.append(_reference(i, *case, {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d}[len(shape)]))
    for ref in refs:
        torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref["y"], **tol)
        torch.testing.assert_close(torch.cat([r["dx"] for r in results]), ref["dx"], **tol)
        torch.testing.assert_close(torch.cat([r["eval"] for r in results]), ref["eval"], **tol)
        # each rank's gamma/beta gradient is its share: their sum is the full-batch gradient
        torch.testing.assert_close(sum(r["dw"] for r in results), ref["dw"], **tol)
        torch.testing.assert_close(sum(r["db"] for r in results), ref["db"], **tol)
        for r in results:  # every rank holds the global running statistics
            torch.testing.assert_close(r["rm"], ref["rm"], **tol)
            torch.testing.assert_close(r["rv"], ref["rv"], **tol)
            assert r["nbt"] == ref["nbt"] == 2
            assert r["eval_calls"] == 0


def test_sync_two_ranks_match_one_bn_over_concatenated_batch(tmp_path):
    cases = list(enumerate(CASES))
    results = run_ranks(_sync_worker, 2, tmp_path, cases)
    for k, (i, case) in enumerate(cases):
        _check([results[r][k] for r in range(2)], i, case)


def test_sync_three_ranks_uneven_and_empty(tmp_path):
    cases = [(10 + k, c) for k, c in enumerate(CASES3)]
    results = run_ranks(_sync_worker, 3, tmp_path, cases)
    for k, (i, case) in enumerate(cases):
        _check([results[r][k] for r in range(3)], i, case)


def _recal_and_convert_worker(rank, world):
    from .models import small_cnn

    torch.manual_seed(0)
    model = small_cnn(torch_bn=True)
    data = [torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(7 * rank + n)) for n in ((3, 1)[rank], 4)]
    model.eval()
    res = B.recalibrate(model, data)
    sync = B.convert(model, "sync")
    sync.train()
    x = torch.randn((5, 2)[rank], 3, 8, 8, generator=torch.Generator().manual_seed(99 + rank))
    y = sync(x)
    return {"state": model.state_dict(), "counts": res.counts, "data": data, "x": x, "y": y.detach(),
            "classes": sorted({type(m).__name__ for m in sync.modules()})}


def test_recalibrate_and_convert_under_distributed(tmp_path):
    from .models import small_cnn

    results = run_ranks(_recal_and_convert_worker, 2, tmp_path)
    torch.manual_seed(0)
    model = small_cnn(torch_bn=True).eval()
    res = B.recalibrate(model, [b for r in results for b in r["data"]])
    for r in results:
        assert r["counts"] == res.counts
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-6)
        assert "SyncBatchNorm" in r["classes"] and "BatchNorm2d" not in r["classes"]
    # the converted model in training mode normalizes over both ranks' batches
    model.train()
    y = model(torch.cat([r["x"] for r in results]))
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach(), rtol=1e-4, atol=1e-5)


def test_no_process_group_is_plain_bn():
    assert not dist.is_initialized()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    sync = B.SyncBatchNorm(4, dtype=torch.float64)
    ref = nn.BatchNorm1d(4, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)


def test_sync_rejects_ghost_batches_and_checks_axis():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        B.SyncBatchNorm(4, virtual_batch_size=2)
    bn = B.SyncBatchNorm(4, axis=-1)
    y = bn(torch.randn(3, 7, 4))
    assert y.shape == (3, 7, 4)


def _subgroup_worker(rank, world):
    group = dist.new_group([0, 2])  # every rank takes part in creating it
    x, dy, _, weight, bias = _global_case(50, (4, 0, 3), (3, 2), torch.float64, False)
    chunks = {0: slice(0, 4), 2: slice(4, 7)}
    if rank not in chunks:
        return None
    bn = _layer(B.SyncBatchNorm, 3, 0.1, weight, bias, torch.float64)
    bn.process_group = group
    return _run(bn, x[chunks[rank]], dy[chunks[rank]], None)


def test_sync_process_group_subgroup(tmp_path):
    results = run_ranks(_subgroup_worker, 3, tmp_path)
    assert results[1] is None
    ref = _reference(50, (4, 0, 3), (3, 2), torch.float64, False, 0.1, nn.BatchNorm1d)
    torch.testing.assert_close(torch.cat([results[0]["y"], results[2]["y"]]), ref["y"])
    torch.testing.assert_close(torch.cat([results[0]["dx"], results[2]["dx"]]), ref["dx"])
    torch.testing.assert_close(results[0]["dw"] + results[2]["dw"], ref["dw"])
    torch.testing.assert_close(results[2]["rv"], ref["rv"])


def _ddp_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 3, 1),
                         nn.BatchNorm1d(3)).double()


def _ddp_data():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(8, 2, 6, generator=g, dtype=torch.float64) * 2 + 1,
            torch.randn(8, 3, 6, generator=g, dtype=torch.float64))


def _ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, dy = _ddp_data()
    part = slice(0, 3) if rank == 0 else slice(3, 8)  # uneven per-rank batches
    model = DDP(B.convert(_ddp_model(), "sync"))
    out = model(x[part])
    # DDP averages gradients over ranks: scale by world so the average is the sum of the shares
    ((out * dy[part]).sum() * world).backward()
    return {"grads": {k: p.grad for k, p in model.module.named_parameters()}, "y": out.detach(),
            "state": model.module.state_dict()}


def test_ddp_with_sync_batchnorm_gradients_equal_single_process(tmp_path):
    results = run_ranks(_ddp_worker, 2, tmp_path)
    model = _ddp_model().train()
    x, dy = _ddp_data()
    out = model(x)
    (out * dy).sum().backward()
    tol = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), out.detach(), **tol)
    for r in results:  # every rank: the full-batch gradient of every parameter, upstream conv included
        for k, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][k], p.grad, **tol)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, **tol)


def _residual_block_worker(rank, world):
    """A ResNet block's tail on each rank: SyncBatchNorm, ``out += identity``, ``ReLU(inplace=True)``."""
    torch.manual_seed(rank)
    norm = B.SyncBatchNorm(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    out = norm(x)
    out += x
    torch.relu_(out).sum().backward()
    return {"x": x.detach(), "grad": x.grad, "wgrad": norm.weight.grad}


def test_sync_output_takes_inplace_ops(tmp_path):
    """The output is not a view, so in-place ops after the layer work; gradients equal one BN's
    over the concatenated batch (the parameter gradients summed over ranks)."""
    results = run_ranks(_residual_block_worker, 2, tmp_path)
    x = torch.cat([r["x"] for r in results]).requires_grad_()
    ref = nn.BatchNorm2d(3)
    out = ref(x)
    out += x
    torch.relu_(out).sum().backward()
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0]["wgrad"] + results[1]["wgrad"], ref.weight.grad, rtol=1e-4, atol=1e-5)
