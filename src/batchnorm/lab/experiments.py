"""The seed articles' claims about BN, and the literature's counter-claims, as experiments.

Each claim lists its conditions per dataset and mode (``tiny`` smoke test; ``quick`` <= 20 minutes on
2 cores, with learning rates tuned on one seed and the ICS/smoothness probes over 300 steps; ``full``);
:mod:`.claims` runs them and judges them. The effect of every condition is one number per seed, positive
when the claim holds, in the claim's unit.
"""

from __future__ import annotations

import math

import numpy as np

from .claims import Budget, Claim, Condition, SeedRuns
from .stats import Censored
from .train import RunConfig, steps_to

__all__ = ["BUDGET", "CLAIMS", "LR_GRID"]

BUDGET: dict[str, Budget] = {
    "tiny": {"seeds": 2, "steps": 30, "short": 20, "depth": 6, "deep_steps": 20, "lstm_steps": 10, "ics_depth": 10,
             "lr_extensions": 0, "tune_points": 2, "limit": 600, "small_batches": (2, 32), "full_conditions": False},
    "quick": {"seeds": 5, "steps": 1000, "short": 300, "depth": 20, "deep_steps": 200, "lstm_steps": 1000,
              "ics_depth": 10, "probe_steps": 300, "lr_extensions": 2, "tune_seeds": 1, "limit": None,
              "small_batches": (2, 16, 128), "full_conditions": False},
    "full": {"seeds": 10, "steps": 4000, "short": 1500, "depth": 100, "deep_steps": 2000, "lstm_steps": 4000,
             "ics_depth": 12, "lr_extensions": 4, "limit": None, "small_batches": (2, 4, 8, 16, 32, 64, 128),
             "full_conditions": True},
}

#: The learning rates of the higher-LR claim (SGD): 1, 2, 3, 5 per decade, so that the largest stable LR is
#: known to within 0.3 decades, finer than the claimed effect (0.4), from 0.01 up to where BN diverges too.
LR_GRID = tuple(round(m * 10.0**e, 10) for e in range(-2, 3) for m in (1, 2, 3, 5)) + (1000.0,)
#: Models' probes that are cheap and read after training: every accuracy run carries them, so that the
#: accuracy, convergence, regularization and inference claims share their runs.
_AFTER = ("inference", "recalibrate")


def _base(dataset: str, mode: str, **kw) -> RunConfig:
    kw.setdefault("data_limit", BUDGET[mode]["limit"])
    return RunConfig(dataset=dataset, **kw)


def _mlp(ds: str, mode: str, **kw) -> RunConfig:
    """The MNIST-1D reference MLP with Adam (each arm's LR tuned), used by most accuracy-type claims."""
    return _base(ds, mode, model="mlp", steps=BUDGET[mode]["steps"], probes=_AFTER, **kw)


def _pair(cfg: RunConfig, a: str = "none", b: str = "batchnorm") -> dict[str, list[RunConfig]]:
    return {a: [cfg.replace(norm=a)], b: [cfg.replace(norm=b)]}


def _acc_diff(arm_a: str, arm_b: str):
    """pp of test accuracy of arm_b over arm_a."""
    return lambda R: 100 * (R.acc(arm_b) - R.acc(arm_a))


def _acc_detail(*arms: str):
    return lambda R: {f"acc_{a}": R.acc(a) for a in arms} | {f"best_step_{a}": R.result(a)["best_step"] for a in arms}


# C1 faster convergence ---------------------------------------------------------------------------------


def _reach(run: dict, target: float) -> tuple[float, float, float | None]:
    """``(after, by, seconds)``: the target validation accuracy was first reached after step ``after`` (the
    last evaluation before, below it) and by step ``by`` (the first evaluation at or above it), ``seconds``
    into training; ``(budget, inf, None)`` when it was never reached (at initialization: by step 1)."""
    steps = run["curves"]["step"]
    s = steps_to(run["curves"], "val_acc", target)
    if s is None:
        return float(run["result"]["steps"]), math.inf, None
    i = steps.index(s)
    return float(steps[i - 1]) if i > 0 else 0.0, max(float(s), 1.0), float(run["curves"]["seconds"][i])


