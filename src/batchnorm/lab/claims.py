"""The seeds' claims about BN, one experiment each, with an effect size over seeds and a verdict.

Every claim is tested under one or more *conditions* (an architecture / optimizer / depth). For each
condition and seed the experiment computes one number, the **effect** (positive = the claim holds;
its unit is stated), from the runs with and without BN of that seed. Over seeds:

* condition verdict: ``supported`` when the mean effect reaches the claim's minimum effect and the
  effect is positive for every seed or its 95% t-interval excludes 0; ``contradicted`` when the
  interval lies below 0 or every seed is negative with the mean beyond minus the minimum effect;
  otherwise ``no clear effect``;
* claim verdict: ``supported`` when every condition is supported, ``not supported`` when none is,
  otherwise ``depends`` (with the conditions under which it holds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .train import RunConfig, config_key, steps_to

__all__ = ["CLAIMS", "Claim", "Condition", "analyze_claims", "judge", "judge_claim", "plan_claims"]


# ------------------------------------------------------------------------------------------ verdicts


def summarize(effects: list[float]) -> dict:
    """Mean, standard deviation, and 95% t-interval of the finite effects."""
    v = np.array([e for e in effects if e is not None and math.isfinite(e)], dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": float("nan"), "ci_low": float("-inf"), "ci_high": float("inf")}
    from scipy.stats import t as student_t

    std = float(v.std(ddof=1))
    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def judge(effects: list[float], min_effect: float) -> str:
    """Verdict of one condition from its per-seed effects (see the module docstring)."""
    s = summarize(effects)
    if s["n"] == 0:
        return "no data"
    v = [e for e in effects if e is not None and math.isfinite(e)]
    if s["mean"] >= min_effect and (s["ci_low"] > 0 or all(e > 0 for e in v)):
        return "supported"
    if s["ci_high"] < 0 or (all(e < 0 for e in v) and s["mean"] <= -min_effect):
        return "contradicted"
    return "no clear effect"


def judge_claim(condition_verdicts: dict[str, str]) -> tuple[str, str]:
    """(verdict, condition sentence) of a claim from its conditions' verdicts."""
    ok = [c for c, v in condition_verdicts.items() if v == "supported"]
    bad = [c for c, v in condition_verdicts.items() if v != "supported"]
    if ok and not bad:
        return "supported", ""
    if not ok:
        return "not supported", ""
    return "depends", f"holds for {', '.join(ok)}; not for {', '.join(bad)}"


# --------------------------------------------------------------------------------------- experiments


@dataclass
class Condition:
    """One setting of a claim: for each seed, the arms' run configurations and an effect function."""

    name: str
    arms: Callable[[int], dict[str, list[RunConfig]]]  # seed -> {arm: [configs]}
    effect: Callable[[dict[str, list[dict]]], float]  # {arm: [runs]} -> effect (positive = claim holds)
    detail: Callable[[dict[str, list[dict]]], dict] = lambda runs: {}


@dataclass
class Claim:
    key: str
    title: str
    seed_quote: str
    literature: str
    unit: str
    min_effect: float
    conditions: Callable[[str, str], list[Condition]]  # (mode, dataset) -> conditions
    sentence: Callable[[dict], str] = field(default=lambda r: "")


def _acc(run: dict) -> float:
    return float(run["result"]["test_accuracy"])


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _steps_to(run: dict, target: float) -> float:
    s = steps_to(run["curves"], "val_acc", target)
    total = run["config"]["steps"]
    return float(s) if s is not None else 2.0 * total  # never reached: count as twice the budget


# budgets ---------------------------------------------------------------------------------------------

_BUDGET = {
    "quick": {"seeds": 3, "steps": 1500, "ref_steps": 2000, "short": 500, "depth": 50, "deep_steps": 400,
              "lstm_steps": 200},
    "full": {"seeds": 5, "steps": 4000, "ref_steps": 8000, "short": 1500, "depth": 100, "deep_steps": 2000,
             "lstm_steps": 2000},
    "tiny": {"seeds": 2, "steps": 30, "ref_steps": 30, "short": 20, "depth": 6, "deep_steps": 20, "lstm_steps": 10},
}


def _base(dataset: str, mode: str, **kw) -> RunConfig:
    limit = 600 if mode == "tiny" else None
    return RunConfig(dataset=dataset, data_limit=limit, **kw)


