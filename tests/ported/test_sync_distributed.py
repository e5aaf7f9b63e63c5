"""PyTorch's distributed SyncBatchNorm tests, on ``batchnorm.SyncBatchNorm`` with gloo on 2 CPU processes.

Source: ``torch/testing/_internal/distributed/distributed_test.py`` of torch 2.13.0 (the installed
package), class ``DistributedTest._DistTestBase``, and its helpers ``BatchNormNet``,
``_test_DDP_helper``, ``_test_DDP_niter``, ``_model_step``/``_model_step_with_zero_grad`` and
``_test_DistributedDataParallel_SyncBatchNorm`` (restated below). Those tests are
``@skip_if_no_gpu`` in torch because ``torch.nn.SyncBatchNorm`` is GPU-only; ours runs on gloo, so
they run here on the CPU with ``DistributedDataParallel`` without ``device_ids``. The reference
("single device") model is built from torch's ``nn.BatchNorm1d`` and converted with
``batchnorm.SyncBatchNorm.convert_sync_batchnorm`` for the DDP side, as the originals convert
with ``nn.SyncBatchNorm.convert_sync_batchnorm``.

Ported: ``test_DistributedDataParallel_SyncBatchNorm`` (the original's three calls differ only
in GPU ``output_device``/``device_ids``; one CPU call here), ``..._No_Affine``, ``..._2D_Input``,
``..._Single_Input_Per_Process``, ``..._Diff_Input_Sizes_Running_Value``,
``..._Diff_Input_Sizes_gradient``, ``..._Channels_Last`` (4D channels_last and 5D
channels_last_3d, via ``_test_DistributedDataParallel_SyncBatchNorm_with_memory_format``),
``..._half``, ``test_SyncBatchNorm_process_group`` (a nested module instead of torchvision's
resnet50, which is not installed), ``test_ddp_uneven_inputs_stop_iteration_sync_bn`` (the SyncBN
model; its second model has no BN) and the SyncBN half of ``test_ddp_inference``.

Not ported: ``test_ddp_sync_bn_training_vs_eval`` (``@unittest.skip`` upstream: "Test is
failing"); ``test_sync_bn_logged`` (checks DDP's logging flag ``has_sync_bn``, which DDP sets by
class identity with ``torch.nn.SyncBatchNorm``: telemetry, not behaviour);
``test_ddp_uneven_inputs`` (its BN model uses plain BatchNorm1d under DDP's join; it tests DDP's
join, not SyncBN). The ``test_nn.py`` ``convert_sync_batchnorm`` test is in ``test_torch_nn.py``.

Every rank runs with a SIGALRM deadline (the default action kills the process, so a rank stuck in
a collective cannot hang the suite); collectives also time out after 60 s (tests/tools/_dist.py,
whose ``run_ranks`` spawns the gloo processes). Workers only compute; all assertions run in the
test process on what the ranks return, so a failed check on one rank cannot leave the other
waiting in a collective.
"""

from __future__ import annotations

import copy
import signal
import tempfile

import pytest
import torch
import torch._dynamo  # (see below)
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import batchnorm as B

from ..tools._dist import run_ranks

WORLD = 2
DEADLINE_S = 90
# DistributedDataParallel imports torch._dynamo on first construction (~5 s); imported above, before
# the ranks fork, it is paid once per session instead of once per spawned rank.

pytestmark = pytest.mark.filterwarnings("ignore:momentum=0.99 in PyTorch convention:UserWarning")


def _guarded(rank, world, backend, deadline, fn, *args):
    """Runs on each rank: a kill deadline, the test's backend, the same seed on every rank."""
    signal.alarm(deadline)
    B.set_backend(backend)
    torch.manual_seed(0)
    try:
        return fn(rank, world, *args)
    finally:
        signal.alarm(0)


def _spawn(tmp_path, backend, fn, *args, deadline=DEADLINE_S):
    try:
        return run_ranks(_guarded, WORLD, tmp_path, backend, deadline, fn, *args)
    except AssertionError as e:
        cause = str(e.__cause__ or "")
        if "SIGALRM" in cause:
            raise AssertionError(f"{cause}: a rank passed its {deadline} s deadline (stuck, e.g. in a collective "
                                 f"its peer never joined)\n{e}") from e
        raise AssertionError(f"{e}\n{cause}") from e


class BatchNormNet(nn.Module):
    """distributed_test.BatchNormNet: Linear(2, 40) -> view (N, 4, 10) -> BatchNorm1d(4) -> Linear."""

    def __init__(self, affine=True):
        super().__init__()
        self.fc1 = nn.Linear(2, 40, bias=False)
        self.bn = nn.BatchNorm1d(4, affine=affine)
        self.fc2 = nn.Linear(40, 4, bias=False)

    def forward(self, x):
        x = torch.reshape(self.fc1(x), (-1, 4, 10))
        x = self.bn(x)
        x = torch.reshape(x, (-1, 40))
        x = self.fc2(x)
        return F.softmax(x, dim=1)