def _bracketed_log_ratio(num: tuple[float, float], den: tuple[float, float], log=math.log2) -> Censored:
    """``log(a / b)`` for ``a`` known only to lie in ``num = (lo, hi)`` and ``b`` in ``den``: the interval
    of every ratio the brackets allow (an end is infinite where a bracket reaches 0 or infinity). A
    quantity measured on a grid (a step count at the evaluations, a learning rate on the grid) is known
    to the grid's resolution, and the effect then says no more than that."""
    lo = log(num[0] / den[1]) if num[0] > 0 and math.isfinite(den[1]) else -math.inf
    hi = log(num[1] / den[0]) if den[0] > 0 and math.isfinite(num[1]) else math.inf
    return Censored(lo, hi)


def _speedup(R: SeedRuns, target: float | None):
    """log2(steps without BN / steps with BN) to the target, each arm's steps known to one evaluation
    interval (a target reached at the first evaluation: in (0, first]; never reached: beyond the budget):
    an interval, never an imputed number."""
    t = target if target is not None else _relative_target(R)
    s0, s1 = _reach(R.run("none"), t)[:2], _reach(R.run("batchnorm"), t)[:2]
    return _bracketed_log_ratio(s0, s1)


def _relative_target(R: SeedRuns) -> float:
    """90% of the lower of the two arms' best validation accuracy in this seed: a level both arms reach."""
    return 0.9 * min(R.result("none")["best_val_accuracy"], R.result("batchnorm")["best_val_accuracy"])


def _speed_detail(target: float | None):
    def det(R):
        t = target if target is not None else _relative_target(R)
        (a0, s0, w0), (a1, s1, w1) = _reach(R.run("none"), t), _reach(R.run("batchnorm"), t)
        return {"target_val_acc": t, "steps_none": s0 if math.isfinite(s0) else None,
                "steps_bn": s1 if math.isfinite(s1) else None, "after_none": a0, "after_bn": a1,
                "seconds_none": w0, "seconds_bn": w1, "resolution_steps": R.result("none")["eval_every"]}
    return det


def _c1(mode, ds):
    conds = [Condition("mlp (ReLU, Adam), steps to 90% of the worse arm's best val accuracy", ds,
                       _pair(_mlp(ds, mode)), lambda R: _speedup(R, None), _speed_detail(None), reads_test=False,
                       tune=("none", "batchnorm"))]
    if BUDGET[mode]["full_conditions"]:
        target = 0.5 if ds == "mnist1d" else 0.8
        paper = _base(ds, mode, model="paper-mlp", steps=BUDGET[mode]["steps"])
        conds.append(Condition(f"paper-mlp (sigmoid, SGD), steps to {target:.0%} val accuracy", ds, _pair(paper),
                               lambda R, t=target: _speedup(R, t), _speed_detail(target), reads_test=False,
                               tune=("none", "batchnorm")))
    return conds


# C2 higher learning rates -------------------------------------------------------------------------------


def _max_stable_lr(R: SeedRuns, arm: str, chance: float = 0.1) -> float:
    """Largest LR of the grid whose run did not diverge and ends clearly above chance (validation)."""
    ok = [R.run(arm, i)["config"]["lr"] for i in range(R.n(arm))
          if not R.result(arm, i)["diverged"] and (R.result(arm, i)["best_val_accuracy"] or 0) > chance + 0.1]
    return max(ok) if ok else min(LR_GRID) / 3.0


