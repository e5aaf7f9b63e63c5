"""How the lab turns runs into verdicts on the seed articles' claims.

A claim (:mod:`.experiments` defines them) is tested under *conditions*, each on one dataset. A condition
has *arms* (e.g. without and with BN), each a run configuration, and an *effect*: one number per seed
computed from that seed's runs (positive = the claim holds, in the claim's stated unit).

* **Fair arms.** In a tuned condition each arm's learning rate is chosen on the validation split: the
  mean best validation accuracy over the first seeds (the mode's ``tune_seeds``: 1 in ``--quick``,
  :data:`TUNE_SEEDS` otherwise), on a 1-3 ladder of learning rates
  that is extended until the best one is interior (or a bound is reached, which the output says). The
  test split never selects anything. A tuned condition is also reported at one shared learning rate
  (the model's recipe), as its own condition.
* **Statistics** (:mod:`.stats`): paired bootstrap over seeds and test examples, Holm's correction over
  every condition of the run, verdicts ``supported`` / ``contradicted`` / ``inconclusive``.

Running a claim is iterative: :func:`plan_claims` lists the runs still needed given what is stored
(tuning runs first, then the runs at the selected learning rates); the command runs them and plans again
until nothing is missing; :func:`analyze_claims` then reads everything from the store.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np

from . import stats
from .train import RunConfig, config_key, recipe_fields, unpack_correct, with_recipe

__all__ = ["Budget", "Claim", "Condition", "SeedRuns", "analyze_claims", "plan_claims", "tune_lr"]

#: Seeds (the first ones of a run) whose validation accuracy selects each arm's learning rate, unless the
#: mode's budget says otherwise (``tune_seeds``).
TUNE_SEEDS = 2
#: First learning-rate grid per optimizer; extended along the 1-3 ladder while the best is at an edge.
LR_GRIDS = {"adam": (1e-3, 3e-3, 1e-2, 3e-2), "adamw": (1e-3, 3e-3, 1e-2, 3e-2),
            "sgd": (0.01, 0.03, 0.1, 0.3, 1.0), "momentum": (0.003, 0.01, 0.03, 0.1, 0.3)}
LR_BOUNDS = (1e-5, 30.0)


class _BudgetKeys(TypedDict):
    seeds: int
    steps: int
    short: int
    depth: int
    deep_steps: int
    lstm_steps: int
    ics_depth: int
    lr_extensions: int
    limit: int | None
    small_batches: tuple[int, ...]
    full_conditions: bool


class Budget(_BudgetKeys, total=False):
    """The size of a mode's experiments (``experiments.BUDGET``); the keys below are optional."""

    tune_points: int  # try only this many learning rates, in the middle of the grid
    tune_seeds: int  # tune on this many seeds (default TUNE_SEEDS)
    probe_steps: int  # steps of the ICS/smoothness probe runs (default: steps)


# ------------------------------------------------------------------------------------------ structure


class SeedRuns:
    """The runs of one seed of a condition, by arm, and their accuracies under test-example weights.

    ``acc(arm)`` is the test accuracy at the best validation checkpoint; inside the bootstrap (weights
    ``w`` of shape ``(R, n_test)``) it is the ``(R,)`` array of weighted accuracies, so effects written
    with arithmetic and ``np.max``/``np.min`` over arms work in both cases."""

    def __init__(self, runs: dict[str, list[dict]], w: np.ndarray | None = None):
        self.runs = runs
        self.w = w

    def run(self, arm: str, i: int = 0) -> dict:
        return self.runs[arm][i]

    def result(self, arm: str, i: int = 0) -> dict:
        return self.runs[arm][i]["result"]

    def n(self, arm: str) -> int:
        return len(self.runs[arm])

    def acc(self, arm: str, i: int = 0, which: str = "test"):
        """Test accuracy (``which="recalibrated"``: with exact population statistics)."""
        r = self.result(arm, i)
        key = "test" if which == "test" else f"{which}_test"
        if self.w is None:
            return float(r[f"{key}_accuracy"])
        bits = unpack_correct(r[f"{key}_correct"], r["test_examples"])
        return (self.w @ bits) / self.w.sum(axis=1)


@dataclass
class Condition:
    """One setting of a claim on one dataset (see the module docstring)."""

    name: str
    dataset: str
    arms: dict[str, list[RunConfig]]  # arm -> configurations (the seed is set per seed)
    effect: Callable[[SeedRuns], object]  # a float, an array under bootstrap weights, or stats.Censored
    detail: Callable[[SeedRuns], dict] = lambda runs: {}
    tune: tuple[str, ...] = ()  # arms whose (single) configuration gets its learning rate tuned
    lr_from: dict[str, str] = field(default_factory=dict)  # arm -> tuned arm whose learning rate it uses
    tune_grid: tuple[float, ...] | None = None  # first grid of the tuning (default: the optimizer's)
    shared_lr: bool = True  # a tuned condition is also reported at the recipe's learning rate
    reads_test: bool = True  # the effect reads test accuracies: the bootstrap resamples test examples
    lr_note: str = ""  # how the learning rates of an untuned condition were chosen


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