def _model_step(model):
    for param in model.parameters():
        if param.grad is not None:
            with torch.no_grad():
                param += param.grad
            param.grad = None


def _model_step_with_zero_grad(model):
    for param in model.parameters():
        if param.grad is not None:
            with torch.no_grad():
                param += param.grad
            param.grad.requires_grad_(False)
            param.grad.zero_()


def _ddp_helper(model, inp, target, loss, scale_factor=1.0, memory_format=None):
    model.train()
    output = model(inp)
    (loss(output, target) * scale_factor).backward()
    return None if memory_format is None else output.is_contiguous(memory_format=memory_format)


def _ddp_niter(model_base, model_ddp, inp, target, loss, local_bs, rank, batch_size, offset=None,
               world_size=0, zero_grad=False, memory_format=None, n_iter=5):
    """distributed_test._test_DDP_niter, returning what the original asserts (parameters of both
    models after each step, output memory formats, the state dict before/after a save-load)."""
    record = {"base_params": [], "ddp_params": [], "base_format": [], "ddp_format": []}
    for _ in range(n_iter):
        record["base_format"].append(_ddp_helper(model_base, inp, target, loss, memory_format=memory_format))
        if offset is None:
            offset = rank * local_bs
        scale = world_size * local_bs / batch_size if world_size != 0 else 1
        record["ddp_format"].append(_ddp_helper(model_ddp, inp[offset:offset + local_bs],
                                                target[offset:offset + local_bs], loss, scale,
                                                memory_format=memory_format))
        if zero_grad:
            _model_step_with_zero_grad(model_base)
            _model_step_with_zero_grad(model_ddp)
        else:
            _model_step(model_base)
            _model_step(model_ddp)
        record["base_params"].append([p.detach().clone() for p in model_base.parameters()])
        record["ddp_params"].append([p.detach().clone() for p in model_ddp.module.parameters()])
        inp = inp[torch.randperm(batch_size)]
    with tempfile.TemporaryFile() as f:
        torch.save(model_ddp, f)
        f.seek(0)
        saved = torch.load(f, weights_only=False)
    record["state"] = {k: v.detach().clone() for k, v in model_ddp.state_dict().items()}
    record["saved_state"] = {k: v.detach().clone() for k, v in saved.state_dict().items()}
    return record


def _check_niter(results):
    for r in results:
        for step, (base, ddp) in enumerate(zip(r["base_params"], r["ddp_params"])):
            assert len(base) == len(ddp)
            for p_base, p_ddp in zip(base, ddp):
                torch.testing.assert_close(p_ddp, p_base, msg=lambda m, s=step: f"after step {s}: {m}")
        for k, v in r["state"].items():
            torch.testing.assert_close(r["saved_state"][k], v)
        for fmt_ok in r["base_format"] + r["ddp_format"]:
            assert fmt_ok in (None, True), "output not in the input's memory format"


def _syncbn_ddp_worker(rank, world, local_bs, global_bs, offset, affine):
    """distributed_test._test_DistributedDataParallel_SyncBatchNorm on the CPU."""
    model = BatchNormNet() if affine else BatchNormNet(affine=False)
    model_base = copy.deepcopy(model)
    model_ddp = DDP(B.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)))
    classes = sorted({type(m).__name__ for m in model_ddp.module.modules()})
    with tempfile.TemporaryFile() as f:  # serializable / unserializable
        torch.save(model_ddp, f)
        f.seek(0)
        model_ddp = torch.load(f, weights_only=False)
    input_cpu = torch.randn(global_bs, 2)
    target = torch.randn(global_bs, 4)
    record = _ddp_niter(model_base, model_ddp, input_cpu, target, nn.MSELoss(), local_bs, rank, global_bs,
                        offset, dist.get_world_size(), 5 if affine else 2)
    dist.barrier()
    record["classes"] = classes
    return record


def test_DistributedDataParallel_SyncBatchNorm(tmp_path, backend):
    """distributed_test.py::test_DistributedDataParallel_SyncBatchNorm: BatchNormNet with its BN
    converted to SyncBatchNorm under DDP, 2 samples per rank, trains 5 steps exactly like the
    single-process model on the whole batch (parameters equal after every step), survives a
    torch.save/torch.load before training and after."""
    results = _spawn(tmp_path, backend, _syncbn_ddp_worker, 2, 2 * WORLD, None, True)
    assert "SyncBatchNorm" in results[0]["classes"] and "BatchNorm1d" not in results[0]["classes"]
    _check_niter(results)


