"""The report: one self-contained HTML file (PNG plots embedded as base64), the PNG files, and a JSON
summary, rebuilt at any time from the store (``batchnorm report DIR``).

The page is rendered by a jinja2 template with autoescaping: every string that comes from the store or the
command line (experiment names and parameters, norm names such as ``module:Class``, claims' texts, the
environment) is HTML-escaped; the only markup not written in the template itself is the base64 of the
PNG plots we generate.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from jinja2 import Environment

from .analysis import compare_table, curves_mean, figure1_series
from .claims import analyze_claims, interval_text
from .findings import compare_findings, figure1_findings
from .store import Store, environment
from .train import RunConfig, config_hash, with_data

__all__ = ["build_report"]

COLORS = {"none": "#d62728", "batchnorm": "#1f77b4", "ghost": "#2ca02c", "renorm": "#9467bd", "frozen": "#8c564b"}


def _color(norm: str, i: int = 0) -> str:
    return COLORS.get(norm, plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10])


def _label(norm: str) -> str:
    return {"none": "without BN", "batchnorm": "with BN"}.get(norm, norm)


_DATASET_NAMES = {"mnist1d": "MNIST-1D", "fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "digits": "digits (8x8)",
                  "idx": "your IDX files"}


def _dataset_name(name, path: str | None = None) -> str:
    """A dataset as a reader knows it: MNIST-1D, Fashion-MNIST, or the user's file name."""
    if name in ("npz", "csv", "imagefolder") and path:
        return Path(path).name
    return _DATASET_NAMES.get(str(name), str(name))


def _model_name(model: str) -> str:
    return model.rpartition(":")[2] if ":" in model else model


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    tmp.replace(path)


class _Figures:
    def __init__(self, out: Path):
        self.out = out
        self.files: list[str] = []

    def save(self, fig, name: str) -> dict:
        """Write ``fig`` as ``name.png`` (a safe file name derived from ``name``); return the image for the
        template: ``{"name", "b64"}``."""
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        png = buf.getvalue()
        fname = _safe_filename(name) + ".png"
        _write_atomic(self.out / fname, png)
        self.files.append(fname)
        return {"name": name, "b64": base64.b64encode(png).decode("ascii")}