def _pair(cfg: RunConfig, norms=("none", "batchnorm")) -> Callable[[int], dict[str, list[RunConfig]]]:
    return lambda seed: {n: [cfg.replace(norm=n, seed=seed)] for n in norms}


# C1 faster convergence -----------------------------------------------------------------------------

def _c1(mode, ds):
    b = _BUDGET[mode]
    conds = []
    for name, cfg, target in (
        ("paper-mlp (sigmoid, SGD)", _base(ds, mode, model="paper-mlp", steps=b["steps"]), 0.5),
        ("mlp (ReLU, Adam, reference recipe)", _ref_mlp(ds, mode), 0.55),
    ):
        tgt = 0.2 if mode == "tiny" else target

        def eff(runs, tgt=tgt):
            return math.log2(_steps_to(runs["none"][0], tgt) / _steps_to(runs["batchnorm"][0], tgt))

        def det(runs, tgt=tgt):
            return {"target_val_acc": tgt, "steps_none": _steps_to(runs["none"][0], tgt),
                    "steps_bn": _steps_to(runs["batchnorm"][0], tgt)}

        conds.append(Condition(name, _pair(cfg), eff, det))
    return conds


def _ref_mlp(ds, mode):
    return _base(ds, mode, model="mlp", steps=_BUDGET[mode]["ref_steps"], probes=("inference",))


def _ref_cnn(ds, mode):
    return _base(ds, mode, model="cnn", steps=_BUDGET[mode]["ref_steps"], probes=("inference",))


# C2 higher learning rates ---------------------------------------------------------------------------

LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _max_stable_lr(runs: list[dict], chance: float = 0.1) -> float:
    """Largest LR of the grid whose run did not diverge and ends clearly above chance."""
    ok = [r["config"]["lr"] for r in runs if not r["result"]["diverged"] and _acc(r) > chance + 0.1]
    return max(ok) if ok else min(r["config"]["lr"] for r in runs) / 3.0


def _c2(mode, ds):
    b = _BUDGET[mode]
    conds = []
    for name, model in (("mlp (ReLU, SGD)", "mlp"), ("paper-mlp (sigmoid, SGD)", "paper-mlp")):
        cfg = _base(ds, mode, model=model, optimizer="sgd", steps=b["short"])

        def arms(seed, cfg=cfg):
            return {n: [cfg.replace(norm=n, seed=seed, lr=lr) for lr in LR_GRID] for n in ("none", "batchnorm")}

        def eff(runs):
            return math.log10(_max_stable_lr(runs["batchnorm"]) / _max_stable_lr(runs["none"]))

        def det(runs):
            return {"max_lr_none": _max_stable_lr(runs["none"]), "max_lr_bn": _max_stable_lr(runs["batchnorm"]),
                    "best_acc_none": max(_acc(r) for r in runs["none"]),
                    "best_acc_bn": max(_acc(r) for r in runs["batchnorm"])}

        conds.append(Condition(name, arms, eff, det))
    return conds


# C3 regularization ----------------------------------------------------------------------------------

def _gap(run):
    return run["result"]["train_accuracy"] - run["result"]["test_accuracy"]


def _c3(mode, ds):
    conds = []
    for name, cfg in (("mlp (reference recipe)", _ref_mlp(ds, mode)), ("cnn (reference recipe)", _ref_cnn(ds, mode))):
        conds.append(Condition(
            name, _pair(cfg),
            lambda runs: 100 * (_gap(runs["none"][0]) - _gap(runs["batchnorm"][0])),
            lambda runs: {"gap_none": _gap(runs["none"][0]), "gap_bn": _gap(runs["batchnorm"][0])},
        ))
    return conds


# C4 initialization -----------------------------------------------------------------------------------

INIT_SCALES = (0.1, 1.0, 10.0)


def _c4(mode, ds):
    b = _BUDGET[mode]
    cfg = _base(ds, mode, model="mlp", optimizer="sgd", lr=0.1, steps=b["steps"])

    def arms(seed):
        return {n: [cfg.replace(norm=n, seed=seed, weight_scale=s) for s in INIT_SCALES] for n in ("none", "batchnorm")}

    def spread(rs):
        return max(_acc(r) for r in rs) - min(_acc(r) for r in rs)

    return [Condition(
        "mlp, SGD, weight scale x0.1/x1/x10", arms,
        lambda runs: 100 * (spread(runs["none"]) - spread(runs["batchnorm"])),
        lambda runs: {"acc_none": [_acc(r) for r in runs["none"]], "acc_bn": [_acc(r) for r in runs["batchnorm"]]},
    )]