def test_DistributedDataParallel_SyncBatchNorm_No_Affine(tmp_path, backend):
    """distributed_test.py::test_DistributedDataParallel_SyncBatchNorm_No_Affine: as above with
    ``affine=False``."""
    _check_niter(_spawn(tmp_path, backend, _syncbn_ddp_worker, 2, 2 * WORLD, None, False))


def _diff_sizes_gradient_worker(rank, world):
    local_bs = rank + 2
    bs_offset = int((rank + 3) * rank / 2)
    global_bs = int((world + 3) * world / 2)
    return _syncbn_ddp_worker(rank, world, local_bs, global_bs, bs_offset, True)


def test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_gradient(tmp_path, backend):
    """distributed_test.py::test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_gradient:
    uneven per-rank batches (2 and 3 samples, loss scaled by world*local/global) train like the
    single-process model on the 5 samples."""
    _check_niter(_spawn(tmp_path, backend, _diff_sizes_gradient_worker))


def _bn1d_worker(rank, world, local_bs):
    model = nn.BatchNorm1d(2)
    model_base = copy.deepcopy(model)
    model_ddp = DDP(B.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)))
    global_bs = world * local_bs
    input_cpu = torch.randn(global_bs, 2)
    target = torch.randn(global_bs, 2)
    record = _ddp_niter(model_base, model_ddp, input_cpu, target, nn.MSELoss(), local_bs, rank, global_bs)
    dist.barrier()
    return record


def test_DistributedDataParallel_SyncBatchNorm_2D_Input(tmp_path, backend):
    """distributed_test.py::test_DistributedDataParallel_SyncBatchNorm_2D_Input: a converted
    BatchNorm1d(2) on (N, 2) input, 2 samples per rank, trains like the single-process layer."""
    _check_niter(_spawn(tmp_path, backend, _bn1d_worker, 2))


def test_DistributedDataParallel_SyncBatchNorm_Single_Input_Per_Process(tmp_path, backend):
    """distributed_test.py::test_DistributedDataParallel_SyncBatchNorm_Single_Input_Per_Process: one
    sample per rank is enough (the "more than one value per channel" rule applies to the global
    batch of 2)."""
    _check_niter(_spawn(tmp_path, backend, _bn1d_worker, 1))


def _memory_format_worker(rank, world, memory_format):
    local_bs = 2
    bs_offset = int(rank * 2)
    global_bs = int(world * 2)
    model = B.SyncBatchNorm(2, momentum=0.99)
    model_base = copy.deepcopy(model)
    model_ddp = DDP(model_base)  # the original wraps the same module it uses as the base model
    shapes = [global_bs, 2, 4, 4] + ([] if memory_format is torch.channels_last else [4])
    inp = torch.randn(*shapes, dtype=torch.float).to(memory_format=memory_format)
    target = torch.randn(*shapes, dtype=torch.float).to(memory_format=memory_format)
    record = _ddp_niter(model_base, model_ddp, inp, target, nn.MSELoss(), local_bs, rank, global_bs, bs_offset,
                        dist.get_world_size(), memory_format=memory_format)
    dist.barrier()
    return record


def test_DistributedDataParallel_SyncBatchNorm_Channels_Last(tmp_path, backend):
    """distributed_test.py::test_DistributedDataParallel_SyncBatchNorm_Channels_Last (through
    ``_test_DistributedDataParallel_SyncBatchNorm_with_memory_format``): SyncBatchNorm(2,
    momentum=0.99) under DDP on 4D channels_last and 5D channels_last_3d input keeps the memory
    format in its output over 5 steps and survives save/load."""
    for i, fmt in enumerate((torch.channels_last, torch.channels_last_3d)):
        d = tmp_path / str(i)
        d.mkdir()
        _check_niter(_spawn(d, backend, _memory_format_worker, fmt))


def _running_value_worker(rank, world):
    only_sbn_net = B.SyncBatchNorm(2, momentum=0.99)
    model = DDP(only_sbn_net)
    input_var = []
    for i in range(world):
        input_var.append(torch.cat([torch.ones(2, 1, 10 ** (i + 1)) * (0.1 ** (i - 1)),
                                    torch.ones(2, 1, 10 ** (i + 1)) * (0.3 ** (i - 1))], dim=1))
    all_input_var = torch.cat([x.permute(1, 0, 2).reshape(only_sbn_net.num_features, -1) for x in input_var], dim=1)
    for _ in range(100):
        y = model(input_var[rank])
        y.mean().backward()
    return {"running_mean": model.module.running_mean.clone(), "running_var": model.module.running_var.clone(),
            "expected_mean": all_input_var.mean(1), "expected_var": all_input_var.var(1)}


def test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_Running_Value(tmp_path, backend):
    """distributed_test.py::test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_Running_Value:
    ranks with different spatial sizes ((2, 2, 10) and (2, 2, 100)); after 100 steps with momentum
    0.99 the running mean and (unbiased) variance equal those of all the values together."""
    for r in _spawn(tmp_path, backend, _running_value_worker):
        torch.testing.assert_close(r["running_mean"], r["expected_mean"])
        torch.testing.assert_close(r["running_var"], r["expected_var"])