def _stable_bracket(R: SeedRuns, arm: str) -> tuple[float, float]:
    """Where the largest stable learning rate lies: from the largest stable one of the grid up to the next
    value of the grid (0 to the grid's first value when none is stable, unbounded above its last)."""
    m = _max_stable_lr(R, arm)
    if m < min(LR_GRID):
        return 0.0, min(LR_GRID)
    above = [lr for lr in LR_GRID if lr > m]
    return m, min(above) if above else math.inf


def _lr_gain(R: SeedRuns) -> Censored:
    """log10(largest stable LR with BN / without), each known to one step of the grid."""
    return _bracketed_log_ratio(_stable_bracket(R, "batchnorm"), _stable_bracket(R, "none"), math.log10)


def _c2(mode, ds):
    models = ("mlp", "paper-mlp") if BUDGET[mode]["full_conditions"] else ("mlp",)
    conds = []
    for model in models:
        cfg = _base(ds, mode, model=model, optimizer="sgd", steps=BUDGET[mode]["short"])
        arms = {n: [cfg.replace(norm=n, lr=lr) for lr in LR_GRID] for n in ("none", "batchnorm")}
        conds.append(Condition(
            f"{model}, SGD, LR grid {LR_GRID[0]:g}..{LR_GRID[-1]:g}", ds, arms,
            _lr_gain,
            lambda R: {"max_lr_none": _max_stable_lr(R, "none"), "max_lr_bn": _max_stable_lr(R, "batchnorm")},
            reads_test=False, lr_note="the claim's grid, every LR for every arm"))
    return conds


# C3 regularization --------------------------------------------------------------------------------------


def _gap(R: SeedRuns, arm: str):
    return R.result(arm)["train_accuracy"] - R.acc(arm)


def _c3(mode, ds):
    # the training-set-size axis: quick mode on MNIST-1D only (its 3600 examples overfit most)
    sizes = [None, 2000, 500, 250] if mode == "full" else [None, 500] if ds == "mnist1d" else [None]
    conds = []
    for n in sizes:
        cfg = _mlp(ds, mode) if n is None else _mlp(ds, mode, data_limit=n)
        size = "all training examples" if n is None else f"{n} training examples"
        conds.append(Condition(
            f"mlp, {size}", ds, _pair(cfg), lambda R: 100 * (_gap(R, "none") - _gap(R, "batchnorm")),
            lambda R: {"gap_none": _gap(R, "none"), "gap_bn": _gap(R, "batchnorm")}, tune=("none", "batchnorm"),
            shared_lr=n is None))
    return conds


# C4 initialization --------------------------------------------------------------------------------------

INIT_SCALES = (0.1, 1.0, 10.0)


def _c4(mode, ds):
    cfg = _mlp(ds, mode, model_kw={"depth": 4})

    def arms_at(scale):
        return {f"{n}@{scale:g}": [cfg.replace(norm=n, weight_scale=scale)] for n in ("none", "batchnorm")}

    arms = {k: v for s in INIT_SCALES for k, v in arms_at(s).items()}

    def spread(R, n):
        accs = np.stack([np.broadcast_to(R.acc(f"{n}@{s:g}"), np.shape(R.acc(f"{n}@1"))) for s in INIT_SCALES])
        return accs.max(axis=0) - accs.min(axis=0)

    if BUDGET[mode]["full_conditions"]:
        tuned, lr_from, how = tuple(arms), {}, "each (arm, scale) at its own tuned LR"
    else:
        tuned = ("none@1", "batchnorm@1")
        lr_from = {k: k.split("@")[0] + "@1" for k in arms if k not in tuned}
        how = "each arm at the LR tuned at scale x1"
    return [Condition(
        f"mlp depth 4, Adam, weight scale x0.1/x1/x10, {how}", ds, arms,
        lambda R: 100 * (spread(R, "none") - spread(R, "batchnorm")),
        lambda R: {k: R.acc(k) for k in arms}, tune=tuned, lr_from=lr_from, shared_lr=False)]


# C5 vanishing / exploding gradients ---------------------------------------------------------------------


