"""Training loop and probes, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.lab import probes as P
from batchnorm.lab.models import build_model
from batchnorm.lab.train import RunConfig, config_hash, evaluate, train, with_recipe

TINY = {"data_limit": 300, "steps": 12, "eval_every": 4}


def test_deterministic_and_recipe():
    cfg = RunConfig(model="mlp", norm="batchnorm", **TINY)
    a, b = train(cfg), train(cfg)
    assert a["curves"]["test_loss"] == b["curves"]["test_loss"]
    assert a["hash"] == b["hash"] == config_hash(cfg)
    full = with_recipe(RunConfig(model="mlp"))
    assert (full.optimizer, full.lr, full.batch_size, full.steps) == ("adam", 1e-2, 100, 8000)
    assert config_hash(cfg) != config_hash(cfg.replace(seed=1))
    # the recipe values spelled out give the same configuration
    assert config_hash(RunConfig(model="mlp")) == config_hash(RunConfig(model="mlp", lr=1e-2, optimizer="adam"))


def test_result_fields_and_curves():
    run = train(RunConfig(model="cnn", **TINY))
    r = run["result"]
    assert r["steps"] == 12 and r["diverged"] is False
    assert run["curves"]["step"] == [0, 4, 8, 12]
    assert 0 <= r["test_accuracy"] <= 1 and r["train_loss"] > 0


def test_divergence_is_a_result_not_a_crash():
    run = train(RunConfig(model="mlp", optimizer="sgd", lr=1e4, data_limit=300, steps=50, eval_every=10))
    assert run["result"]["diverged"] is True
    assert run["result"]["steps"] < 50


def test_evaluate_matches_manual():
    torch.manual_seed(0)
    m = build_model("mlp", (1, 40), 10)
    x, y = torch.randn(57, 1, 40), torch.randint(0, 10, (57,))
    acc, loss = evaluate(m, x, y, batch=10)
    with torch.no_grad():
        out = m(x)
    assert acc == pytest.approx(float((out.argmax(1) == y).double().mean()))
    assert abs(loss - float(nn.functional.cross_entropy(out, y))) < 1e-5


def test_percentile_probe_matches_numpy():
    torch.manual_seed(0)
    m = build_model("paper-mlp", (1, 40), 10, norm="none").eval()
    x = torch.randn(200, 1, 40)
    probe = P.PreactivationProbe(m, layer=-1, unit=3)
    out, got = probe.collect(lambda: m(x))
    assert out.shape == (200, 10)  # the pass itself is returned
    with torch.no_grad():
        pre = m.body[:-2](x)[:, 3].numpy()  # input of the last sigmoid
    np.testing.assert_allclose([got["p15"], got["p50"], got["p85"]], np.percentile(pre, [15, 50, 85]), rtol=1e-5)


def test_grad_norms_match_manual():
    torch.manual_seed(0)
    m = build_model("mlp", (1, 40), 10, norm="batchnorm")
    loss = nn.functional.cross_entropy(m(torch.randn(32, 1, 40)), torch.randint(0, 10, (32,)))
    loss.backward()
    got = P.grad_norms(m)
    lin0, bn0 = m.body[1], m.body[2]
    ref0 = torch.sqrt(sum(p.grad.pow(2).sum() for p in (lin0.weight, lin0.bias, bn0.weight, bn0.bias)))
    assert abs(got[0] - float(ref0)) < 1e-5
    assert len(got) == 3


def test_ics_first_layer_is_zero_and_matches_manual():
    torch.manual_seed(0)
    m = build_model("mlp", (1, 40), 10, norm="none")
    x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    nn.functional.cross_entropy(m(x), y).backward()
    g_last = m.body[-1].weight.grad.clone()
    opt.step()
    res = P.ics_measure(m, before, x, y)
    assert res["ics_diff"][0] == 0.0 and abs(res["ics_cos"][0] - 1) < 1e-9  # no earlier layer moved
    # manual G' for the last layer: earlier layers updated, last layer at its old value
    m2 = build_model("mlp", (1, 40), 10, norm="none")
    last = [name for name, mod in m.named_modules() if isinstance(mod, nn.Linear)][-1]
    with torch.no_grad():
        for (k, p2), (_, p) in zip(m2.named_parameters(), m.named_parameters()):
            p2.copy_(before[k] if k.startswith(last + ".") else p)
    nn.functional.cross_entropy(m2(x), y).backward()
    ref = float((g_last - m2.body[-1].weight.grad).double().norm())
    assert abs(res["ics_diff"][-1] - ref) < 1e-5 * max(1.0, ref)


def test_smoothness_on_quadratic_free_model():
    torch.manual_seed(0)
    m = build_model("mlp", (1, 40), 10, norm="batchnorm")
    s = P.smoothness(m, torch.randn(32, 1, 40), torch.randint(0, 10, (32,)))
    assert s["loss_range"] >= 0 and s["beta"] > 0 and s["step_norm"] > 0
    # along a given update: a zero-length step has no smoothness to measure; a longer one scales step_norm
    params = {n: p.detach() for n, p in m.named_parameters()}
    d = {n: 1e-3 * torch.randn_like(p) for n, p in params.items()}
    s1 = P.smoothness(m, torch.randn(32, 1, 40), torch.randint(0, 10, (32,)), base=params, direction=d)
    s2 = P.smoothness(m, torch.randn(32, 1, 40), torch.randint(0, 10, (32,)), base=params,
                      direction={n: 2 * v for n, v in d.items()})
    assert s2["step_norm"] == pytest.approx(2 * s1["step_norm"], rel=1e-6)


def test_probes_in_a_run():
    run = train(RunConfig(model="mlp", norm="batchnorm", probes=("percentiles", "grad_norms", "ics", "smoothness",
                                                                 "inference"), **TINY))
    c = run["curves"]
    assert len(c["p50"]) == len(c["step"]) == 4
    assert len(c["grad_norms"]) == 3 and len(run["init"]["grad_norms"]) == 3
    # ICS and smoothness run at every PROBE_EVERY-th evaluation and at the last step
    from batchnorm.lab.train import PROBE_EVERY

    probed = [s for s in c["step"][1:] if (s // TINY["eval_every"]) % PROBE_EVERY == 0 or s == TINY["steps"]]
    assert c["ics_step"] == probed and c["smooth_step"] == probed
    assert all(len(v) == 3 and v[0] == 0.0 for v in c["ics_rel"])  # the first layer has no earlier layers
    assert len(c["beta"]) == len(probed)
    assert set(run["result"]["batch_stat_accuracy"]) == {"4", "16", "1000"}
    # the gradient probe at init does not change the run itself
    plain = train(RunConfig(model="mlp", norm="batchnorm", probes=("inference",), **TINY))
    assert plain["curves"]["test_loss"] == c["test_loss"]


def test_test_accuracy_is_taken_at_the_best_validation_checkpoint():
    """The reported test accuracy is the test accuracy of the weights at the evaluation with the best
    validation accuracy: the same as a run stopped at that step, evaluated on the whole test set."""
    from batchnorm.lab.train import unpack_correct

    cfg = RunConfig(model="mlp", norm="batchnorm", optimizer="sgd", lr=0.5, data_limit=300, steps=60, eval_every=4)
    run = train(cfg)
    c, r = run["curves"], run["result"]
    best = c["step"][int(np.argmax(c["val_acc"]))]
    assert r["best_step"] == best and r["best_val_accuracy"] == max(c["val_acc"])
    bits = unpack_correct(r["test_correct"], r["test_examples"])
    assert len(bits) == r["test_examples"] and float(bits.mean()) == pytest.approx(r["test_accuracy"])
    assert r["final_test_accuracy"] == c["test_acc"][-1]
    stopped = train(cfg.replace(steps=max(best, 1), eval_every=4))
    assert stopped["result"]["test_correct"] == r["test_correct"] or best == 0


def test_batch_stat_accuracy_equals_separate_test_batches():
    """The one-pass version (ghost batches) gives exactly the accuracy of normalizing each test batch
    separately with its own statistics; dropout stays off."""
    import copy

    from batchnorm.lab.models import build_model
    from batchnorm.lab.train import batch_stat_accuracy

    torch.manual_seed(0)
    model = build_model("mlp", (1, 40), 10, norm="batchnorm", dropout=0.5)
    x, y = torch.randn(203, 1, 40), torch.randint(0, 10, (203,))
    got = batch_stat_accuracy(model, x, y, sizes=(4, 16, 100))
    for size in (4, 16, 100):
        m = copy.deepcopy(model).eval()
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._NormBase):
                mod.train()
        n = (len(y) // size) * size
        right = sum(int((m(x[i:i + size]).argmax(1) == y[i:i + size]).sum()) for i in range(0, n, size))
        assert got[str(size)] == right / n
