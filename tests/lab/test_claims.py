"""How claims become verdicts, on synthetic stored runs: LR tuning on the validation split (and never on
the test split), grid extension until the best LR is interior, the shared-LR twin, censored convergence,
Holm across the run, and the claim-level verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchnorm.lab import claims as C
from batchnorm.lab import stats as S
from batchnorm.lab.experiments import CLAIMS
from batchnorm.lab.train import RunConfig, config_key, pack_correct

N_TEST = 2000


def _run(cfg: RunConfig, val: float, test: float, *, train: float = 0.99, curve=None, seed_noise=0.0,
         diverged=False, steps=100):
    """A stored run as train() writes it: ``test`` of N_TEST examples right (a seed-dependent subset)."""
    rng = np.random.default_rng(abs(hash((cfg.seed, cfg.norm, cfg.lr, cfg.model_kw))) % 2**32)
    right = np.zeros(N_TEST, dtype=bool)
    right[rng.permutation(N_TEST)[: int(round((test + seed_noise * rng.normal()) * N_TEST))]] = True
    steps_list = list(range(0, steps + 1, 10))
    val_curve = curve or [val * min(1.0, s / steps) for s in steps_list]
    return {"config": {**cfg.to_dict(), "steps": steps, "lr": cfg.lr},
            "result": {"test_accuracy": float(right.mean()), "test_correct": pack_correct(right),
                       "test_examples": N_TEST, "best_val_accuracy": val, "val_accuracy": val,
                       "train_accuracy": train, "diverged": diverged, "steps": steps, "eval_every": 10,
                       "best_step": steps, "batch_stat_accuracy": {"16": 0.5},
                       "recalibrated_test_accuracy": float(right.mean()),
                       "recalibrated_test_correct": pack_correct(right)},
            "curves": {"step": steps_list, "val_acc": val_curve, "seconds": [0.01 * s for s in steps_list]},
            "init": {}}


def test_ladder():
    assert C._ladder(1e-3, True) == 3e-3 and C._ladder(3e-3, True) == 1e-2
    assert C._ladder(1e-3, False) == 3e-4 and C._ladder(3e-4, False) == 1e-4
    assert C._ladder(0.3, True) == 1.0 and C._ladder(1.0, True) == 3.0


def test_tuning_extends_the_grid_until_the_best_lr_is_interior():
    """Validation accuracy peaks at lr 0.3 (outside the first Adam grid 1e-3..3e-2): the grid grows upward
    until 0.3 is interior; the test accuracy, which peaks elsewhere, is never looked at."""
    def get(cfg):
        val = 0.9 - 0.1 * abs(math.log10(cfg.lr / 0.3))
        return _run(cfg, val=val, test=0.5 + 0.1 * (cfg.lr == 1e-3))

    base = RunConfig(model="mlp", optimizer="adam")
    lr, need, info = C.tune_lr(base, [0, 1], get, max_extensions=4)
    assert need == [] and lr == pytest.approx(0.3)
    assert info["interior"] and info["grid"] == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])


def test_tuning_lists_missing_runs_first():
    lr, need, _ = C.tune_lr(RunConfig(model="mlp", optimizer="sgd"), [0, 1], lambda c: None)
    assert lr is None and len(need) == 2 * len(C.LR_GRIDS["sgd"])
    assert {c.seed for c in need} == {0, 1}


def test_tuning_stops_at_the_extension_limit_and_says_so():
    base = RunConfig(model="mlp", optimizer="adam")
    lr, _, info = C.tune_lr(base, [0], lambda c: _run(c, val=min(0.9, c.lr), test=0.5), max_extensions=1)
    assert lr == pytest.approx(0.1) and not info["interior"]


def _by_name(res, name):
    return next(c for c in res["conditions"] if c["condition"] == name)


def test_accuracy_claim_uses_each_arms_validation_choice_and_reports_the_shared_lr():
    """Without BN the best LR is 3e-3, with BN 3e-2 (by validation); at each arm's best LR BN gains 5 pp
    of test accuracy, at the shared recipe LR (1e-2) what the distance of 1e-2 from each best LR leaves.
    Both conditions are reported with their LRs."""
    best = {"none": 3e-3, "batchnorm": 3e-2}

    def get(cfg):
        if cfg.dataset != "mnist1d" or cfg.model != "mlp" or cfg.probes != ("inference", "recalibrate"):
            return None
        dist = abs(math.log10(cfg.lr / best[cfg.norm]))
        base = 0.70 if cfg.norm == "none" else 0.75
        return _run(cfg, val=0.8 - 0.1 * dist, test=base - 0.3 * dist, seed_noise=0.01)

    res = C.analyze_claims(get, "quick", ["mnist1d"], ["accuracy"])[0]
    tuned = _by_name(res, "mlp, Adam")
    shared = _by_name(res, "mlp, Adam, shared lr 0.01")
    assert tuned["lr"]["none"] == pytest.approx(3e-3) and tuned["lr"]["batchnorm"] == pytest.approx(3e-2)
    assert tuned["lr"]["selected_on"] == "validation" and tuned["lr"]["tuning"]["none"]["interior"]
    assert shared["lr"]["none"] == shared["lr"]["batchnorm"] == pytest.approx(1e-2)
    at_shared = 100 * ((0.75 - 0.3 * math.log10(3)) - (0.70 - 0.3 * math.log10(1 / 0.3)))
    assert tuned["effect"] == pytest.approx(5, abs=1.5) and shared["effect"] == pytest.approx(at_shared, abs=1.5)
    assert tuned["n_seeds"] == 5 and tuned["resampled"] == "seeds and test examples"
    assert tuned["verdict"] == "supported" and tuned["ci95"][0] > 0
    cnn = _by_name(res, "cnn, Adam")  # no runs stored for it
    assert cnn["n_seeds"] == 0 and cnn["verdict"] == "inconclusive"
    assert res["verdict"] == "depends"


def test_faster_claim_with_a_target_never_reached_is_censored_not_imputed():
    """Without BN the validation accuracy never reaches the fixed target within 100 steps; with BN it does
    at step 20: the effect is at least log2(100/20), an interval, never log2(200/20)."""
    from batchnorm.lab.claims import SeedRuns
    from batchnorm.lab.experiments import _speedup

    none = _run(RunConfig(norm="none"), val=0.3, test=0.3, curve=[0.1] * 11)
    bn = _run(RunConfig(norm="batchnorm"), val=0.6, test=0.6, curve=[0.1, 0.2, 0.55] + [0.6] * 8)
    e = _speedup(SeedRuns({"none": [none], "batchnorm": [bn]}), 0.5)
    assert e.lo == pytest.approx(math.log2(100 / 20)) and e.hi == math.inf


def test_steps_to_a_target_are_known_to_one_evaluation_interval():
    """Without BN the target is first seen at step 40 (step 30 was below it), with BN at step 20 (step 10
    below): the speed-up lies between log2(30/20) and log2(40/10), not at log2(40/20)."""
    from batchnorm.lab.claims import SeedRuns
    from batchnorm.lab.experiments import _speedup

    none = _run(RunConfig(norm="none"), val=0.6, test=0.6, curve=[0.1, 0.2, 0.3, 0.4, 0.55] + [0.6] * 6)
    bn = _run(RunConfig(norm="batchnorm"), val=0.6, test=0.6, curve=[0.1, 0.2, 0.55] + [0.6] * 8)
    e = _speedup(SeedRuns({"none": [none], "batchnorm": [bn]}), 0.5)
    assert (e.lo, e.hi) == (pytest.approx(math.log2(30 / 20)), pytest.approx(math.log2(40 / 10)))
    at_init = _run(RunConfig(norm="none"), val=0.6, test=0.6, curve=[0.6] * 11)  # at the target before training
    e = _speedup(SeedRuns({"none": [at_init], "batchnorm": [bn]}), 0.5)
    assert (e.lo, e.hi) == (-math.inf, pytest.approx(math.log2(1 / 10)))


def test_both_arms_at_the_target_by_the_first_evaluation_is_inconclusive_not_contradicted():
    """Both arms already at the target at the first evaluation, in every seed: the evaluations cannot
    tell which was faster. On Fashion-MNIST (`claims --full`, shared lr 0.01) this read as an effect of
    exactly 0 with a zero-width interval, "contradicted"; it is no evidence either way."""
    def get(cfg):
        if cfg.model != "mlp" or cfg.probes != ("inference", "recalibrate"):
            return None
        return _run(cfg, val=0.8, test=0.7, curve=[0.05] + [0.8] * 10, seed_noise=0.01)

    res = C.analyze_claims(get, "quick", ["mnist1d"], ["faster"])[0]
    for cond in res["conditions"]:
        assert cond["n_seeds"] == 5 and cond["ci95"] == [-math.inf, math.inf], cond["condition"]
        assert cond["verdict"] == "inconclusive"


def test_holm_across_the_run():
    """The same marginal evidence is supported alone and not inside a run of many conditions."""
    def get(cfg):
        if cfg.probes != ("inference", "recalibrate"):
            return None
        return _run(cfg, val=0.8, test=0.70 + (0.012 if cfg.norm == "batchnorm" else 0), seed_noise=0.01)

    alone = C.analyze_claims(get, "quick", ["mnist1d"], ["accuracy"])[0]
    many = C.analyze_claims(get, "quick", ["mnist1d"], [c.key for c in CLAIMS])
    a = _by_name(alone, "mlp, Adam")
    m = _by_name(next(r for r in many if r["key"] == "accuracy"), "mlp, Adam")
    assert a["p_for"] == pytest.approx(m["p_for"])
    # the family is every condition of the run, across claims and datasets
    every = [c for r in many for c in r["conditions"]]
    assert m["p_for_holm"] == pytest.approx(S.holm([c["p_for"] for c in every])[every.index(m)])
    assert m["p_for_holm"] >= a["p_for_holm"] and len(every) > 20


def test_learning_rate_claim():
    """Without BN runs diverge above lr 0.3, with BN above 3: on the grid (.., 0.3, 0.5, .., 3, 5, ..) the
    largest stable LRs lie in [0.3, 0.5) and [3, 5), so the effect lies in [log10(3/0.5), log10(5/0.3)]
    per seed; its lower end, 0.78, reaches the claimed 0.4."""
    def get(cfg):
        limit = 0.3 if cfg.norm == "none" else 3.0
        return _run(cfg, val=0.1 if cfg.lr > limit else 0.6, test=0.5, diverged=cfg.lr > limit)

    res = C.analyze_claims(get, "quick", ["mnist1d"], ["higher-lr"])[0]
    (c,) = res["conditions"]
    assert c["effects"] == [[pytest.approx(math.log10(3 / 0.5)), pytest.approx(math.log10(5 / 0.3))]] * 5
    assert c["effect"] == pytest.approx(math.log10(6)) and c["verdict"] == "supported"
    assert c["resampled"] == "seeds"


def test_the_learning_rate_grid_resolves_the_claimed_effect():
    """Neighbouring learning rates of the higher-LR grid at most 0.3 decades apart (the claimed effect is
    0.4: equal largest stable LRs must be able to rule it out), from 0.01 to 1000."""
    from batchnorm.lab.experiments import LR_GRID

    steps = np.diff(np.log10(LR_GRID))
    assert LR_GRID[0] == 0.01 and LR_GRID[-1] == 1000 and np.all(steps > 0) and steps.max() <= 0.302
    assert {0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0} <= set(LR_GRID)  # runs stored at the old grid stay in use


def test_plans_cover_every_claim_on_both_datasets():
    need = C.plan_claims("quick", ["mnist1d", "fashion-mnist"])
    assert len({config_key(c) for c in need}) == len(need)
    assert {c.dataset for c in need} == {"mnist1d", "fashion-mnist"}
    # the first round trains tuning runs (2 seeds) for tuned arms, all seeds for fixed-LR conditions
    assert max(c.seed for c in need if c.lr is not None and c.lr in C.LR_GRIDS["adam"]) <= 4
    with pytest.raises(ValueError, match="unknown claim"):
        C.plan_claims("quick", claims=["nope"])


def test_every_claim_has_conditions_on_mnist1d_and_fashion():
    for claim in CLAIMS:
        for ds in ("mnist1d", "fashion-mnist"):
            conds = claim.conditions("quick", ds)
            assert conds and all(c.dataset == ds for c in conds), claim.key