# ---------------------------------------------------------------------------------------- LR tuning


def _ladder(lr: float, up: bool) -> float:
    """The next learning rate on the 1-3 ladder (..., 1e-3, 3e-3, 1e-2, ...)."""
    e = math.floor(math.log10(lr) + 1e-9)
    m = lr / 10**e
    if up:
        return float(f"3e{e}") if m < 2 else float(f"1e{e + 1}")
    return float(f"3e{e - 1}") if m < 2 else float(f"1e{e}")


def tune_lr(base: RunConfig, seeds: list[int], get_run: Callable[[RunConfig], dict | None],
            max_extensions: int = 3,
            grid: tuple[float, ...] | None = None) -> tuple[float | None, list[RunConfig], dict]:
    """Select ``base``'s learning rate on the validation split.

    Returns ``(lr, needed, info)``: ``needed`` lists the runs to train before a choice can be made (then
    ``lr`` is None); ``info`` has the grid, each LR's mean best validation accuracy and whether the best
    one is interior."""
    opt = recipe_fields(base).optimizer or "adam"
    lrs = list(grid or LR_GRIDS.get(opt, LR_GRIDS["adam"]))
    extended = 0
    while True:
        cfgs = {lr: [base.replace(lr=lr, seed=s) for s in seeds] for lr in lrs}
        found = {lr: [get_run(c) for c in cs] for lr, cs in cfgs.items()}
        needed = [c for lr in lrs for c, r in zip(cfgs[lr], found[lr]) if r is None]
        if needed:
            return None, needed, {}
        runs = {lr: [r for r in rs if r is not None] for lr, rs in found.items()}  # all of them: none is needed
        score = {lr: float(np.mean([_val_score(r) for r in rs])) for lr, rs in runs.items()}
        best = max(lrs, key=lambda lr: (score[lr], -lr))
        i = lrs.index(best)
        if extended < max_extensions and i == 0 and _ladder(lrs[0], False) >= LR_BOUNDS[0]:
            lrs.insert(0, _ladder(lrs[0], False))
        elif extended < max_extensions and i == len(lrs) - 1 and _ladder(lrs[-1], True) <= LR_BOUNDS[1]:
            lrs.append(_ladder(lrs[-1], True))
        else:
            return best, [], {"grid": lrs, "val_accuracy": score, "interior": 0 < i < len(lrs) - 1,
                              "seeds": list(seeds)}
        extended += 1


def _found(get_run: Callable[[RunConfig], dict | None], cfg: RunConfig) -> dict:
    """The run of ``cfg``, which :func:`_resolve` found stored."""
    run = get_run(cfg)
    if run is None:  # pragma: no cover - a run vanished from the store while the claims were analyzed
        raise LookupError(f"run {config_key(cfg)} is no longer stored")
    return run


def _val_score(run: dict) -> float:
    v = run["result"].get("best_val_accuracy")
    return float(v) if v is not None and math.isfinite(v) else 0.0


def _expand(cond: Condition) -> list[Condition]:
    """A tuned condition and, with ``shared_lr``, its twin at the recipe's learning rate."""
    if not cond.tune or not cond.shared_lr:
        return [cond]
    lr = with_recipe(cond.arms[cond.tune[0]][0]).lr
    twin = Condition(f"{cond.name}, shared lr {lr:g}", cond.dataset,
                     {a: [c.replace(lr=lr) for c in cs] for a, cs in cond.arms.items()}, cond.effect, cond.detail,
                     (), {}, None, False, cond.reads_test, f"one learning rate for every arm: the recipe's {lr:g}")
    return [cond, twin]


