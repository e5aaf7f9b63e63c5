"""The report: one self-contained HTML file (PNG plots embedded as base64), the PNG files, and a JSON
summary, rebuilt at any time from the store (``batchnorm report DIR``)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .analysis import compare_table, curves_mean, figure1_series  # noqa: E402
from .claims import analyze_claims  # noqa: E402
from .store import Store, environment  # noqa: E402
from .train import RunConfig, config_hash, with_data  # noqa: E402

__all__ = ["build_report"]

COLORS = {"none": "#d62728", "batchnorm": "#1f77b4", "ghost": "#2ca02c", "renorm": "#9467bd", "frozen": "#8c564b"}


def _color(norm: str, i: int = 0) -> str:
    return COLORS.get(norm, plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10])


def _label(norm: str) -> str:
    return {"none": "without BN", "batchnorm": "with BN"}.get(norm, norm)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    tmp.replace(path)


class _Figures:
    def __init__(self, out: Path):
        self.out = out
        self.files: list[str] = []

    def save(self, fig, name: str) -> str:
        """Write ``fig`` as ``name.png`` and return it as an embedded ``<img>``."""
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        png = buf.getvalue()
        _write_atomic(self.out / f"{name}.png", png)
        self.files.append(f"{name}.png")
        b64 = base64.b64encode(png).decode()
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{b64}"/>'


def _fmt(x, digits=3, pct=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


# ------------------------------------------------------------------------------------------ sections

def _figure1_section(exp, runs, figs: _Figures) -> tuple[str, dict]:
    series = figure1_series(runs)
    name = exp["name"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for i, s in enumerate(series["runs"]):
        ax.plot(s["steps"], s["test_accuracy"], color=_color(s["norm"], i), label=_label(s["norm"]))
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title("(a) test accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    for ax, norm, letter in ((axes[1], "none", "b"), (axes[2], "batchnorm", "c")):
        s = next((s for s in series["runs"] if s["norm"] == norm), None)
        if s is None:
            ax.set_visible(False)
            continue
        for k, style in (("p85", ":"), ("p50", "-"), ("p15", "--")):
            ax.plot(s["steps"], s["percentiles"][k], style, color=_color(norm), label=k)
        ax.set_title(f"({letter}) unit pre-activation, {_label(norm)}")
        ax.set_xlabel("training step")
        ax.legend()
        ax.grid(alpha=0.3)
    img = figs.save(fig, f"{name}")
    rows = []
    summary = []
    for s in series["runs"]:
        p = s["percentiles"]
        drift = (abs(p["p50"][-1] - p["p50"][0]) if p["p50"] and p["p50"][0] is not None else None)
        rows.append([_label(s["norm"]), _fmt(s["test_accuracy"][-1], pct=True), _fmt(drift)])
        summary.append({"norm": s["norm"], "final_test_accuracy": s["test_accuracy"][-1], "median_drift": drift})
    params = exp["params"]
    text = (
        f"<p>Ioffe &amp; Szegedy (2015) Figure 1 on <b>{html.escape(str(params.get('dataset')))}</b>: "
        f"<code>paper-mlp</code> (3 hidden layers of 100 sigmoid units, SGD, batch 60), "
        f"{params.get('steps')} steps. (b, c) show the 15th, 50th and 85th percentiles over the test set "
        "of the input of one sigmoid of the last hidden layer.</p>"
    )
    tbl = _table(["", "final test accuracy", "|drift of median pre-activation|"], rows)
    return f"<h2>Figure 1 ({html.escape(name)})</h2>{text}{img}{tbl}", {"figure1": summary}


def _compare_section(exp, runs, figs: _Figures) -> tuple[str, dict]:
    p = exp["params"]
    tab = compare_table(runs, p.get("target", 0.5))
    name = exp["name"]
    models = sorted({r["config"]["model"] for r in runs})
    out = [f"<h2>Compare with and without BN ({html.escape(name)})</h2>",
           f"<p>dataset <b>{html.escape(str(p.get('dataset')))}</b>, models {', '.join(models)}, "
           f"learning rates {p.get('lrs') or 'of the recipe'}, seeds {p.get('seeds')}; target validation accuracy "
           f"{_fmt(tab['target'], pct=True)}. Mean ± standard deviation over seeds.</p>"]
    for model in models:
        mr = [r for r in runs if r["config"]["model"] == model]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        norms = sorted({r["config"]["norm"] for r in mr}, key=lambda n: (n != "none", n))
        for i, norm in enumerate(norms):
            nr = [r for r in mr if r["config"]["norm"] == norm]
            lrs = sorted({r["config"]["lr"] for r in nr})
            def mean_acc(lr, nr=nr):
                return np.mean([r["result"]["test_accuracy"] for r in nr if r["config"]["lr"] == lr])

            best = max(lrs, key=mean_acc)
            br = [r for r in nr if r["config"]["lr"] == best]
            steps, acc = curves_mean(br, "test_acc")
            _, tr = curves_mean(br, "train_acc")
            axes[0].plot(steps, acc, color=_color(norm, i), label=f"{_label(norm)} test (lr {best:g})")
            axes[0].plot(steps, tr, ":", color=_color(norm, i), label=f"{_label(norm)} train")
            means = [np.mean([r["result"]["test_accuracy"] for r in nr if r["config"]["lr"] == lr]) for lr in lrs]
            stds = [np.std([r["result"]["test_accuracy"] for r in nr if r["config"]["lr"] == lr]) for lr in lrs]
            axes[1].errorbar(lrs, means, yerr=stds, marker="o", capsize=3, color=_color(norm, i), label=_label(norm))
        axes[0].set_xlabel("training step")
        axes[0].set_ylabel("accuracy")
        axes[0].set_title(f"{model}: accuracy during training (best LR)")
        axes[0].legend(fontsize=8)
        axes[0].grid(alpha=0.3)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("learning rate")
        axes[1].set_ylabel("final test accuracy")
        axes[1].set_title(f"{model}: learning-rate sweep")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
        out.append(figs.save(fig, f"{name}-{model}"))
    rows = [[r["model"], _label(r["norm"]), _fmt(r["lr"]), r["batch_size"], r["seeds"],
             f"{_fmt(r['test_accuracy'], pct=True)} ± {_fmt(r['test_accuracy_std'], pct=True)}",
             _fmt(r["steps_to_target"]) + (f" ({r['reached']}/{r['seeds']})" if r["reached"] < r["seeds"] else ""),
             f"{_fmt(r['gap'], pct=True)}", r["diverged"], _fmt(r["seconds"], 2)] for r in tab["rows"]]
    out.append(_table(["model", "norm", "lr", "batch", "seeds", "test accuracy", "steps to target", "train−test gap",
                       "diverged", "s/run"], rows))
    srows = [[s["model"], _label(s["norm"]), f"{_fmt(s['best_lr'])} / {s['best_batch_size']}",
              f"{_fmt(s['best_test_accuracy'], pct=True)} ± {_fmt(s['best_test_accuracy_std'], pct=True)}",
              _fmt(s["max_stable_lr"]), _fmt(s["steps_to_target"]), _fmt(s["gap"], pct=True)] for s in tab["summary"]]
    out.append("<h3>Per norm</h3>")
    out.append(_table(["model", "norm", "best lr / batch", "best test accuracy", "max stable lr", "steps to target",
                       "gap at best lr"], srows))
    return "".join(out), {"compare": tab}


_VERDICT_CLASS = {"supported": "ok", "not supported": "bad", "depends": "mid"}


def _claims_section(exp, store: Store, figs: _Figures) -> tuple[str, dict]:
    p = exp["params"]

    def get(cfg: RunConfig):
        """The stored run of a planned configuration, with the claims command's --limit/--data-dir."""
        return store.get(config_hash(with_data(cfg, p.get("limit"), p.get("data_dir"))))

    results = analyze_claims(get, p.get("mode", "quick"), p.get("dataset", "mnist1d"), p.get("claims"), p.get("seeds"))
    name = exp["name"]
    rows = []
    for r in results:
        cls = _VERDICT_CLASS[r["verdict"]]
        effects = "<br/>".join(
            f"{html.escape(c['condition'])}: {_fmt(c['mean'])} ± {_fmt(c['std'])} (n={c['n']}, {c['verdict']})"
            for c in r["conditions"])
        rows.append([f"<b>{html.escape(r['claim'])}</b><br/><i>“{html.escape(r['seed_quote'])}”</i>",
                     f'<span class="{cls}">{r["verdict"]}</span>'
                     + (f"<br/>{html.escape(r['condition'])}" if r["condition"] else ""),
                     effects, html.escape(r["unit"]), html.escape(r["literature"])])
    out = [f"<h2>Claims ({html.escape(name)}, {html.escape(str(p.get('mode')))})</h2>",
           "<p>Each claim of the seed articles is tested under one or more conditions, over several seeds. "
           "The effect is positive when the claim holds; a condition is <i>supported</i> when the mean effect "
           "reaches the minimum effect and is positive for every seed (or its 95% interval excludes 0).</p>",
           _table(["claim (seed articles)", "verdict", "effect per condition: mean ± sd", "effect unit",
                   "literature"], rows, "claims")]
    # one plot with every condition's per-seed effects
    n = len(results)
    if n:
        fig, axes = plt.subplots(int(math.ceil(n / 2)), 2, figsize=(12, 2.2 * math.ceil(n / 2)), squeeze=False)
        for ax, r in zip(axes.flat, results):
            for j, c in enumerate(r["conditions"]):
                ys = [e for e in c["effects"] if e is not None and math.isfinite(e)]
                ax.scatter(ys, [j] * len(ys), color="#555", s=14, zorder=3)
                if c["n"]:
                    col = {"supported": "#2ca02c", "contradicted": "#d62728"}.get(c["verdict"], "#ff7f0e")
                    lo = c["ci_low"] if math.isfinite(c["ci_low"]) else c["mean"]
                    hi = c["ci_high"] if math.isfinite(c["ci_high"]) else c["mean"]
                    ax.plot([lo, hi], [j, j], color=col, lw=3, alpha=0.6)
                    ax.plot([c["mean"]], [j], "D", color=col)
            ax.axvline(0, color="k", lw=0.8)
            ax.axvline(r["min_effect"], color="k", lw=0.8, ls=":")
            ax.set_yticks(range(len(r["conditions"])))
            ax.set_yticklabels([c["condition"][:34] for c in r["conditions"]], fontsize=7)
            ax.set_title(f"{r['claim']} — {r['verdict']}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        out.append("<h3>Effects per seed (dots), mean (diamond) and 95% interval; dotted line: minimum effect</h3>")
        out.append(figs.save(fig, f"{name}-effects"))
    out.append(_claim_detail_plots(results, p, get, figs, name))
    for r in results:
        out.append(f"<h3>{html.escape(r['claim'])}: {r['verdict']}</h3><p>{html.escape(r['evidence'])}</p>")
        drows = []
        for c in r["conditions"]:
            for d in c["details"]:
                cells = [html.escape(f"{k}={_fmt(v) if isinstance(v, float) else v}") for k, v in d.items()]
                drows.append([html.escape(c["condition"])] + cells)
        if drows:
            out.append("<details><summary>per-seed details</summary>"
                       + "".join(f"<div class='det'>{' · '.join(row)}</div>" for row in drows) + "</details>")
    summary = [{k: r[k] for k in ("key", "claim", "verdict", "condition", "unit", "evidence")}
               | {"conditions": [{k: c[k] for k in ("condition", "mean", "std", "ci_low", "ci_high", "n", "verdict",
                                                      "effects")} for c in r["conditions"]]} for r in results]
    return "".join(out), {"claims": summary}


def _claim_detail_plots(results, p, get, figs, name) -> str:
    """Gradient norms per layer at init (claim 'gradients') and ICS over training (claim 'ics');
    ``get(cfg)`` returns a stored run."""
    from .claims import _select

    parts = []
    mode, ds = p.get("mode", "quick"), p.get("dataset", "mnist1d")
    keys = {r["key"] for r in results}
    if "gradients" in keys:
        claim = _select(["gradients"])[0]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        for ax, cond in zip(axes, claim.conditions(mode, ds)):
            for norm, cfgs in cond.arms(0).items():
                run = get(cfgs[0])
                if run and run["init"].get("grad_norms"):
                    ax.semilogy(run["init"]["grad_norms"], color=_color(norm), label=_label(norm))
            ax.set_xlabel("layer (input → output)")
            ax.set_ylabel("gradient norm at init")
            ax.set_title(cond.name, fontsize=9)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        parts.append("<h3>Gradient norm per layer at initialization (seed 0)</h3>"
                     + figs.save(fig, f"{name}-gradients"))
    if "ics" in keys:
        claim = _select(["ics"])[0]
        cond = claim.conditions(mode, ds)[0]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for norm, cfgs in cond.arms(0).items():
            run = get(cfgs[0])
            if not run or not run["curves"].get("ics_step"):
                continue
            c = run["curves"]
            axes[0].plot(c["ics_step"], [np.nanmean(v) for v in c["ics_rel"]], color=_color(norm), label=_label(norm))
            axes[1].plot(c["ics_step"], [np.nanmean(v) for v in c["ics_cos"]], color=_color(norm), label=_label(norm))
            if c.get("beta"):
                axes[2].semilogy(c["smooth_step"], c["beta"], color=_color(norm), label=_label(norm))
        for ax, t in zip(axes, ("ICS ||G−G'||/||G|| (mean over layers)", "cos(G, G')", "effective β-smoothness")):
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("training step")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        parts.append("<h3>Internal covariate shift and smoothness during training (seed 0)</h3>"
                     + figs.save(fig, f"{name}-ics"))
    return "".join(parts)


def _train_section(exp, runs, figs) -> tuple[str, dict]:
    r = runs[0]
    c = r["curves"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
    ax[0].plot(c["step"], c["test_acc"], label="test")
    ax[0].plot(c["step"], c["train_acc"], ":", label="train")
    ax[0].plot(c["step"], c["val_acc"], "--", label="val")
    ax[0].set_title("accuracy")
    ax[0].legend()
    ax[1].semilogy(c["step"][1:], [v if v and v > 0 else np.nan for v in c["train_loss"][1:]], label="train loss")
    ax[1].semilogy(c["step"], c["test_loss"], label="test loss")
    ax[1].legend()
    ax[1].set_title("loss")
    for a in ax:
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
    img = figs.save(fig, exp["name"])
    cfg = r["config"]
    res = r["result"]
    text = (f"<h2>Run {html.escape(exp['name'])}</h2><p>{html.escape(cfg['dataset'])} / {html.escape(cfg['model'])} / "
            f"norm {html.escape(cfg['norm'])}, {cfg['optimizer']} lr {cfg['lr']}, batch {cfg['batch_size']}, "
            f"{res['steps']} steps, seed {cfg['seed']}: test accuracy {_fmt(res['test_accuracy'], pct=True)}"
            f"{' (diverged)' if res['diverged'] else ''}.</p>")
    return text + img, {"train": {"hash": r["hash"], **res}}


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1250px;color:#222;
padding:0 1em} h1{font-size:1.6em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em} th,td{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left} th{background:#f3f3f3} img{max-width:100%;display:block;margin:.5em 0}
.ok{color:#fff;background:#2ca02c;padding:.1em .4em;border-radius:.3em}
.bad{color:#fff;background:#d62728;padding:.1em .4em;border-radius:.3em}
.mid{color:#000;background:#ffbf47;padding:.1em .4em;border-radius:.3em}
.det{font-family:monospace;font-size:.8em} code{background:#f4f4f4;padding:0 .2em} .small{color:#666;font-size:.85em}
"""


def build_report(store: Store, out_dir: str | Path, title: str = "batchnorm lab report") -> Path:
    """Write ``report.html``, the PNGs and ``summary.json`` into ``out_dir``; return the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out)
    sections = []
    summary: dict = {"generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "experiments": []}
    kinds_order = {"figure1": 0, "compare": 1, "claims": 2, "train": 3}
    for exp in sorted(store.experiments(), key=lambda e: (kinds_order.get(e["kind"], 9), e["created"])):
        runs = [store.get(h) for h in exp["hashes"]]
        runs = [r for r in runs if r is not None]
        if exp["kind"] != "claims" and not runs:
            continue
        if exp["kind"] == "figure1":
            sec, summ = _figure1_section(exp, runs, figs)
        elif exp["kind"] == "compare":
            sec, summ = _compare_section(exp, runs, figs)
        elif exp["kind"] == "claims":
            sec, summ = _claims_section(exp, store, figs)
        else:
            sec, summ = _train_section(exp, runs, figs)
        sections.append(sec)
        summary["experiments"].append({"name": exp["name"], "kind": exp["kind"], "params": exp["params"],
                                       "runs": len(runs), **summ})
    env = environment()
    summary["environment"] = env
    summary["runs_in_store"] = store.count()
    envrows = [[html.escape(k), html.escape(str(v))] for k, v in env.items()]
    doc = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='small'>Generated {summary['generated']} from {html.escape(str(store.path))} "
        f"({store.count()} stored runs). Rebuild with <code>batchnorm report {html.escape(str(out))}</code>.</p>"
        + ("".join(sections) or "<p>No experiments stored yet.</p>")
        + "<h2>Environment</h2>" + _table(["", ""], envrows) + "</body></html>"
    )
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
