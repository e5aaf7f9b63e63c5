"""Tables computed from stored runs: the compare table (test accuracy at the best validation checkpoint,
steps to target, max stable LR, generalization gap, mean and spread over seeds) and the Figure 1 series.

The "best" learning rate and batch size of a norm are chosen by **validation** accuracy (mean over seeds of
each run's best validation accuracy); the test accuracy is only reported, never used to choose."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .train import steps_to

__all__ = ["compare_table", "figure1_series", "mean_std"]


def mean_std(xs) -> tuple[float, float]:
    v = np.array([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def compare_table(runs: list[dict], target: float) -> dict:
    """Group runs by (model, norm, lr, batch size); one row per group, plus a per-(model, norm) summary."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        c = r["config"]
        groups[(c["model"], c["norm"], c["lr"], c["batch_size"])].append(r)
    rows = []
    for (model, norm, lr, bs), rs in sorted(groups.items(), key=lambda kv: kv[0]):
        accs = [r["result"]["test_accuracy"] for r in rs]
        vals = [r["result"].get("best_val_accuracy") for r in rs]
        gaps = [r["result"]["train_accuracy"] - r["result"]["test_accuracy"] for r in rs]
        reach = [steps_to(r["curves"], "val_acc", target) for r in rs]
        reached = [s for s in reach if s is not None]
        m, s = mean_std(accs)
        vm, _ = mean_std(vals)
        gm, gs = mean_std(gaps)
        rows.append({
            "model": model, "norm": norm, "lr": lr, "batch_size": bs, "seeds": len(rs),
            "test_accuracy": m, "test_accuracy_std": s, "val_accuracy": vm,
            "gap": gm, "gap_std": gs,
            "steps_to_target": float(np.mean(reached)) if reached else None,
            "reached": len(reached),
            "diverged": sum(bool(r["result"]["diverged"]) for r in rs),
            # the fastest seed: a process's first run also pays one-time warm-up (imports, kernel compilation)
            "seconds": float(np.min([r["result"]["seconds"] for r in rs])),
        })
    summary = []
    by_norm: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_norm[(row["model"], row["norm"])].append(row)
    for (model, norm), rs in by_norm.items():
        stable = [r["lr"] for r in rs if r["diverged"] == 0 and r["test_accuracy"] > 0.2]
        best = max(rs, key=lambda r: -1 if math.isnan(r["val_accuracy"]) else r["val_accuracy"])
        lrs = sorted({r["lr"] for r in rs})
        summary.append({
            "model": model, "norm": norm, "best_lr": best["lr"], "best_batch_size": best["batch_size"],
            "selected_on": "validation", "best_val_accuracy": best["val_accuracy"],
            "best_lr_at_edge": len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1]),
            "best_test_accuracy": best["test_accuracy"],
            "best_test_accuracy_std": best["test_accuracy_std"], "max_stable_lr": max(stable) if stable else None,
            "steps_to_target": best["steps_to_target"], "gap": best["gap"],
        })
    return {"target": target, "rows": rows, "summary": summary}


def curves_mean(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Mean over runs of ``curves[key]`` on the common step grid (shortest run wins)."""
    n = min(len(r["curves"]["step"]) for r in runs)
    steps = runs[0]["curves"]["step"][:n]
    vals = np.array([[np.nan if v is None else v for v in r["curves"][key][:n]] for r in runs], dtype=float)
    return list(steps), [float(x) for x in np.nanmean(vals, axis=0)] if len(vals) else []


def figure1_series(runs: list[dict]) -> dict:
    """The ``figure1 --json`` object: one entry per norm (first seed's percentiles, mean accuracy)."""
    by_norm: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_norm[r["config"]["norm"]].append(r)
    out = []
    for norm, rs in by_norm.items():
        steps, acc = curves_mean(rs, "test_acc")
        c = rs[0]["curves"]
        out.append({
            "norm": norm,
            "steps": steps,
            "test_accuracy": acc,
            "percentiles": {k: [None if v is None else float(v) for v in c.get(k, [])][: len(steps)]
                            for k in ("p15", "p50", "p85")},
        })
    return {"runs": out}
