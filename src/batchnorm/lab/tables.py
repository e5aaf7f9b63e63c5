"""The lab's terminal tables: readable at 80 columns and when piped (light borders, numbers never wrapped)."""

from __future__ import annotations

import math

from rich import box
from rich.markup import escape
from rich.table import Table

from .claims import interval_text

__all__ = ["claims_table", "compare_tables", "new_table", "pct", "print_findings", "score_fmt"]


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"


def new_table(title: str, columns: list[str], wrap: tuple[str, ...] = ()) -> Table:
    """A table that stays readable at 80 columns and when piped: light borders, no padding at the edges, and
    columns that never wrap or truncate a number (only the ``wrap`` columns wrap)."""
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for col in columns:
        t.add_column(col, no_wrap=col not in wrap, overflow="fold" if col in wrap else "ellipsis")
    return t


def score_fmt(task: str):
    """Accuracy as a percentage; a regression's R² as a number."""
    if task == "regression":
        return lambda x: "–" if x is None or not math.isfinite(x) else f"{x:.3f}"
    return lambda x: "–" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def compare_tables(console, tab, task: str = "classification") -> None:
    fmt = score_fmt(task)
    metric = "R²" if task == "regression" else "acc %"
    models = sorted({r["model"] for r in tab["rows"]})
    many = len(models) > 1
    title = (f"with vs without BN{'' if many else ': ' + models[0]} (test {metric} at the best validation "
             f"checkpoint, mean ± sd over seeds; target: val {metric} {fmt(tab['target'])})")
    cols = (["model"] if many else []) + ["norm", "lr", "batch", f"test {metric}", "to target", "gap",
                                          "div", "s/run"]
    t = new_table(escape(title), cols)
    for r in tab["rows"]:
        t.add_row(*([escape(r["model"])] if many else []), escape(r["norm"]), f"{r['lr']:g}", str(r["batch_size"]),
                  f"{fmt(r['test_accuracy'])} ± {fmt(r['test_accuracy_std'])}",
                  "–" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f} ({r['reached']}/{r['seeds']})",
                  fmt(r["gap"]), f"{r['diverged']}/{r['seeds']}", f"{r['seconds']:.1f}")
    console.print(t)
    console.print(f"to target: steps to the target validation {metric} (seeds that reached it); gap: train − test; "
                  "div: diverged runs; s/run: the fastest seed's seconds (a first run pays one-time warm-up)",
                  style="dim")
    multi_lr = len({r["lr"] for r in tab["rows"]}) > 1
    cols = (["model"] if many else []) + ["norm", "best lr / batch", f"val {metric}", f"test {metric}"]
    if multi_lr:
        cols.append("max stable lr")
    s = new_table("per norm: the lr / batch with the best validation score, and its test score", cols)
    edge = []
    for r in tab["summary"]:
        row = ([escape(r["model"])] if many else []) + [
            escape(r["norm"]),
            f"{r['best_lr']:g} / {r['best_batch_size']}" + (" (edge)" if r["best_lr_at_edge"] else ""),
            fmt(r["best_val_accuracy"]), f"{fmt(r['best_test_accuracy'])} ± {fmt(r['best_test_accuracy_std'])}"]
        if multi_lr:
            row.append("–" if r["max_stable_lr"] is None else f"{r['max_stable_lr']:g}")
        s.add_row(*row)
        if r["best_lr_at_edge"]:
            edge.append(f"{r['model']}/{r['norm']}")
    console.print(s)
    if edge:
        console.print(f"[yellow]the best learning rate of {escape(', '.join(edge))} is at the edge of --lrs: extend "
                      "the grid to know whether a better one lies beyond it[/yellow]")


def print_findings(console, found: list[dict]) -> None:
    """The findings lines (the same as the report's findings box)."""
    style = {"ok": "green", "bad": "red", "mid": "yellow"}
    for f in found:
        console.print(f"[bold]finding[/bold] [{style.get(f['class'], 'yellow')}]{escape(f['text'])}[/]")


def claims_table(console, results) -> None:
    t = new_table("claims of the seed articles, measured (effect, 95% bootstrap interval, Holm-corrected verdict)",
               ["claim", "verdict", "effect per condition [95% CI]"], wrap=("claim", "effect per condition [95% CI]"))
    t.show_lines = True
    style = {"supported": "green", "contradicted": "red", "inconclusive": "yellow", "depends": "cyan"}
    for r in results:
        eff = "\n".join(f"{c['dataset']}, {c['condition']}: {interval_text(c)} ({c['verdict']})"
                        for c in r["conditions"])
        v = f"[{style[r['verdict']]}]{r['verdict']}[/]"
        t.add_row(escape(f"{r['claim']}\n({r['unit']}; claimed size ≥ {r['min_effect']:g})"), v, escape(eff))
    console.print(t)
