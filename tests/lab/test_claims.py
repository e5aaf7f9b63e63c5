"""Verdict logic on synthetic result tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from batchnorm.lab import claims as C


def test_summarize_matches_scipy():
    e = [0.3, 0.5, 0.1, 0.4]
    s = C.summarize(e)
    lo, hi = stats.t.interval(0.95, len(e) - 1, loc=np.mean(e), scale=stats.sem(e))
    assert s["mean"] == pytest.approx(np.mean(e)) and s["std"] == pytest.approx(np.std(e, ddof=1))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((lo, hi))


@pytest.mark.parametrize("effects,min_effect,verdict", [
    ([1.0, 1.2, 0.9], 0.5, "supported"),          # consistent and large
    ([0.2, 0.3, 0.25], 0.5, "no clear effect"),    # consistent but below the minimum effect
    ([2.0, -1.0, 1.5], 0.5, "no clear effect"),    # signs disagree, interval covers 0
    ([-1.0, -1.2, -0.9], 0.5, "contradicted"),     # the opposite of the claim
    ([-0.1, -0.12, -0.11], 0.5, "contradicted"),   # tight interval below zero
    ([], 0.5, "no data"),
    ([float("nan"), 1.0, 1.1, 0.9], 0.5, "supported"),  # a failed seed is ignored
])
def test_judge(effects, min_effect, verdict):
    assert C.judge(effects, min_effect) == verdict


def test_judge_claim():
    assert C.judge_claim({"a": "supported", "b": "supported"}) == ("supported", "")
    assert C.judge_claim({"a": "contradicted", "b": "no clear effect"}) == ("not supported", "")
    v, cond = C.judge_claim({"plain": "contradicted", "residual": "supported"})
    assert v == "depends" and "holds for residual" in cond and "not for plain" in cond


def _fake_run(cfg, train_acc, test_acc):
    return {"config": {**cfg.to_dict(), "steps": 10}, "result": {"train_accuracy": train_acc,
                                                                  "test_accuracy": test_acc, "diverged": False},
            "curves": {"step": [0, 10], "val_acc": [0.1, test_acc]}, "init": {}}


def test_analyze_regularization_on_synthetic_table():
    """BN halves the gap on the MLP, does nothing on the CNN: 'depends', with the right condition."""
    rng = np.random.default_rng(0)

    def get(cfg):
        noise = rng.normal(0, 0.002)
        if cfg.model == "mlp":
            gap = 0.30 if cfg.norm == "none" else 0.15
        else:
            gap = 0.05
        return _fake_run(cfg, 0.95, 0.95 - gap + noise)

    res = C.analyze_claims(get, "quick", "mnist1d", ["regularizes"])[0]
    mlp, cnn = res["conditions"]
    assert mlp["verdict"] == "supported" and mlp["mean"] == pytest.approx(15, abs=1)
    assert cnn["verdict"] == "no clear effect"
    assert res["verdict"] == "depends" and "mlp" in res["condition"]
    assert res["evidence"].startswith("Depends")


def test_analyze_learning_rate_claim():
    """Without BN runs diverge above lr 0.3, with BN above 3: effect log10(3/0.3) = 1 per seed."""
    def get(cfg):
        limit = 0.3 if cfg.norm == "none" else 3.0
        div = cfg.lr > limit
        return {"config": cfg.to_dict(), "result": {"diverged": div, "test_accuracy": 0.1 if div else 0.6},
                "curves": {}, "init": {}}

    res = C.analyze_claims(get, "quick", "mnist1d", ["higher-lr"])[0]
    for c in res["conditions"]:
        assert c["effects"] == pytest.approx([1.0] * 3)
    assert res["verdict"] == "supported"


def test_missing_runs_give_no_data():
    res = C.analyze_claims(lambda cfg: None, "quick", "mnist1d", ["ics"])[0]
    assert res["conditions"][0]["verdict"] == "no data" and res["verdict"] == "not supported"


def test_plans():
    quick = C.plan_claims("quick")
    assert len({c for c in quick}) == len(quick)
    assert all(not math.isnan(c.weight_scale) for c in quick)
    with pytest.raises(ValueError, match="unknown claim"):
        C.plan_claims("quick", claims=["nope"])