# C5 vanishing / exploding gradients -------------------------------------------------------------------

def _log_ratio(run) -> float:
    g = run["init"]["grad_norms"]
    return math.log10(g[0] / g[-2]) if g[0] > 0 and g[-2] > 0 else float("inf")  # first vs last hidden


def _growth(run) -> float:
    """Per-layer growth factor of the squared gradient norm, fitted over the hidden layers."""
    g = np.array(run["init"]["grad_norms"][1:-1], dtype=float)
    if len(g) < 3 or not np.all(g > 0):
        return float("nan")
    depth = np.arange(len(g))[::-1]  # distance from the output
    slope = np.polyfit(depth, 2 * np.log(g), 1)[0]
    return float(np.exp(slope))


def _c5(mode, ds):
    b = _BUDGET[mode]
    conds = []
    for name, scale in (("deep plain MLP, He init", 1.0), ("deep plain MLP, small init (x0.5)", 0.5)):
        cfg = _base(ds, mode, model="deep-mlp", steps=0, probes=("grad_norms",), weight_scale=scale,
                    model_kw={"depth": b["depth"]})
        conds.append(Condition(
            f"{name}, depth {b['depth']}", _pair(cfg),
            lambda runs: abs(_log_ratio(runs["none"][0])) - abs(_log_ratio(runs["batchnorm"][0])),
            lambda runs: {"log10_ratio_none": _log_ratio(runs["none"][0]),
                          "log10_ratio_bn": _log_ratio(runs["batchnorm"][0]),
                          "growth_per_layer_bn": _growth(runs["batchnorm"][0]),
                          "growth_per_layer_none": _growth(runs["none"][0])},
        ))
    return conds


# C6 very deep networks ------------------------------------------------------------------------------

def _c6(mode, ds):
    b = _BUDGET[mode]
    conds = []
    for name, model in (("plain", "deep-mlp"), ("residual", "resnet-mlp")):
        cfg = _base(ds, mode, model=model, steps=b["deep_steps"], optimizer="sgd", lr=0.05,
                    model_kw={"depth": b["depth"]})
        conds.append(Condition(
            f"{name} MLP, {b['depth']} layers", _pair(cfg),
            lambda runs: 100 * (_acc(runs["batchnorm"][0]) - _acc(runs["none"][0])),
            lambda runs: {"acc_none": _acc(runs["none"][0]), "acc_bn": _acc(runs["batchnorm"][0]),
                          "diverged_bn": runs["batchnorm"][0]["result"]["diverged"]},
        ))
    # SkipInit (De & Smith 2020): a residual net without any normalization, branches scaled by a zero-init scalar
    skip = _base(ds, mode, model="resnet-mlp", steps=b["deep_steps"], optimizer="sgd", lr=0.05,
                 model_kw={"depth": b["depth"], "skipinit": True})
    bn = _base(ds, mode, model="resnet-mlp", steps=b["deep_steps"], optimizer="sgd", lr=0.05,
               model_kw={"depth": b["depth"]})
    conds.append(Condition(
        f"residual MLP, {b['depth']} layers, vs SkipInit without BN",
        lambda seed: {"none": [skip.replace(norm="none", seed=seed)], "batchnorm": [bn.replace(norm="batchnorm",
                                                                                               seed=seed)]},
        lambda runs: 100 * (_acc(runs["batchnorm"][0]) - _acc(runs["none"][0])),
        lambda runs: {"acc_skipinit_no_bn": _acc(runs["none"][0]), "acc_bn": _acc(runs["batchnorm"][0])},
    ))
    return conds


# C7 internal covariate shift / C8 smoothness ---------------------------------------------------------

def _ics_cfg(ds, mode):
    b = _BUDGET[mode]
    return _base(ds, mode, model="mlp", optimizer="sgd", lr=0.1, steps=b["steps"], probes=("ics", "smoothness"))


def _ics(run, key="ics_rel"):
    vals = [v for row in run["curves"].get(key, []) for v in row]
    return _mean(vals)


def _c7(mode, ds):
    return [Condition(
        "mlp, SGD lr 0.1", _pair(_ics_cfg(ds, mode)),
        lambda runs: _ics(runs["none"][0]) - _ics(runs["batchnorm"][0]),
        lambda runs: {"ics_rel_none": _ics(runs["none"][0]), "ics_rel_bn": _ics(runs["batchnorm"][0]),
                      "ics_cos_none": _ics(runs["none"][0], "ics_cos"),
                      "ics_cos_bn": _ics(runs["batchnorm"][0], "ics_cos")},
    )]