def _log_ratio(run) -> float:
    g = run["init"]["grad_norms"]
    return math.log10(g[0] / g[-2]) if g[0] > 0 and g[-2] > 0 else float("inf")  # first vs last hidden


def growth_per_layer(run) -> float:
    """Per-layer growth factor of the squared gradient norm at initialization, fitted over the hidden
    layers (Yang et al. 2019 predict pi / (pi - 1) = 1.467 for BN-ReLU nets without skips)."""
    g = np.array(run["init"]["grad_norms"][1:-1], dtype=float)
    if len(g) < 3 or not np.all(g > 0):
        return float("nan")
    depth = np.arange(len(g))[::-1]  # distance from the output
    slope = np.polyfit(depth, 2 * np.log(g), 1)[0]
    return float(np.exp(slope))


def _c5(mode, ds):
    depth = BUDGET[mode]["depth"]
    conds = []
    for name, scale in (("deep plain MLP, He init", 1.0), ("deep plain MLP, small init (x0.5)", 0.5)):
        cfg = _base(ds, mode, model="deep-mlp", steps=0, probes=("grad_norms",), weight_scale=scale,
                    model_kw={"depth": depth})
        conds.append(Condition(
            f"{name}, depth {depth}", ds, _pair(cfg),
            lambda R: abs(_log_ratio(R.run("none"))) - abs(_log_ratio(R.run("batchnorm"))),
            lambda R: {"log10_ratio_none": _log_ratio(R.run("none")),
                       "log10_ratio_bn": _log_ratio(R.run("batchnorm")),
                       "growth_per_layer_bn": growth_per_layer(R.run("batchnorm")),
                       "growth_per_layer_none": growth_per_layer(R.run("none"))},
            reads_test=False, lr_note="at initialization: no training"))
    return conds


# C6 very deep networks ----------------------------------------------------------------------------------


def _c6(mode, ds):
    b = BUDGET[mode]
    plain = _base(ds, mode, model="deep-mlp", steps=b["deep_steps"], optimizer="sgd", model_kw={"depth": b["depth"]})
    res = _base(ds, mode, model="resnet-mlp", steps=b["deep_steps"], optimizer="sgd",
                model_kw={"depth": b["depth"]})
    skip = res.replace(norm="none", model_kw={"depth": b["depth"], "skipinit": True})
    grid = None if b["full_conditions"] else (0.01, 0.03, 0.1)  # quick: a shorter first grid, still extended
    return [
        Condition(f"plain MLP, {b['depth']} layers, SGD", ds, _pair(plain), _acc_diff("none", "batchnorm"),
                  _acc_detail("none", "batchnorm"), tune=("none", "batchnorm"), shared_lr=False, tune_grid=grid),
        # De & Smith (2020): a residual net without normalization trains when its branches start at zero
        # (SkipInit); the no-BN baseline is SkipInit, not a residual net whose variance doubles per block
        Condition(f"residual MLP, {b['depth']} blocks, BN vs SkipInit (no norm), SGD", ds,
                  {"none": [skip], "batchnorm": [res.replace(norm="batchnorm")]}, _acc_diff("none", "batchnorm"),
                  _acc_detail("none", "batchnorm"), tune=("none", "batchnorm"), shared_lr=False, tune_grid=grid),
    ]


# C7 internal covariate shift / C8 smoothness -----------------------------------------------------------


def _probe_cfg(ds, mode):
    steps = BUDGET[mode].get("probe_steps", BUDGET[mode]["steps"])
    return _base(ds, mode, model="mlp", optimizer="sgd", lr=0.1, steps=steps,
                 probes=("ics", "smoothness"), model_kw={"depth": BUDGET[mode]["ics_depth"]})