def _safe_filename(name: str) -> str:
    """``name`` reduced to ``[A-Za-z0-9._-]`` (a stored experiment name never becomes a path)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "plot"
    return out[:120]


def _fmt(x, digits=3, pct=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _table(headers: list[str], rows: list[list], cls: str = "") -> dict:
    """A table for the template: every cell is plain text (escaped when rendered); a cell that is a list is
    shown as one line per item."""
    return {"headers": [str(h) for h in headers], "rows": [[c if isinstance(c, list) else str(c) for c in row]
                                                            for row in rows], "cls": cls}


# ------------------------------------------------------------------------------------------ sections

def _figure1_section(exp, runs, figs: _Figures) -> tuple[dict, dict]:
    series = figure1_series(runs)
    name = exp["name"]
    params = exp["params"]
    ds = _dataset_name(params.get("dataset"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for i, s in enumerate(series["runs"]):
        ax.plot(s["steps"], s["test_accuracy"], color=_color(s["norm"], i), label=_label(s["norm"]))
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"(a) test accuracy, paper-mlp on {ds}")
    ax.legend()
    ax.grid(alpha=0.3)
    axes[2].sharey(axes[1])  # (b) and (c) on one y range: the drift is compared at a glance
    for ax, norm, letter in ((axes[1], "none", "b"), (axes[2], "batchnorm", "c")):
        s = next((s for s in series["runs"] if s["norm"] == norm), None)
        if s is None:
            ax.set_visible(False)
            continue
        for k, style in (("p85", ":"), ("p50", "-"), ("p15", "--")):
            ax.plot(s["steps"], s["percentiles"][k], style, color=_color(norm), label=k)
        ax.set_title(f"({letter}) sigmoid input, {_label(norm)}")
        ax.set_xlabel("training step")
        ax.set_ylabel("input of a last-layer sigmoid\n(15th / 50th / 85th percentile)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    img = figs.save(fig, f"{name}")
    rows = []
    summary = []
    for s in series["runs"]:
        p = s["percentiles"]
        drift = (abs(p["p50"][-1] - p["p50"][0]) if p["p50"] and p["p50"][0] is not None else None)
        rows.append([_label(s["norm"]), _fmt(s["test_accuracy"][-1], pct=True), _fmt(drift)])
        summary.append({"norm": s["norm"], "final_test_accuracy": s["test_accuracy"][-1], "median_drift": drift})
    section = {"kind": "figure1", "name": name, "dataset": ds,
               "title": f"Figure 1 of Ioffe & Szegedy on {ds}: paper-mlp with and without BN, "
                        f"{params.get('steps')} steps",
               "findings": [{"text": f["text"], "cls": f["class"]} for f in figure1_findings(series)],
               "steps": str(params.get("steps")), "img": img,
               "table": _table(["", "final test accuracy", "|drift of median pre-activation|"], rows)}
    return section, {"figure1": summary}


def _compare_section(exp, runs, figs: _Figures) -> tuple[dict, dict]:
    p = exp["params"]
    tab = compare_table(runs, p.get("target", 0.5))
    name = exp["name"]
    regression = any(r["result"].get("task") == "regression" for r in runs)
    metric = "R²" if regression else "accuracy"
    ds = _dataset_name(p.get("dataset"))
    models = sorted({str(r["config"]["model"]) for r in runs})
    best = {(s["model"], s["norm"]): s for s in tab["summary"]}
    multi_lr = len({r["config"]["lr"] for r in runs}) > 1
    imgs = []
    for model in models:
        mr = [r for r in runs if r["config"]["model"] == model]
        fig, axes = plt.subplots(1, 2 if multi_lr else 1, figsize=(11 if multi_lr else 6.5, 3.8), squeeze=False)
        axes = axes[0]
        norms = sorted({r["config"]["norm"] for r in mr}, key=lambda n: (n != "none", n))
        n_seeds = 0
        for i, norm in enumerate(norms):
            nr = [r for r in mr if r["config"]["norm"] == norm]
            lrs = sorted({r["config"]["lr"] for r in nr})
            sel = best[(model, norm)]  # the learning rate and batch size chosen on validation
            br = [r for r in nr if r["config"]["lr"] == sel["best_lr"]
                  and r["config"]["batch_size"] == sel["best_batch_size"]]
            n_seeds = max(n_seeds, len(br))
            steps, acc = curves_mean(br, "test_acc")
            _, tr = curves_mean(br, "train_acc")
            color = _color(norm, i)
            axes[0].plot(steps, acc, color=color, label=f"{_label(norm)} test (lr {sel['best_lr']:g})")
            axes[0].plot(steps, tr, ":", color=color, label=f"{_label(norm)} train")
            if len(br) > 1:  # the band: lowest to highest seed
                k = len(steps)
                vals = np.array([[np.nan if v is None else v for v in r["curves"]["test_acc"][:k]] for r in br])
                axes[0].fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=color, alpha=0.18, lw=0)
            if multi_lr:
                def at(lr, nr=nr):
                    return [r["result"]["test_accuracy"] for r in nr if r["config"]["lr"] == lr]

                means = [np.mean(at(lr)) for lr in lrs]
                stds = [np.std(at(lr), ddof=1) if len(at(lr)) > 1 else 0.0 for lr in lrs]
                axes[1].errorbar(lrs, means, yerr=stds, marker="o", capsize=3, color=color, label=_label(norm))
        axes[0].set_xlabel("training step")
        axes[0].set_ylabel(metric)
        band = f"; band: min–max over {n_seeds} seeds" if n_seeds > 1 else ""
        axes[0].set_title(f"{model} on {ds}: {metric} during training\n(mean at the LR chosen on validation{band})",
                          fontsize=10)
        axes[0].legend(fontsize=8)
        axes[0].grid(alpha=0.3)
        if multi_lr:
            axes[1].set_xscale("log")
            axes[1].set_xlabel("learning rate")
            axes[1].set_ylabel(f"test {metric} (best val checkpoint)")
            axes[1].set_title(f"{model} on {ds}: learning-rate sweep\n(error bars: sd over {n_seeds} seeds)",
                              fontsize=10)
            axes[1].legend(fontsize=8)
            axes[1].grid(alpha=0.3)
        fig.tight_layout()
        imgs.append(figs.save(fig, f"{name}-{model}"))
    fmt = (lambda x: _fmt(x)) if regression else (lambda x: _fmt(x, pct=True))
    rows = [[r["model"], _label(r["norm"]), _fmt(r["lr"]), r["batch_size"], r["seeds"],
             f"{fmt(r['test_accuracy'])} ± {fmt(r['test_accuracy_std'])}",
             _fmt(r["steps_to_target"]) + (f" ({r['reached']}/{r['seeds']})" if r["reached"] < r["seeds"] else ""),
             f"{fmt(r['gap'])}", r["diverged"], _fmt(r["seconds"], 2)] for r in tab["rows"]]
    srows = [[s["model"], _label(s["norm"]), f"{_fmt(s['best_lr'])} / {s['best_batch_size']}"
              + (" (grid edge)" if s.get("best_lr_at_edge") else ""), fmt(s.get("best_val_accuracy")),
              f"{fmt(s['best_test_accuracy'])} ± {fmt(s['best_test_accuracy_std'])}"]
             + ([_fmt(s["max_stable_lr"])] if multi_lr else []) + [_fmt(s["steps_to_target"]), fmt(s["gap"])]
             for s in tab["summary"]]
    found = compare_findings(runs, tab)
    section = {
        "kind": "compare", "name": name, "dataset": ds, "models": ", ".join(models),
        "title": f"With and without BN: {', '.join(models)} on {ds}",
        "findings": [{"text": f["text"], "cls": f["class"]} for f in found],
        "lrs": str(p.get("lrs") or "of the recipe"), "seeds": str(p.get("seeds")),
        "target": fmt(tab["target"]), "imgs": imgs, "metric": metric,
        "table": _table(["model", "norm", "lr", "batch", "seeds", f"test {metric}", "steps to target",
                         "train−test gap", "diverged", "s/run (fastest seed)"], rows, "wide"),
        "summary": _table(["model", "norm", "best lr / batch (by validation)", f"val {metric}", f"test {metric}"]
                          + (["max stable lr"] if multi_lr else []) + ["steps to target", "gap at best lr"], srows,
                          "wide"),
    }
    from .export import curves_of

    return section, {"compare": tab, "findings": found, "curves": curves_of(runs)}


_VERDICT_CLASS = {"supported": "ok", "contradicted": "bad", "inconclusive": "mid", "depends": "mid"}
_VERDICT_COLOR = {"supported": "#2ca02c", "contradicted": "#d62728", "inconclusive": "#ff7f0e"}


def _claims_section(exp, store: Store, figs: _Figures) -> tuple[dict, dict]:
    p = exp["params"]
    data_ids = p.get("data_ids") or ({p["dataset"]: p["data_id"]} if p.get("data_id") else {})

    def get(cfg: RunConfig):
        """The stored run of a planned configuration, with the claims command's --limit/--data-dir and the
        identity of the data it was run on (recorded with the experiment)."""
        c = with_data(cfg, p.get("limit"), p.get("data_dir"))
        if data_ids.get(c.dataset):
            c = c.replace(data_id=data_ids[c.dataset])
        try:
            return store.get(config_hash(c))
        except Exception:  # an old store without data_id whose data is gone: the run cannot be found
            return None

    datasets = p.get("datasets") or [p.get("dataset", "mnist1d")]
    mode = p.get("mode", "quick")
    results = analyze_claims(get, mode, datasets, p.get("claims"), p.get("seeds"), subject=p.get("subject"))
    name = exp["name"]
    rows = []
    for r in results:
        rows.append({
            "claim": r["claim"], "quote": r["seed_quote"], "verdict": r["verdict"],
            "verdict_class": _VERDICT_CLASS.get(r["verdict"], "mid"), "condition": r["condition"],
            "effects": [f"{c['dataset']}, {c['condition']}: {interval_text(c)} (n={c['n_seeds']}, {c['verdict']})"
                        for c in r["conditions"]],
            "unit": f"{r['unit']}; claimed size ≥ {r['min_effect']:g}", "literature": r["literature"],
        })
    effects_img = None
    n = len(results)
    if n:
        fig, axes = plt.subplots(int(math.ceil(n / 2)), 2, figsize=(12, 0.5 + 0.32 * max(
            (len(r["conditions"]) for r in results), default=1) * math.ceil(n / 2) + 1.2 * math.ceil(n / 2)),
            squeeze=False)
        for ax, r in zip(axes.flat, results):
            for j, c in enumerate(r["conditions"]):
                ys = [e if not isinstance(e, list) else e[0] for e in c.get("effects", [])]
                ys = [e for e in ys if e is not None and math.isfinite(e)]
                ax.scatter(ys, [j] * len(ys), color="#555", s=10, zorder=3)
                if c["n_seeds"] and math.isfinite(c["effect"]):
                    col = _VERDICT_COLOR.get(c["verdict"], "#ff7f0e")
                    lo, hi = c["ci95"]
                    lo = lo if math.isfinite(lo) else min(ys + [c["effect"]])
                    hi = hi if math.isfinite(hi) else max(ys + [c["effect"]])
                    ax.plot([lo, hi], [j, j], color=col, lw=3, alpha=0.6)
                    ax.plot([c["effect"]], [j], "D", color=col)
            ax.axvline(0, color="k", lw=0.8)
            ax.axvline(r["min_effect"], color="k", lw=0.8, ls=":")
            ax.set_yticks(range(len(r["conditions"])))
            ax.set_yticklabels([f"{c['dataset']}: {c['condition'][:40]}" for c in r["conditions"]], fontsize=7)
            ax.set_title(f"{r['claim']} — {r['verdict']}", fontsize=9)
            ax.set_xlabel("effect (dots: seeds; bar: 95% bootstrap interval; dotted: claimed size)", fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        fig.tight_layout()
        effects_img = figs.save(fig, f"{name}-effects")
    details = []
    for r in results:
        drows = []
        for c in r["conditions"]:
            lr = ", ".join(f"{k} {v:g}" for k, v in (c.get("lr") or {}).items() if isinstance(v, float))
            how = (c.get("lr") or {}).get("selected_on", "")
            drows.append(f"{c['dataset']}, {c['condition']}: learning rates {lr or '–'} ({how}); "
                         f"p(effect ≤ 0) Holm {_fmt(c.get('p_for_holm'))}, p(effect ≥ claimed) Holm "
                         f"{_fmt(c.get('p_against_holm'))}; resampled: {c.get('resampled', '–')}")
            for d in c["details"]:
                drows.append(" · ".join([f"{c['dataset']}, {c['condition']}"] + [
                    f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in d.items()]))
        details.append({"claim": r["claim"], "verdict": r["verdict"], "evidence": r["evidence"], "rows": drows})
    findings = [{"text": f"{r['claim']}: {r['verdict']} — " + "; ".join(
                    f"{c['dataset']}, {c['condition']}: {interval_text(c)} (n={c['n_seeds']})"
                    for c in r["conditions"]),
                 "cls": _VERDICT_CLASS.get(r["verdict"], "mid")} for r in results]
    section = {"kind": "claims", "name": name, "mode": str(mode), "rows": rows, "effects_img": effects_img,
               "title": f"Claims about BN, measured ({mode} mode; {', '.join(_dataset_name(d) for d in datasets)})",
               "findings": findings,
               "plots": _claim_detail_plots(results, mode, datasets, get, figs, name), "details": details}
    from .commands import claims_payload

    return section, {"claims": claims_payload(results, mode, float("nan"))["claims"]}


def _claim_detail_plots(results, mode, datasets, get, figs, name) -> list[dict]:
    """Gradient norms per layer at init (claim 'gradients') and ICS over training (claim 'ics'), seed 0 of
    the first dataset; ``get(cfg)`` returns a stored run. Returns ``[{"title", "img"}]``."""
    from .claims import _select

    parts = []
    ds = datasets[0]
    keys = {r["key"] for r in results}
    if "gradients" in keys:
        claim = _select(["gradients"])[0]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        for ax, cond in zip(axes, claim.conditions(mode, ds)):
            for norm, cfgs in cond.arms.items():
                run = get(cfgs[0].replace(seed=0))
                if run and run["init"].get("grad_norms"):
                    ax.semilogy(run["init"]["grad_norms"], color=_color(norm), label=_label(norm))
            ax.set_xlabel("layer (input → output)")
            ax.set_ylabel("gradient norm at init")
            ax.set_title(f"{ds}: {cond.name}", fontsize=9)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        parts.append({"title": f"Gradient norm per layer at initialization ({ds}, seed 0)",
                      "img": figs.save(fig, f"{name}-gradients")})
    if "ics" in keys:
        claim = _select(["ics"])[0]
        cond = claim.conditions(mode, ds)[0]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for norm, cfgs in cond.arms.items():
            run = get(cfgs[0].replace(seed=0))
            if not run or not run["curves"].get("ics_step"):
                continue
            c = run["curves"]
            axes[0].plot(c["ics_step"], [np.nanmean(v[1:]) for v in c["ics_rel"]], color=_color(norm),
                         label=_label(norm))
            axes[1].plot(c["ics_step"], [np.nanmean(v[1:]) for v in c["ics_cos"]], color=_color(norm),
                         label=_label(norm))
            if c.get("beta"):
                axes[2].semilogy(c["smooth_step"], c["beta"], color=_color(norm), label=_label(norm))
        for ax, t, y in zip(axes, ("ICS (mean over layers 2..L)", "cos(G, G')", "effective β-smoothness"),
                            ("||G−G'|| / ||G||", "cosine", "β along the update")):
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel(y)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        parts.append({"title": f"Internal covariate shift and smoothness during training ({ds}, seed 0)",
                      "img": figs.save(fig, f"{name}-ics")})
    return parts


def _train_section(exps: list[tuple[dict, dict]], figs) -> tuple[dict, list[dict]]:
    """Every ``train`` run of the store in one section: their curves overlaid (colour by norm, as elsewhere)."""
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    texts, summ = [], []
    for i, (_exp, r) in enumerate(exps):
        c, cfg, res = r["curves"], r["config"], r["result"]
        regression = res.get("task") == "regression"
        color = _color(cfg["norm"], i) if len(exps) <= len(COLORS) else None
        label = f"{_model_name(cfg['model'])}/{_label(cfg['norm'])} lr {cfg['lr']:g}"
        ax[0].plot(c["step"], c["test_acc"], color=color, label=f"{label} test")
        ax[0].plot(c["step"], c["val_acc"], "--", color=color, lw=0.9, label=f"{label} val")
        ax[1].semilogy(c["step"][1:], [v if v and v > 0 else np.nan for v in c["train_loss"][1:]], color=color,
                       label=f"{label} train")
        ax[1].semilogy(c["step"], [v if v and v > 0 else np.nan for v in c["test_loss"]], ":", color=color,
                       label=f"{label} test")
        score = _fmt(res["test_accuracy"]) + " R²" if regression else _fmt(res["test_accuracy"], pct=True)
        texts.append(f"{_dataset_name(cfg['dataset'], cfg.get('data_dir'))} / {_model_name(cfg['model'])} / "
                     f"{_label(cfg['norm'])}, {cfg['optimizer']} lr {cfg['lr']:g}, batch {cfg['batch_size']}, "
                     f"{res['steps']} steps, seed {cfg['seed']}: test {score} at the best validation checkpoint"
                     f"{' (diverged)' if res['diverged'] else ''}.")
        from .export import curves_of

        summ.append({"train": {"hash": r["hash"], **res}, "curves": curves_of([r])})
    metric = "R² (regression)" if any(r["result"].get("task") == "regression" for _, r in exps) else "accuracy"
    ax[0].set_ylabel(metric)
    ax[0].set_title(f"{metric}: test (solid) and validation (dashed)", fontsize=10)
    ax[1].set_ylabel("loss")
    ax[1].set_title("loss: train (solid) and test (dotted)", fontsize=10)
    for a in ax:
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    img = figs.save(fig, "train-runs")
    section = {"kind": "train", "name": "train-runs", "img": img, "texts": texts,
               "title": f"Single runs ({len(exps)})", "findings": []}
    return section, summ


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1250px;color:#222;
padding:0 1em} h1{font-size:1.6em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em} th,td{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left} th{background:#f3f3f3} img{max-width:100%;display:block;margin:.5em 0}
.ok{color:#fff;background:#2ca02c;padding:.1em .4em;border-radius:.3em}
.bad{color:#fff;background:#d62728;padding:.1em .4em;border-radius:.3em}
.mid{color:#000;background:#ffbf47;padding:.1em .4em;border-radius:.3em}
.det{font-family:monospace;font-size:.8em} code{background:#f4f4f4;padding:0 .2em} .small{color:#666;font-size:.85em}
#findings{border:2px solid #1f77b4;border-radius:.5em;background:#f5f9fd;padding:.6em 1.2em;margin:1em 0}
#findings h2{margin-top:.3em;border:none} #findings h3{font-size:1em;margin:.7em 0 .2em}
#findings ul{margin:.2em 0;padding-left:1.2em} #findings li{margin:.25em 0}
.finding-ok{border-left:6px solid #2ca02c;padding-left:.5em;list-style:none}
.finding-bad{border-left:6px solid #d62728;padding-left:.5em;list-style:none}
.finding-mid{border-left:6px solid #ffbf47;padding-left:.5em;list-style:none}
.wrap{overflow-x:auto;max-width:100%} h2 .small{font-weight:normal}
@media (max-width:700px){body{margin:.5em auto;padding:0 .5em} table{font-size:.75em} th,td{padding:.2em .3em}
h1{font-size:1.3em} h2{font-size:1.15em}}
"""