def _beta(run):
    return _mean([math.log10(b) for b in run["curves"].get("beta", []) if b and b > 0 and math.isfinite(b)])


def _c8(mode, ds):
    return [Condition(
        "mlp, SGD lr 0.1", _pair(_ics_cfg(ds, mode)),
        lambda runs: _beta(runs["none"][0]) - _beta(runs["batchnorm"][0]),
        lambda runs: {"log10_beta_none": _beta(runs["none"][0]), "log10_beta_bn": _beta(runs["batchnorm"][0]),
                      "loss_range_none": _mean(runs["none"][0]["curves"].get("loss_range", [])),
                      "loss_range_bn": _mean(runs["batchnorm"][0]["curves"].get("loss_range", []))},
    )]


# C9 accuracy (MLP, CNN, RNN) -------------------------------------------------------------------------

def _c9(mode, ds):
    b = _BUDGET[mode]
    lstm = _base(ds, mode, model="lstm", steps=b["lstm_steps"])

    def acc_diff(runs):
        return 100 * (_acc(runs["batchnorm"][0]) - _acc(runs["none"][0]))

    def det(runs):
        return {"acc_none": _acc(runs["none"][0]), "acc_bn": _acc(runs["batchnorm"][0])}

    return [
        Condition("mlp", _pair(_ref_mlp(ds, mode)), acc_diff, det),
        Condition("cnn", _pair(_ref_cnn(ds, mode)), acc_diff, det),
        Condition("lstm vs BN-LSTM", _pair(lstm), acc_diff, det),
    ]


# C10 running statistics at inference -----------------------------------------------------------------

def _c10(mode, ds):
    def eff(runs):
        r = runs["batchnorm"][0]["result"]
        return 100 * (r["test_accuracy"] - r["batch_stat_accuracy"]["4"])

    def det(runs):
        r = runs["batchnorm"][0]["result"]
        return {"running_stats": r["test_accuracy"], **{f"batch_stats_{k}": v for k, v in
                                                          r["batch_stat_accuracy"].items()}}

    return [
        Condition("mlp, test batches of 4", lambda s: {"batchnorm": [_ref_mlp(ds, mode).replace(norm="batchnorm",
                                                                                              seed=s)]}, eff, det),
        Condition("cnn, test batches of 4", lambda s: {"batchnorm": [_ref_cnn(ds, mode).replace(norm="batchnorm",
                                                                                              seed=s)]}, eff, det),
    ]


CLAIMS: list[Claim] = [
    Claim("faster", "BN makes training converge faster",
          "allows the network to converge faster and more reliably",
          "Ioffe & Szegedy 2015 (Fig. 1, BN-Inception 14x fewer steps)",
          "log2(steps without BN / steps with BN) to a target validation accuracy", 0.3, _c1),
    Claim("higher-lr", "BN allows higher learning rates",
          "enables the use of higher learning rates", "Ioffe & Szegedy 2015, Sec. 3.3",
          "log10(max stable LR with BN / without), SGD, LR grid 0.01..10", 0.4, _c2),
    Claim("regularizes", "BN regularizes (smaller generalization gap)",
          "acts as a regularizer ... reducing overfitting", "Ioffe & Szegedy 2015, Sec. 3.4",
          "percentage points of (train - test accuracy) removed by BN", 1.0, _c3),
    Claim("init", "BN reduces sensitivity to weight initialization",
          "the network becomes less dependent on the choice of initialization", "Ioffe & Szegedy 2015, Sec. 3.3",
          "pp reduction of the accuracy spread across init scales x0.1/x1/x10", 2.0, _c4),
    Claim("gradients", "BN prevents vanishing/exploding gradients",
          "helps in mitigating the vanishing/exploding gradient problem",
          "Yang et al. 2019: in deep BN-ReLU nets without skips gradients explode at init (x1.47 per layer)",
          "decrease of |log10(grad norm first layer / last layer)| at initialization", 0.3, _c5),
    Claim("deep", "BN makes very deep networks trainable",
          "it is possible to train deep networks with over 100 layers",
          "Yang et al. 2019 (plain deep BN nets untrainable); residual nets need skips, not BN alone",
          "pp of test accuracy gained with BN at the given depth", 5.0, _c6),
    Claim("ics", "BN reduces internal covariate shift",
          "reducing the internal covariate shift", "Santurkar et al. 2018: BN does not reduce ICS",
          "decrease of ||G - G'|| / ||G|| (Santurkar's ICS, averaged over layers and training)", 0.05, _c7),
    Claim("smooth", "BN makes the loss landscape smoother",
          "a smoother parameter space", "Santurkar et al. 2018 (Fig. 4): smaller effective beta-smoothness",
          "log10 decrease of the effective beta-smoothness along the gradient", 0.1, _c8),
    Claim("accuracy", "BN increases accuracy (MLP, CNN, RNN)",
          "improved model accuracy", "Cooijmans et al. 2017 (BN-LSTM); MNIST-1D reference numbers",
          "pp of test accuracy gained with BN", 1.0, _c9),
    Claim("running-stats", "Inference needs the running statistics",
          "update the running mean and standard deviation using exponential moving averages",
          "Ioffe & Szegedy 2015, Alg. 2",
          "pp of test accuracy lost when normalizing test batches of 4 by their own statistics", 1.0, _c10),
]


