"""Results out: every run's curves as plain records (for ``--json`` and ``summary.json``) and ``--csv DIR``
(one CSV per table of a command, plus ``curves.csv``: one row per run and evaluation)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["curves_of", "write_csv"]

CURVE_KEYS = ("step", "train_loss", "train_acc", "val_acc", "val_loss", "test_acc", "test_loss", "seconds")
RUN_KEYS = ("model", "norm", "dataset", "lr", "batch_size", "optimizer", "seed", "task")


def curves_of(runs: list[dict]) -> list[dict]:
    """One record per run: its identity (hash, model, norm, lr, batch size, seed, ...) and its curves (lists over
    the evaluations; for regression the ``*_acc`` curves hold R²)."""
    out = []
    for r in runs:
        c = r["config"]
        rec = {"hash": r["hash"], **{k: c.get(k) for k in RUN_KEYS}}
        rec.update({k: list(r["curves"].get(k, [])) for k in CURVE_KEYS})
        out.append(rec)
    return out


def _cell(v):
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, default=str)
    return "" if v is None else v


def write_csv(out_dir: str | Path, tables: dict[str, list[dict]], runs: list[dict] | None = None) -> list[Path]:
    """``out_dir/<table>.csv`` for each table (columns: the union of the rows' keys, in order of appearance)
    and ``out_dir/curves.csv`` for the runs' curves; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in tables.items():
        cols: dict[str, None] = {}
        for row in rows:
            cols.update(dict.fromkeys(row))
        path = out / f"{name}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(cols))
            for row in rows:
                w.writerow([_cell(row.get(k)) for k in cols])
        paths.append(path)
    if runs:
        path = out / "curves.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["hash", *RUN_KEYS, *CURVE_KEYS])
            for rec in curves_of(runs):
                for i in range(len(rec["step"])):
                    w.writerow([rec["hash"], *(_cell(rec[k]) for k in RUN_KEYS),
                                *(_cell(rec[k][i]) if i < len(rec[k]) else "" for k in CURVE_KEYS)])
        paths.append(path)
    return paths