def _half_worker(rank, world):
    model = BatchNormNet()
    model = model.half()
    model = B.SyncBatchNorm.convert_sync_batchnorm(model)
    model = DDP(model)
    inp = torch.randn(2, 2, dtype=torch.float16)
    out = model(inp)
    out.sum().backward()
    return {"out_dtype": out.dtype, "grad_dtypes": [p.grad.dtype for p in model.parameters()]}


def test_DistributedDataParallel_SyncBatchNorm_half(tmp_path, backend):
    """distributed_test.py::test_DistributedDataParallel_SyncBatchNorm_half: a float16 model with
    SyncBatchNorm under DDP runs forward and backward without dtype mismatches; output and every
    parameter gradient are float16."""
    for r in _spawn(tmp_path, backend, _half_worker):
        assert r["out_dtype"] == torch.float16
        assert all(d == torch.float16 for d in r["grad_dtypes"]), r["grad_dtypes"]


def _process_group_worker(rank, world):
    process_group = dist.new_group([0])  # every rank takes part in creating it
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())))
    model_sync = B.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model), process_group)
    nested = model_sync[1][0][0]
    return {"class": type(nested).__name__, "same_group": nested.process_group is process_group}


def test_SyncBatchNorm_process_group(tmp_path, backend):
    """distributed_test.py::test_SyncBatchNorm_process_group: ``convert_sync_batchnorm(module,
    process_group)`` passes the group to a SyncBatchNorm nested two levels deep (the original uses
    torchvision's resnet50 and checks ``layer1[0].bn1``)."""
    for r in _spawn(tmp_path, backend, _process_group_worker):
        assert r["class"] == "SyncBatchNorm"
        assert r["same_group"]


def _uneven_worker(rank, world):
    model_bn = B.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(BatchNormNet()))
    model_input = torch.randn(10, 2)
    model = DDP(model_bn)
    min_num_iters = 5
    num_iters = min_num_iters if rank != 0 else min_num_iters * 2
    n, error = 0, None
    try:
        with model.join(throw_on_early_termination=True):
            for _ in range(num_iters):
                loss = model(model_input).sum()
                loss.backward()
                _model_step(model)
                n += 1
    except RuntimeError as e:
        error = str(e)
    return {"n": n, "error": error, "params": [p.detach().clone() for p in model.module.parameters()]}


def test_ddp_uneven_inputs_stop_iteration_sync_bn(tmp_path, backend):
    """distributed_test.py::test_ddp_uneven_inputs_stop_iteration_sync_bn (SyncBN model): with
    ``join(throw_on_early_termination=True)``, rank 1 (5 inputs) raises "Rank 1 exhausted all
    inputs", rank 0 (10 inputs) raises "Detected at least one rank that exhausted inputs.", both
    after 5 steps, and the replicas stay identical."""
    results = _spawn(tmp_path, backend, _uneven_worker)
    assert results[1]["error"] is not None and "Rank 1 exhausted all inputs" in results[1]["error"], results[1]["error"]
    assert results[0]["error"] is not None and "Detected at least one rank that exhausted inputs." in \
        results[0]["error"], results[0]["error"]
    for r in results:
        assert r["n"] == 5
    for p0, p1 in zip(results[0]["params"], results[1]["params"]):
        torch.testing.assert_close(p0, p1)


def _inference_worker(rank, world):
    syncbn_model = B.SyncBatchNorm(2, momentum=0.99, track_running_stats=False)
    local_syncbn_model = copy.deepcopy(syncbn_model)
    syncbn_model = DDP(syncbn_model)
    inp_syncbn = torch.randn(10, 2, 4, 4)
    outs = []
    if rank == 0:  # only rank 0 runs inference: no collective may happen in eval mode
        syncbn_model.eval()
        local_syncbn_model.eval()
        for _ in range(6):
            outs.append((syncbn_model(inp_syncbn).detach(), local_syncbn_model(inp_syncbn).detach()))
    dist.barrier()
    return outs


def test_ddp_inference(tmp_path, backend):
    """distributed_test.py::test_ddp_inference (its SyncBatchNorm half): a DDP-wrapped
    SyncBatchNorm(2, momentum=0.99, track_running_stats=False) in eval mode, run on rank 0 only,
    must not communicate (torch's SyncBatchNorm only syncs in training) and equals a local copy.
    The deadline is 15 s here: a rank waiting for a collective its peer never joins is killed."""
    results = _spawn(tmp_path, backend, _inference_worker, deadline=15)
    assert len(results[0]) == 6
    for out, ref in results[0]:
        torch.testing.assert_close(out, ref)

