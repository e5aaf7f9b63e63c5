"""Results out: every run's curves as plain records (for ``--json`` and ``summary.json``), ``--csv DIR``
(one CSV per table of a command, plus ``curves.csv``: one row per run and evaluation) and ``--tensorboard DIR``
(each run's curves as TensorBoard scalars)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["curves_of", "run_label", "write_csv", "write_tensorboard"]

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


def run_label(rec: dict) -> str:
    """A run's directory name under ``--tensorboard DIR``: what differs between runs, then the run's hash
    (two runs never share a directory), characters other than letters, digits and ``-._`` as ``_``:
    ``mlp-batchnorm-mnist1d-lr0.001-bs60-seed0-1a2b3c4d``, ``mypkg.models_build-none-npz-...``."""
    parts = [rec.get("model"), rec.get("norm"), rec.get("dataset"), f"lr{rec.get('lr'):g}" if rec.get("lr") else None,
             f"bs{rec['batch_size']}" if rec.get("batch_size") else None, f"seed{rec.get('seed')}",
             str(rec["hash"])[:8]]
    text = "-".join(str(p) for p in parts if p not in (None, ""))
    return "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in text)


def write_tensorboard(out_dir: str | Path, runs: list[dict]) -> list[Path]:
    """``out_dir/<run_label>/`` with one TensorBoard event file per run: every curve (``val_acc``, ``test_acc``,
    ``train_loss``, ...; ``*_acc`` in [0, 1], R² for regression) as a scalar over training steps, plus
    ``seconds`` (wall time at each evaluation). A run logged before is logged again into a fresh file, so the
    directory holds what the last command printed. Returns the run directories."""
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (optional extra)

    out = Path(out_dir)
    paths = []
    for rec in curves_of(runs):
        path = out / run_label(rec)
        path.mkdir(parents=True, exist_ok=True)
        for old in path.glob("events.out.tfevents.*"):
            old.unlink()
        writer = SummaryWriter(log_dir=str(path))
        try:
            for key in CURVE_KEYS[1:]:
                for step, value in zip(rec["step"], rec[key], strict=False):
                    if value is not None and math.isfinite(value):
                        writer.add_scalar(key, value, int(step))
        finally:
            writer.close()
        paths.append(path)
    return paths