# ------------------------------------------------------------------------------------------ plumbing

def _select(claims: list[str] | None) -> list[Claim]:
    if not claims:
        return CLAIMS
    known = {c.key: c for c in CLAIMS}
    unknown = [k for k in claims if k not in known]
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; choose from {', '.join(known)}")
    return [known[k] for k in claims]


def _seeds(mode: str) -> list[int]:
    return list(range(_BUDGET[mode]["seeds"]))


def plan_claims(mode: str = "quick", dataset: str = "mnist1d", claims: list[str] | None = None,
                seeds: list[int] | None = None) -> list[RunConfig]:
    """All run configurations the claims need (deduplicated, cheapest first is not attempted)."""
    out: dict[str, RunConfig] = {}
    for claim in _select(claims):
        for cond in claim.conditions(mode, dataset):
            for seed in seeds or _seeds(mode):
                for cfgs in cond.arms(seed).values():
                    for c in cfgs:
                        out.setdefault(config_key(c), c)
    return list(out.values())


def analyze_claims(get_run: Callable[[RunConfig], dict | None], mode: str = "quick", dataset: str = "mnist1d",
                   claims: list[str] | None = None, seeds: list[int] | None = None) -> list[dict]:
    """Effects, spreads and verdicts from stored runs (``get_run(cfg)`` returns the stored run)."""
    results = []
    for claim in _select(claims):
        conds_out = []
        verdicts = {}
        for cond in claim.conditions(mode, dataset):
            effects, details = [], []
            for seed in seeds or _seeds(mode):
                runs = {arm: [get_run(c) for c in cfgs] for arm, cfgs in cond.arms(seed).items()}
                if any(r is None for rs in runs.values() for r in rs):
                    continue
                try:
                    e = float(cond.effect(runs))
                except (KeyError, ZeroDivisionError, ValueError, TypeError):
                    e = float("nan")
                effects.append(e)
                details.append({"seed": seed, **cond.detail(runs)})
            s = summarize(effects)
            v = judge(effects, claim.min_effect)
            verdicts[cond.name] = v
            conds_out.append({"condition": cond.name, "effects": effects, **s, "verdict": v, "details": details})
        verdict, when = judge_claim(verdicts)
        out = {
            "key": claim.key, "claim": claim.title, "seed_quote": claim.seed_quote,
            "literature": claim.literature, "unit": claim.unit, "min_effect": claim.min_effect,
            "verdict": verdict, "condition": when, "conditions": conds_out,
        }
        out["evidence"] = evidence_sentence(out)
        results.append(out)
    return results


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:+.2f}"


def evidence_sentence(r: dict) -> str:
    parts = []
    for c in r["conditions"]:
        sd = "" if not math.isfinite(c.get("std", float("nan"))) else f" ± {c['std']:.2f}"
        parts.append(f"{c['condition']}: effect {_fmt(c['mean'])}{sd} over {c['n']} seeds ({c['verdict']})")
    head = {"supported": "Supported", "not supported": "Not supported", "depends": "Depends"}[r["verdict"]]
    cond = f" — {r['condition']}" if r["condition"] else ""
    return f"{head}{cond}. Effect = {r['unit']} (needs ≥ {r['min_effect']}); " + "; ".join(parts) + "."