def _resolve(cond: Condition, seeds: list[int], get_run, budget: Budget):
    """(runs still needed, {seed: {arm: [configs]}} or None, {arm: lr info})."""
    needed: list[RunConfig] = []
    chosen: dict[str, float] = {}
    info: dict[str, dict] = {}
    for arm in cond.tune:
        base = cond.arms[arm][0]
        grid = cond.tune_grid or LR_GRIDS.get(with_recipe(base).optimizer or "adam", LR_GRIDS["adam"])
        if budget.get("tune_points"):  # the smoke-test mode tries only the middle of the grid
            mid = len(grid) // 2
            grid = grid[mid - budget["tune_points"] // 2: mid - budget["tune_points"] // 2 + budget["tune_points"]]
        tune_seeds = seeds[:budget.get("tune_seeds", TUNE_SEEDS)]
        lr, need, inf = tune_lr(base, tune_seeds, get_run, budget["lr_extensions"], tuple(grid))
        needed += need
        if lr is not None:
            chosen[arm], info[arm] = lr, inf
    if needed:
        return needed, None, info
    chosen.update({arm: chosen[src] for arm, src in cond.lr_from.items()})
    per_seed = {s: {arm: [c.replace(seed=s, **({"lr": chosen[arm]} if arm in chosen else {})) for c in cfgs]
                    for arm, cfgs in cond.arms.items()} for s in seeds}
    missing = [c for arms in per_seed.values() for cfgs in arms.values() for c in cfgs if get_run(c) is None]
    return missing, per_seed, info


# ------------------------------------------------------------------------------------------ plumbing


def _select(claims: list[str] | None) -> list[Claim]:
    from .experiments import CLAIMS

    if not claims:
        return CLAIMS
    known = {c.key: c for c in CLAIMS}
    unknown = [k for k in claims if k not in known]
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; choose from {', '.join(known)}")
    return [known[k] for k in claims]


def _budget(mode: str) -> Budget:
    from .experiments import BUDGET

    return BUDGET[mode]


def seeds_of(mode: str) -> list[int]:
    return list(range(_budget(mode)["seeds"]))


#: The claims that make sense on any model and data: with a ``subject`` (your model and data) their conditions
#: on the lab's reference MLP are run on your model instead, and their other conditions are left out.
PORTABLE_CLAIMS = ("faster", "higher-lr", "regularizes", "accuracy", "running-stats", "small-batch")


def _on_subject(cond: Condition, subject: dict) -> Condition | None:
    """``cond`` with the reference MLP replaced by the user's model and data (``subject``: RunConfig fields:
    ``model``, ``dataset``, ``data_dir``, ``task``, ``data_kw``); None for a condition on another model."""
    cfgs = [c for cs in cond.arms.values() for c in cs]
    if any(c.model != "mlp" or c.model_kw for c in cfgs):
        return None
    model = str(subject["model"])
    fields = {k: v for k, v in subject.items() if k != "label"}
    arms = {arm: [c.replace(**fields) for c in cs] for arm, cs in cond.arms.items()}
    name = cond.name.replace("mlp (ReLU, Adam)", f"{model} (Adam)").replace("mlp", model, 1)
    return dataclasses.replace(cond, arms=arms, name=name,
                               dataset=str(subject.get("label") or subject["dataset"]))


def _conditions(mode: str, datasets: list[str], claims: list[str] | None, subject: dict | None = None):
    if subject is not None:
        fields = {k: v for k, v in subject.items() if k != "label"}
        unknown = [k for k in (claims or []) if k not in PORTABLE_CLAIMS]
        if unknown:
            raise ValueError(f"claim(s) {', '.join(unknown)} need the lab's own models; on your model choose from "
                             f"{', '.join(PORTABLE_CLAIMS)}")
        for claim in _select(list(claims or PORTABLE_CLAIMS)):
            for cond in claim.conditions(mode, str(fields["dataset"])):
                mine = _on_subject(cond, {**fields, "label": subject.get("label")})
                if mine is not None:
                    for c in _expand(mine):
                        yield claim, c
        return
    for claim in _select(claims):
        for ds in datasets:
            for cond in claim.conditions(mode, ds):
                for c in _expand(cond):
                    yield claim, c


def plan_claims(mode: str = "quick", datasets: list[str] | str = "mnist1d", claims: list[str] | None = None,
                get_run: Callable[[RunConfig], dict | None] = lambda c: None,
                seeds: list[int] | None = None, subject: dict | None = None) -> list[RunConfig]:
    """The runs still needed, given what ``get_run`` finds stored (empty when everything is there).

    ``subject``: your model and data (see :data:`PORTABLE_CLAIMS`); ``datasets`` is then unused."""
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    seeds = seeds or seeds_of(mode)
    budget = _budget(mode)
    out: dict[str, RunConfig] = {}
    for _, cond in _conditions(mode, datasets, claims, subject):
        for c in _resolve(cond, seeds, get_run, budget)[0]:
            out.setdefault(config_key(c), c)
    return list(out.values())


def _lr_of(cond: Condition, per_seed: dict, info: dict) -> dict:
    first = next(iter(per_seed.values()))
    lrs = {arm: sorted({recipe_fields(c).lr for c in cfgs}) for arm, cfgs in first.items()}
    out: dict = {arm: (v[0] if len(v) == 1 else v) for arm, v in lrs.items()}
    if cond.tune:
        out["selected_on"] = "validation"
        out["tuning"] = {arm: {"grid": i["grid"], "val_accuracy": {f"{k:g}": v for k, v in i["val_accuracy"].items()},
                               "interior": i["interior"], "seeds": i["seeds"]} for arm, i in info.items()}
    else:
        out["selected_on"] = cond.lr_note or "fixed by the experiment"
    return out


def analyze_claims(get_run: Callable[[RunConfig], dict | None], mode: str = "quick",
                   datasets: list[str] | str = "mnist1d", claims: list[str] | None = None,
                   seeds: list[int] | None = None, replicates: int = stats.REPLICATES,
                   subject: dict | None = None) -> list[dict]:
    """Effects, bootstrap intervals, Holm-corrected verdicts, from stored runs (``subject``: see
    :func:`plan_claims`)."""
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    if subject is not None:  # the conditions are named after the user's data
        datasets = [str(subject.get("label") or subject["dataset"])]
    seeds = seeds or seeds_of(mode)
    budget = _budget(mode)
    rows: list[tuple[Claim, dict]] = []
    for claim, cond in _conditions(mode, datasets, claims, subject):
        row = {"condition": cond.name, "dataset": cond.dataset, "min_effect": claim.min_effect}
        missing, per_seed, info = _resolve(cond, seeds, get_run, budget)
        if per_seed is None or missing:
            row.update(effect=float("nan"), ci95=[float("-inf"), float("inf")], n_seeds=0, p_for=1.0,
                       p_against=1.0, censored=0, lr={}, details=[], missing_runs=len(missing))
            rows.append((claim, row))
            continue
        runs = {s: {arm: [_found(get_run, c) for c in cfgs] for arm, cfgs in arms.items()}
                for s, arms in per_seed.items()}
        n_test = None
        if cond.reads_test:
            any_run = next(iter(next(iter(runs.values())).values()))[0]
            n_test = any_run["result"].get("test_examples")

        def eff(i, w, runs=runs, cond=cond):
            return cond.effect(SeedRuns(runs[seeds[i]], w))

        est = stats.bootstrap(eff, len(seeds), claim.min_effect, n_test, replicates=replicates)
        per = [stats._as_bounds(eff(i, None)) for i in range(len(seeds))]
        row.update(effect=est.effect, ci95=list(est.ci95), n_seeds=est.n_seeds, p_for=est.p_for,
                   p_against=est.p_against, censored=est.censored, lr=_lr_of(cond, per_seed, info),
                   effects=[float(lo) if lo == hi else [float(lo), float(hi)] for lo, hi in per],
                   resampled="seeds and test examples" if est.resampled_examples else "seeds",
                   details=[{"seed": s, **cond.detail(SeedRuns(runs[s]))} for s in seeds])
        rows.append((claim, row))
    p_for = stats.holm([r["p_for"] for _, r in rows])
    p_against = stats.holm([r["p_against"] for _, r in rows])
    for (claim, r), pf, pa in zip(rows, p_for, p_against):
        r["p_for_holm"], r["p_against_holm"] = pf, pa
        r["verdict"] = stats.verdict(r["effect"], claim.min_effect, pf, pa, r["n_seeds"])
    results = []
    for claim in _select(claims):
        conds = [r for c, r in rows if c is claim]
        verdict, when = _claim_verdict(conds)
        out = {
            "key": claim.key, "claim": claim.title, "seed_quote": claim.seed_quote,
            "literature": claim.literature, "unit": claim.unit, "min_effect": claim.min_effect,
            "datasets": sorted({r["dataset"] for r in conds}, key=datasets.index),
            "verdict": verdict, "condition": when, "conditions": conds,
        }
        out["evidence"] = evidence_sentence(out)
        results.append(out)
    return results


def _claim_verdict(conds: list[dict]) -> tuple[str, str]:
    """A claim's verdict: the common verdict of its conditions, else ``depends`` with where it holds."""
    verdicts = {r["verdict"] for r in conds}
    if len(verdicts) == 1:
        return verdicts.pop(), ""
    parts = []
    for v in ("supported", "contradicted", "inconclusive"):
        names = [f"{r['condition']} ({r['dataset']})" for r in conds if r["verdict"] == v]
        if names:
            parts.append(f"{v}: {', '.join(names)}")
    return "depends", "; ".join(parts)


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:+.2f}"


def interval_text(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{_fmt(r['effect'])} [{_fmt(lo)}, {_fmt(hi)}]"


def evidence_sentence(r: dict) -> str:
    parts = [f"{c['condition']} on {c['dataset']}: {interval_text(c)} over {c['n_seeds']} seeds ({c['verdict']})"
             for c in r["conditions"]]
    head = r["verdict"].capitalize()
    cond = f" — {r['condition']}" if r["condition"] else ""
    return (f"{head}{cond}. Effect = {r['unit']} (claimed size ≥ {r['min_effect']}), mean and 95% bootstrap "
            "interval: " + "; ".join(parts) + ".")