# Autoescaped: every {{ value }} is HTML-escaped. Nothing is marked |safe.
_TEMPLATE = """<!DOCTYPE html>
{%- macro table(t) -%}
<div class="wrap"><table class="{{ t.cls }}">
<thead><tr>{% for h in t.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{%- for row in t.rows %}<tr>{% for c in row %}<td>
{%- if c is string %}{{ c }}{% else %}{% for line in c %}{{ line }}{% if not loop.last %}<br/>{% endif %}{% endfor %}
{%- endif %}</td>{% endfor %}</tr>{% endfor %}</tbody></table></div>
{%- endmacro -%}
{%- macro image(img) -%}<img alt="{{ img.name }}" src="data:image/png;base64,{{ img.b64 }}"/>{%- endmacro -%}
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ css }}</style></head><body>
<h1>{{ title }}</h1>
<p class="small">Generated {{ generated }} from {{ store_path }} ({{ runs }} stored runs).
Rebuild with <code>batchnorm report {{ out }}</code>.</p>
{%- if findings %}
<section id="findings"><h2>Findings</h2>
<p class="small">The effect of BN in each experiment: test accuracy at the best validation checkpoint, each arm at its
learning rate chosen on validation; 95% interval over seeds (and test examples); the same lines as the terminal
summary.</p>
{%- for s in findings %}
<h3><a href="#{{ s.anchor }}">{{ s.title }}</a></h3><ul>
{%- for f in s.findings %}<li class="finding-{{ f.cls }}">{{ f.text }}</li>{% endfor %}</ul>
{%- endfor %}
</section>
{%- endif %}
{% for s in sections %}
{%- if s.kind == "figure1" %}
<h2 id="{{ s.anchor }}">{{ s.title }} <span class="small">({{ s.name }})</span></h2>
<p>Ioffe &amp; Szegedy (2015) Figure 1 on <b>{{ s.dataset }}</b>: <code>paper-mlp</code> (3 hidden layers of 100
sigmoid units, SGD, batch 60), {{ s.steps }} steps. (b, c) show the 15th, 50th and 85th percentiles over the test
set of the input of one sigmoid of the last hidden layer.</p>
{{ image(s.img) }}{{ table(s.table) }}
{%- elif s.kind == "compare" %}
<h2 id="{{ s.anchor }}">{{ s.title }} <span class="small">({{ s.name }})</span></h2>
<p>dataset <b>{{ s.dataset }}</b>, models {{ s.models }}, learning rates {{ s.lrs }}, seeds {{ s.seeds }}; target
validation {{ s.metric }} {{ s.target }}. Test {{ s.metric }} at the best validation checkpoint; mean ± standard
deviation over seeds.</p>
{% for img in s.imgs %}{{ image(img) }}{% endfor %}
{{ table(s.table) }}
<h3>Per norm: the learning rate chosen on validation</h3>
{{ table(s.summary) }}
{%- elif s.kind == "claims" %}
<h2 id="{{ s.anchor }}">{{ s.title }} <span class="small">({{ s.name }})</span></h2>
<p>Each claim of the seed articles is tested under one or more conditions, over several seeds. The effect is
positive when the claim holds; a condition is <i>supported</i> when the mean effect reaches the minimum effect and
is positive for every seed (or its 95% interval excludes 0).</p>
<div class="wrap"><table class="claims"><thead><tr><th>claim (seed articles)</th><th>verdict</th>
<th>effect per condition: mean ± sd</th><th>effect unit</th><th>literature</th></tr></thead><tbody>
{%- for r in s.rows %}
<tr><td><b>{{ r.claim }}</b><br/><i>“{{ r.quote }}”</i></td>
<td><span class="{{ r.verdict_class }}">{{ r.verdict }}</span>{% if r.condition %}<br/>{{ r.condition }}{% endif %}</td>
<td>{% for e in r.effects %}{{ e }}{% if not loop.last %}<br/>{% endif %}{% endfor %}</td>
<td>{{ r.unit }}</td><td>{{ r.literature }}</td></tr>
{%- endfor %}
</tbody></table></div>
{%- if s.effects_img %}
<h3>Effects per seed (dots), mean (diamond) and 95% interval; dotted line: minimum effect</h3>
{{ image(s.effects_img) }}
{%- endif %}
{%- for plot in s.plots %}<h3>{{ plot.title }}</h3>{{ image(plot.img) }}{% endfor %}
{%- for d in s.details %}
<h3>{{ d.claim }}: {{ d.verdict }}</h3><p>{{ d.evidence }}</p>
{%- if d.rows %}<details><summary>per-seed details</summary>
{%- for row in d.rows %}<div class="det">{{ row }}</div>{% endfor %}</details>{% endif %}
{%- endfor %}
{%- elif s.kind == "train" %}
<h2 id="{{ s.anchor }}">{{ s.title }}</h2>{{ image(s.img) }}
<ul>{% for t in s.texts %}<li>{{ t }}</li>{% endfor %}</ul>
{%- endif %}
{% else %}
<p>No experiments stored yet.</p>
{% endfor %}
<h2>Environment</h2>
{{ table(env) }}
</body></html>
"""