def _ics(run, key="ics_rel"):
    """Santurkar's ICS averaged over training and over the layers after the first (the first layer has no
    earlier layers: its ICS is 0 by definition)."""
    vals = [v for row in run["curves"].get(key, []) for v in row[1:] if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _c7(mode, ds):
    cfg = _probe_cfg(ds, mode)
    conds = [Condition(f"mlp depth {BUDGET[mode]['ics_depth']}, SGD lr 0.1", ds, _pair(cfg),
                       lambda R: _ics(R.run("none")) - _ics(R.run("batchnorm")),
                       lambda R: {"ics_rel_none": _ics(R.run("none")), "ics_rel_bn": _ics(R.run("batchnorm")),
                                  "ics_cos_none": _ics(R.run("none"), "ics_cos"),
                                  "ics_cos_bn": _ics(R.run("batchnorm"), "ics_cos")},
                       reads_test=False, lr_note="one LR for both arms: the measure compares like steps")]
    return conds


def _beta(run):
    vals = [math.log10(b) for b in run["curves"].get("beta", []) if b and b > 0 and math.isfinite(b)]
    return float(np.mean(vals)) if vals else float("nan")


def _c8(mode, ds):
    cfg = _probe_cfg(ds, mode)
    return [Condition(f"mlp depth {BUDGET[mode]['ics_depth']}, SGD lr 0.1, along the actual updates", ds,
                      _pair(cfg), lambda R: _beta(R.run("none")) - _beta(R.run("batchnorm")),
                      lambda R: {"log10_beta_none": _beta(R.run("none")), "log10_beta_bn": _beta(R.run("batchnorm"))},
                      reads_test=False, lr_note="one LR for both arms: the measure compares like steps")]


# C9 accuracy (MLP, CNN, RNN) ----------------------------------------------------------------------------


def _c9(mode, ds):
    b = BUDGET[mode]
    conds = [Condition("mlp, Adam", ds, _pair(_mlp(ds, mode)), _acc_diff("none", "batchnorm"),
                       _acc_detail("none", "batchnorm"), tune=("none", "batchnorm"))]
    if ds == "mnist1d" or b["full_conditions"]:
        cnn = _base(ds, mode, model="cnn", steps=b["steps"], probes=_AFTER)
        conds.append(Condition("cnn, Adam", ds, _pair(cnn), _acc_diff("none", "batchnorm"),
                               _acc_detail("none", "batchnorm"), tune=("none", "batchnorm")))
    if b["full_conditions"] and ds == "fashion-mnist":
        # a small ResNet with the usual image recipe: SGD momentum, weight decay, cosine schedule; without
        # normalization it gets SkipInit (De & Smith 2020), each arm at its own tuned learning rate
        res = _base(ds, mode, model="resnet", optimizer="momentum", weight_decay=5e-4, schedule="cosine",
                    steps=b["steps"], batch_size=128)
        arms = {"none": [res.replace(model_kw={"skipinit": True})], "batchnorm": [res.replace(norm="batchnorm")]}
        conds.append(Condition("small ResNet (SGD momentum, wd 5e-4, cosine): BN vs SkipInit", ds, arms,
                               _acc_diff("none", "batchnorm"), _acc_detail("none", "batchnorm"),
                               tune=("none", "batchnorm"), shared_lr=False))
    if b["full_conditions"] or mode == "tiny":
        # Cooijmans et al. (2017): gamma 0.1, per-time-step statistics, Adam lr 1e-3
        lstm = _base(ds, mode, model="lstm", optimizer="adam", lr=1e-3, steps=b["lstm_steps"])
        conds.append(Condition("lstm vs BN-LSTM (Cooijmans: gamma 0.1, Adam lr 1e-3)", ds, _pair(lstm),
                               _acc_diff("none", "batchnorm"), _acc_detail("none", "batchnorm"),
                               lr_note="Cooijmans et al.'s recipe for both arms"))
    return conds


# C10 / C11 statistics at inference ---------------------------------------------------------------------


def _bn_only(cfg: RunConfig) -> dict[str, list[RunConfig]]:
    return {"batchnorm": [cfg.replace(norm="batchnorm")]}


def _c10(mode, ds):
    def eff(R):
        r = R.result("batchnorm")
        return 100 * (R.acc("batchnorm") - r["batch_stat_accuracy"]["16"])

    return [Condition("mlp, test batches of 16 normalized by their own statistics", ds, _bn_only(_mlp(ds, mode)),
                      eff, lambda R: {"running_stats": R.acc("batchnorm"),
                                      **{f"batch_stats_{k}": v for k, v in R.result("batchnorm")
                                         ["batch_stat_accuracy"].items()}},
                      tune=("batchnorm",), shared_lr=False)]


def _c11(mode, ds):
    return [Condition("mlp: EMA running statistics vs exact population statistics (recalibrate)", ds,
                      _bn_only(_mlp(ds, mode)),
                      lambda R: 100 * (R.acc("batchnorm", which="recalibrated") - R.acc("batchnorm")),
                      lambda R: {"ema": R.acc("batchnorm"), "population": R.acc("batchnorm", which="recalibrated")},
                      tune=("batchnorm",), shared_lr=False)]


# C12 small batches ---------------------------------------------------------------------------------------


def _c12(mode, ds):
    b = BUDGET[mode]
    others = ("ghost", "renorm", "layernorm") if b["full_conditions"] else ()
    conds = []
    for bs in b["small_batches"]:
        cfg = _base(ds, mode, model="mlp", optimizer="adam", lr=1e-3, batch_size=bs, steps=b["steps"])
        arms = {n: [cfg.replace(norm=n)] for n in ("batchnorm", "groupnorm", *others)}
        conds.append(Condition(f"mlp, batch {bs}, Adam lr 1e-3", ds, arms, _acc_diff("groupnorm", "batchnorm"),
                               _acc_detail(*arms), lr_note="one LR for every norm and batch size (Adam 1e-3)"))
    return conds


# C13 placement, C14 dropout, C15 noisy BN --------------------------------------------------------------


def _c13(mode, ds):
    cfg = _mlp(ds, mode).replace(norm="batchnorm")
    arms = {"before": [cfg], "after": [cfg.replace(model_kw={"placement": "after"})]}
    return [Condition("mlp, Adam: BN after vs before the ReLU", ds, arms, _acc_diff("before", "after"),
                      _acc_detail("before", "after"), tune=("before", "after"), shared_lr=False)]


def _c14(mode, ds):
    cfg = _mlp(ds, mode).replace(norm="batchnorm")
    arms = {"bn": [cfg], "bn+dropout": [cfg.replace(model_kw={"dropout": 0.3})]}
    return [Condition("mlp, Adam: BN alone vs dropout 0.3 feeding BN", ds, arms, _acc_diff("bn+dropout", "bn"),
                      _acc_detail("bn", "bn+dropout"), tune=("bn", "bn+dropout"), shared_lr=False)]


def _c15(mode, ds):
    cfg = _mlp(ds, mode)
    arms = {n: [cfg.replace(norm=n)] for n in ("none", "noisy", "batchnorm")}
    return [Condition("mlp, Adam: noisy BN (shift and scale redrawn every step) vs no norm", ds, arms,
                      _acc_diff("none", "noisy"), _acc_detail("none", "noisy", "batchnorm"),
                      tune=("none", "noisy", "batchnorm"), shared_lr=False)]


CLAIMS: list[Claim] = [
    Claim("faster", "BN makes training converge faster",
          "allows the network to converge faster and more reliably",
          "Ioffe & Szegedy 2015 (Fig. 1, BN-Inception 14x fewer steps)",
          "log2(steps without BN / steps with BN) to a validation-accuracy target", 0.3, _c1),
    Claim("higher-lr", "BN allows higher learning rates",
          "enables the use of higher learning rates", "Ioffe & Szegedy 2015, Sec. 3.3",
          "log10(max stable LR with BN / without), SGD", 0.4, _c2),
    Claim("regularizes", "BN regularizes (smaller generalization gap)",
          "acts as a regularizer ... reducing overfitting", "Ioffe & Szegedy 2015, Sec. 3.4",
          "pp of (train - test accuracy) removed by BN, at the best validation checkpoint", 1.0, _c3),
    Claim("init", "BN reduces sensitivity to weight initialization",
          "the network becomes less dependent on the choice of initialization", "Ioffe & Szegedy 2015, Sec. 3.3",
          "pp reduction of the test-accuracy spread across init scales x0.1/x1/x10", 2.0, _c4),
    Claim("gradients", "BN prevents vanishing/exploding gradients",
          "helps in mitigating the vanishing/exploding gradient problem",
          "Yang et al. 2019: in deep BN-ReLU nets without skips gradients explode at init (x1.47 per layer)",
          "decrease of |log10(grad norm first layer / last layer)| at initialization", 0.3, _c5),
    Claim("deep", "BN makes very deep networks trainable",
          "it is possible to train deep networks with over 100 layers",
          "Yang et al. 2019 (plain deep BN nets untrainable); De & Smith 2020 (SkipInit trains without BN)",
          "pp of test accuracy gained with BN", 5.0, _c6),
    Claim("ics", "BN reduces internal covariate shift",
          "reducing the internal covariate shift", "Santurkar et al. 2018: BN does not reduce ICS",
          "decrease of ||G - G'|| / ||G|| (Santurkar's ICS, layers 2..L, averaged over training)", 0.05, _c7),
    Claim("smooth", "BN makes the loss landscape smoother",
          "a smoother parameter space", "Santurkar et al. 2018 (Fig. 4): smaller effective beta-smoothness",
          "log10 decrease of the effective beta-smoothness along the optimizer's updates", 0.1, _c8),
    Claim("accuracy", "BN increases accuracy (MLP, CNN, RNN)",
          "improved model accuracy", "Cooijmans et al. 2017 (BN-LSTM); MNIST-1D reference numbers",
          "pp of test accuracy gained with BN", 1.0, _c9),
    Claim("running-stats", "Inference needs the running statistics",
          "update the running mean and standard deviation using exponential moving averages",
          "Ioffe & Szegedy 2015, Alg. 2",
          "pp of test accuracy lost when test batches of 16 are normalized by their own statistics", 1.0, _c10),
    Claim("population-stats", "Exact population statistics beat the EMA at inference",
          "use the running statistics at inference",
          "Wu & Johnson 2021 (precise BN); Ioffe & Szegedy 2015, Alg. 2 (population statistics)",
          "pp of test accuracy gained by recalibrating the running statistics on the training set", 0.5, _c11),
    Claim("small-batch", "BN keeps its benefit at small batches",
          "add BN after each dense or conv layer", "Wu & He 2018: GroupNorm 10.6% lower error than BN at batch 2",
          "pp of test accuracy of BN over GroupNorm at the given batch size", 1.0, _c12),
    Claim("placement", "BN works better after the activation than before it",
          "add BN after each dense or conv layer (after the activation)",
          "Ioffe & Szegedy 2015 put BN before the nonlinearity",
          "pp of test accuracy of BN after the ReLU over BN before it", 0.5, _c13),
    Claim("dropout", "Dropout feeding BN costs accuracy (variance shift)",
          "BN acts as a regularizer, in some cases eliminating the need for dropout",
          "Li et al. 2019: dropout before BN shifts the variance between training and inference",
          "pp of test accuracy of BN alone over dropout 0.3 before BN", 0.5, _c14),
    Claim("noisy-bn", "BN helps even when covariate shift is injected after it",
          "reducing the internal covariate shift", "Santurkar et al. 2018 (Fig. 2): noisy BN still trains well",
          "pp of test accuracy of noisy BN over no normalization", 1.0, _c15),
]
