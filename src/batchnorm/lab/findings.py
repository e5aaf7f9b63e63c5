"""What an experiment found, in one line per comparison: the effect of BN with its 95% interval and a verdict in
words. The terminal summary of ``compare``/``demo`` and the findings box at the top of the report print these
same lines.

For a comparison, each norm is set against ``none`` at each arm's own learning rate and batch size chosen on
**validation** (:func:`batchnorm.lab.analysis.compare_table`); the effect is the mean over seeds of the paired
difference of test accuracy (percentage points; R² for regression) at the best validation checkpoint. Its 95%
interval comes from :func:`batchnorm.lab.stats.bootstrap` (seeds resampled, and test examples when the runs
stored which ones they got right), with Student's t over the seeds. Verdict: ``better``/``worse`` when the
interval excludes 0, ``within noise`` when it does not, ``no interval`` with one seed.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["compare_findings", "figure1_findings", "finding_text"]

_LABEL = {"none": "without BN", "batchnorm": "BN", "ghost": "ghost BN", "renorm": "batch renorm",
          "frozen": "frozen BN"}


def _name(norm: str) -> str:
    return _LABEL.get(norm, norm)


def _paired(runs: list[dict], model: str, base: dict, treat: dict) -> list[tuple[dict, dict]]:
    def pick(s):
        return {r["config"]["seed"]: r for r in runs
                if r["config"]["model"] == model and r["config"]["norm"] == s["norm"]
                and r["config"]["lr"] == s["best_lr"] and r["config"]["batch_size"] == s["best_batch_size"]}

    a, b = pick(base), pick(treat)
    return [(a[s], b[s]) for s in sorted(set(a) & set(b))]


def _effect(pairs: list[tuple[dict, dict]], scale: float) -> dict:
    from .stats import bootstrap
    from .train import unpack_correct

    n = len(pairs)
    accs = [(a["result"]["test_accuracy"], b["result"]["test_accuracy"]) for a, b in pairs]
    diffs = [scale * (tb - ta) for ta, tb in accs]
    if n == 0 or not all(math.isfinite(d) for d in diffs):
        return {"effect": float("nan"), "ci95": [float("nan"), float("nan")], "n_seeds": n}
    if n == 1:
        return {"effect": diffs[0], "ci95": [float("nan"), float("nan")], "n_seeds": 1}
    n_test = {a["result"].get("test_examples") for pair in pairs for a in pair}
    bits = all(r["result"].get("test_correct") for pair in pairs for r in pair) and len(n_test) == 1
    if bits:
        m = n_test.pop()
        correct = [(unpack_correct(a["result"]["test_correct"], m), unpack_correct(b["result"]["test_correct"], m))
                   for a, b in pairs]

        def effect_of_seed(i, w):
            ca, cb = correct[i]
            if w is None:
                return diffs[i]
            tot = np.maximum(w.sum(axis=1), 1.0)
            return scale * ((w @ cb) - (w @ ca)) / tot

        est = bootstrap(effect_of_seed, n, 0.0, n_test=m)
    else:
        est = bootstrap(lambda i, w: diffs[i], n, 0.0)
    return {"effect": est.effect, "ci95": [float(est.ci95[0]), float(est.ci95[1])], "n_seeds": n,
            "resampled_examples": bool(bits)}


def finding_text(f: dict) -> str:
    """``BN: +2.7 pp test accuracy (95% CI [+0.9, +4.5]), 5 seeds — better``."""
    unit = f["unit"]
    fmt = (lambda x: f"{x:+.3f}") if unit == "R²" else (lambda x: f"{x:+.1f}")
    eff = "–" if not math.isfinite(f["effect"]) else fmt(f["effect"])
    lo, hi = f["ci95"]
    ci = f" (95% CI [{fmt(lo)}, {fmt(hi)}])" if math.isfinite(lo) and math.isfinite(hi) else ""
    seeds = f"{f['n_seeds']} seed{'s' if f['n_seeds'] != 1 else ''}"
    what = "pp test accuracy" if unit == "pp" else "test R²"
    return f"{f['subject']}: {eff} {what}{ci} vs {_name(f['baseline'])}, {seeds} — {f['verdict']}"


def compare_findings(runs: list[dict], tab: dict) -> list[dict]:
    """One finding per (model, norm other than ``none``) of a comparison (``tab``: ``compare_table``)."""
    out = []
    regression = any(r["result"].get("task") == "regression" for r in runs)
    scale, unit = (1.0, "R²") if regression else (100.0, "pp")
    by_model: dict[str, dict[str, dict]] = {}
    for s in tab["summary"]:
        by_model.setdefault(s["model"], {})[s["norm"]] = s
    for model, norms in by_model.items():
        base = norms.get("none")
        if base is None:
            continue
        for norm, s in norms.items():
            if norm == "none":
                continue
            e = _effect(_paired(runs, model, base, s), scale)
            lo, hi = e["ci95"]
            if e["n_seeds"] < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
                verdict = "one seed, no interval" if e["n_seeds"] == 1 else "no paired seeds"
                cls = "mid"
            elif lo > 0:
                verdict, cls = f"{_name(norm)} better", "ok"
            elif hi < 0:
                verdict, cls = f"{_name(norm)} worse", "bad"
            else:
                verdict, cls = "within noise", "mid"
            f = {"model": model, "norm": norm, "subject": f"{model}, {_name(norm)}", "baseline": "none",
                 "unit": unit, **e, "lr": {norm: s["best_lr"], "none": base["best_lr"]}, "verdict": verdict,
                 "class": cls}
            f["text"] = finding_text(f)
            out.append(f)
    return out


def figure1_findings(series: dict) -> list[dict]:
    """Figure 1 (one seed): the final test accuracy with and without BN and the drift of the median input."""
    runs = {s["norm"]: s for s in series["runs"]}
    if "none" not in runs or "batchnorm" not in runs:
        return []
    a0, a1 = runs["none"]["test_accuracy"][-1], runs["batchnorm"]["test_accuracy"][-1]

    def drift(s):
        p = s["percentiles"]["p50"]
        return abs(p[-1] - p[0]) if p and p[0] is not None and p[-1] is not None else float("nan")

    text = (f"Figure 1, paper-mlp: BN {100 * (a1 - a0):+.1f} pp final test accuracy ({100 * a1:.1f}% vs "
            f"{100 * a0:.1f}%), one seed, no interval; the median input of a last-layer sigmoid moved by "
            f"{drift(runs['batchnorm']):.2f} with BN and {drift(runs['none']):.2f} without")
    return [{"text": text, "class": "mid", "effect": 100 * (a1 - a0), "n_seeds": 1}]