_ENV = Environment(autoescape=True, trim_blocks=False, lstrip_blocks=False)


def render_html(context: dict) -> str:
    """The report page from its context (``title``, ``sections``, ``env``...), every value escaped."""
    return _ENV.from_string(_TEMPLATE).render(css=_CSS, **context)


def build_report(store: Store, out_dir: str | Path, title: str = "batchnorm lab report") -> Path:
    """Write ``report.html``, the PNGs and ``summary.json`` into ``out_dir``; return the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out)
    sections = []
    summary: dict = {"generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "experiments": []}
    kinds_order = {"figure1": 0, "compare": 1, "claims": 2, "train": 3}
    trains: list[tuple[dict, dict]] = []
    for exp in sorted(store.experiments(), key=lambda e: (kinds_order.get(e["kind"], 9), e["created"])):
        runs = [r for r in (store.get(h) for h in exp["hashes"]) if r is not None]
        if exp["kind"] != "claims" and not runs:
            continue
        if exp["kind"] == "figure1":
            sec, summ = _figure1_section(exp, runs, figs)
        elif exp["kind"] == "compare":
            sec, summ = _compare_section(exp, runs, figs)
        elif exp["kind"] == "claims":
            sec, summ = _claims_section(exp, store, figs)
        else:  # single runs: one section with their curves overlaid, after the loop
            trains.append((exp, runs[0]))
            continue
        sections.append(sec)
        summary["experiments"].append({"name": exp["name"], "kind": exp["kind"], "params": exp["params"],
                                       "runs": len(runs), **summ})
    if trains:
        sec, summs = _train_section(trains, figs)
        sections.append(sec)
        for (exp, _), summ in zip(trains, summs):
            summary["experiments"].append({"name": exp["name"], "kind": exp["kind"], "params": exp["params"],
                                           "runs": 1, **summ})
    for i, sec in enumerate(sections):
        sec["anchor"] = f"s{i + 1}"
    summary["findings"] = [{"section": sec["title"], "lines": [f["text"] for f in sec["findings"]]}
                           for sec in sections if sec["findings"]]
    env = environment()
    summary["environment"] = env
    summary["runs_in_store"] = store.count()
    doc = render_html({
        "title": title, "generated": summary["generated"], "store_path": str(store.path), "runs": store.count(),
        "out": str(out), "sections": sections, "findings": [sec for sec in sections if sec["findings"]],
        "env": _table(["", ""], [[str(k), str(v)] for k, v in env.items()]),
    })
    path = out / "report.html"
    _write_atomic(path, doc.encode("utf-8"))
    summary["pngs"] = figs.files
    text = json.dumps(clean_json(summary), indent=1, default=_json_default)
    _write_atomic(out / "summary.json", text.encode("utf-8"))
    return path


def clean_json(o):
    """Replace non-finite floats by None, recursively (JSON has no NaN)."""
    if isinstance(o, float | np.floating):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: clean_json(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [clean_json(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, float | np.floating):
        return float(o) if math.isfinite(o) else None
    return str(o)
