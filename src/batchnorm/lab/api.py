"""``batchnorm.lab.compare``: your model with and without BN on your data, from Python (and notebooks).

    >>> from batchnorm.lab import compare
    >>> res = compare(build, "data.npz", lrs=[1e-3, 1e-2], seeds=[0, 1, 2], steps=1000)
    >>> res.table()            # one dict per run: norm, lr, seed, test_accuracy, val_accuracy, ...
    >>> res.to_csv("runs.csv"); res.plot(); res.report("bn-report")

The same store and resume as ``batchnorm compare``: runs are keyed by their configuration, the content of the
data and the identity of the model factory (its name and the SHA-256 of its source file), kept in
``OUT/lab.sqlite``; calling again trains only what is missing.
"""

from __future__ import annotations

import csv
import hashlib
import html
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CompareResult", "compare"]

_METRICS = ("test_accuracy", "val_accuracy", "train_accuracy", "train_loss", "test_loss", "best_step", "steps",
            "diverged", "seconds")


def _array(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _data_fields(data, out: Path, task: str, label: str | None) -> tuple[dict, str]:
    """RunConfig fields for ``data`` and a short name for it. Arrays are written once into ``OUT/data/`` as
    an ``.npz`` named by their content (worker processes read it; the run key holds their digest)."""
    from .byo import dataset_kind
    from .data import DATASETS

    if isinstance(data, str | os.PathLike):
        if str(data) in DATASETS:
            if task != "classification":
                raise ValueError(f"task {task!r} needs your own data; the built-in datasets are classification")
            return {"dataset": str(data)}, str(data)
        kind = dataset_kind(data)
        if kind is None or not Path(data).exists():
            raise FileNotFoundError(f"no dataset at {data}: give a .npz or .csv file, an ImageFolder directory, a "
                                    f"dict of arrays, a tuple (x_train, y_train, x_test, y_test) or one of "
                                    f"{', '.join(DATASETS)}")
        return ({"dataset": kind, "data_dir": str(Path(data).resolve()), "task": task,
                 "data_kw": {"label": label} if label else {}}, Path(data).stem)
    if isinstance(data, dict):
        arrays = {k: _array(v) for k, v in data.items()}
    elif isinstance(data, tuple | list) and len(data) in (2, 4, 6):
        keys = {2: ("x_train", "y_train"), 4: ("x_train", "y_train", "x_test", "y_test"),
                6: ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}[len(data)]
        arrays = dict(zip(keys, (_array(a) for a in data)))
    else:
        raise TypeError("data must be a path, a dict with x_train, y_train (optionally x_val, y_val, x_test, "
                        "y_test) or a tuple (x_train, y_train, x_test, y_test) of arrays or tensors")
    unknown = sorted(set(arrays) - {"x_train", "y_train", "x_val", "y_val", "x_test", "y_test"})
    if unknown:
        raise ValueError(f"unknown data key(s) {', '.join(unknown)}; use x_train, y_train, x_val, y_val, x_test, "
                         "y_test")
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    path = out / "data" / f"arrays-{h.hexdigest()[:16]}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part.npz")
        # numpy's stub matches **kwds against allow_pickle too; the keys were checked above
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
    return {"dataset": "npz", "data_dir": str(path.resolve()), "task": task, "data_kw": {}}, "arrays"


class CompareResult:
    """The runs of :func:`compare` and what to do with them."""

    def __init__(self, runs: list[dict], summary: dict, out: Path, store_path: Path, experiment: str):
        self.runs = runs
        self.summary = summary  # analysis.compare_table: "rows" per (norm, lr, batch), "summary" per norm
        self.out = out
        self.store_path = store_path
        self.experiment = experiment

    @property
    def task(self) -> str:
        return self.runs[0]["config"].get("task", "classification") if self.runs else "classification"

    def table(self) -> list[dict]:
        """One row per run: ``model, norm, lr, batch_size, seed`` and the metrics (regression: ``test_r2`` and
        ``test_mse``; the ``*_accuracy`` fields then hold R²). Test numbers are at the best validation
        checkpoint."""
        rows = []
        for r in self.runs:
            c, res = r["config"], r["result"]
            row: dict[str, Any] = {"model": c["model"], "norm": c["norm"], "lr": c["lr"],
                                   "batch_size": c["batch_size"], "seed": c["seed"]}
            row.update({k: res.get(k) for k in _METRICS})
            if res.get("task") == "regression":
                row.update(test_r2=res.get("test_r2"), test_mse=res.get("test_mse"))
            row["hash"] = r["hash"]
            rows.append(row)
        return rows

    def best(self) -> list[dict]:
        """Per norm: the learning rate with the best mean validation score and its test score (mean, sd)."""
        return self.summary["summary"]

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`table` as CSV; returns the path."""
        rows = self.table()
        path = Path(path)
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["norm", "lr", "seed"])
            w.writeheader()
            w.writerows(rows)
        return path

    def plot(self):
        """A matplotlib figure: validation score during training per norm at its best learning rate (mean over
        seeds, the band is the min-max over seeds) and, when several learning rates were tried, the test score
        against the learning rate (mean ± sd over seeds)."""
        import matplotlib.pyplot as plt

        from .report import _color, _label

        metric = "R²" if self.task == "regression" else "accuracy"
        lrs_tried = sorted({r["config"]["lr"] for r in self.runs})
        ncols = 2 if len(lrs_tried) > 1 else 1
        fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.6), squeeze=False)
        ax = axes[0][0]
        for i, s in enumerate(self.summary["summary"]):
            norm = s["norm"]
            rs = [r for r in self.runs if r["config"]["norm"] == norm and r["config"]["lr"] == s["best_lr"]
                  and r["config"]["batch_size"] == s["best_batch_size"]]
            n = min(len(r["curves"]["step"]) for r in rs)
            steps = rs[0]["curves"]["step"][:n]
            vals = np.array([[np.nan if v is None else v for v in r["curves"]["val_acc"][:n]] for r in rs], float)
            color = _color(norm, i)
            ax.plot(steps, np.nanmean(vals, 0), color=color,
                    label=f"{_label(norm)} (lr {s['best_lr']:g}, {len(rs)} seeds)")
            if len(rs) > 1:
                ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=color, alpha=0.2, lw=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"validation {metric} (band: min-max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if ncols == 2:
            ax = axes[0][1]
            for i, norm in enumerate(dict.fromkeys(r["config"]["norm"] for r in self.runs)):
                rows = [x for x in self.summary["rows"] if x["norm"] == norm]
                ax.errorbar([x["lr"] for x in rows], [x["test_accuracy"] for x in rows],
                            yerr=[x["test_accuracy_std"] for x in rows], marker="o", capsize=3,
                            color=_color(norm, i), label=_label(norm))
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(f"test {metric} (best val checkpoint)")
            ax.set_title(f"test {metric} vs learning rate (error bars: sd over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def report(self, out_dir: str | os.PathLike | None = None) -> Path:
        """Build the HTML report (every experiment of the store, this one included); returns its path."""
        from .report import build_report
        from .store import Store

        with Store(self.store_path) as store:
            return build_report(store, Path(out_dir) if out_dir is not None else self.out)

    def _repr_html_(self) -> str:
        metric = "R²" if self.task == "regression" else "accuracy"

        def fmt(x, pct=True):
            if x is None or (isinstance(x, float) and not math.isfinite(x)):
                return "–"
            return f"{100 * x:.1f}%" if pct and self.task != "regression" else f"{x:.3f}"

        head = ["norm", "best lr (validation)", f"val {metric}", f"test {metric} (mean ± sd)"]
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                s["norm"], f"{s['best_lr']:g}", fmt(s["best_val_accuracy"]),
                f"{fmt(s['best_test_accuracy'])} ± {fmt(s['best_test_accuracy_std'])}")) + "</tr>"
            for s in self.summary["summary"])
        return (f"<p>{len(self.runs)} runs, store <code>{html.escape(str(self.store_path))}</code></p>"
                "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                + f"</tr></thead><tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        best = ", ".join(f"{s['norm']}: lr {s['best_lr']:g} -> {s['best_test_accuracy']:.4g}"
                         for s in self.summary["summary"])
        return f"CompareResult({len(self.runs)} runs; {best})"


def compare(model_fn: Callable | str, data, norms: Sequence[str] = ("none", "batchnorm"),
            lrs: Sequence[float] | None = None, seeds: Sequence[int] = (0, 1, 2), steps: int | None = None, *,
            task: str = "classification", label: str | None = None, batch_size: int | None = None,
            optimizer: str | None = None, eval_every: int | None = None, target: float | None = None,
            out: str | os.PathLike = "bn-report", store: str | os.PathLike | None = None,
            workers: int | None = 1, limit: int | None = None, on_done: Callable | None = None) -> CompareResult:
    """Train ``model_fn`` with each norm of ``norms`` at each learning rate and seed; return the runs.

    ``model_fn``: a factory (a function or ``"module:function"``) returning a ``torch.nn.Module``; called as
    ``model_fn(norm=NAME)`` when it accepts ``norm`` (and with ``input_shape``/``num_classes``/``num_outputs``
    when it accepts those), else BN is inserted by :func:`batchnorm.insert`. ``data``: a path (``.npz``,
    ``.csv`` with ``label``, an ImageFolder directory, or a built-in dataset name), a dict with the ``.npz`` keys,
    or a tuple ``(x_train, y_train, x_test, y_test)`` of arrays or tensors. Options left ``None`` take the
    defaults of a user's model (Adam, lr 1e-3, batch 64, 1000 steps). ``workers``: processes (``None``: one per
    idle CPU); a factory defined in ``__main__`` or a notebook trains in this process.
    """
    from .analysis import compare_table
    from .byo import factory_is_portable, register_factory
    from .commands import compare_configs
    from .store import experiment_name
    from .sweep import auto_workers, open_store, run_sweep
    from .train import config_hash, resolve_data, with_data

    name = model_fn if isinstance(model_fn, str) else register_factory(model_fn)
    if not seeds:
        raise ValueError("seeds is empty; give one or more seeds")
    outp = Path(out)
    fields, data_name = _data_fields(data, outp, task, label)
    cfgs = compare_configs(fields["dataset"], [name], list(dict.fromkeys(norms)),
                           list(dict.fromkeys(lrs)) if lrs else None, list(dict.fromkeys(seeds)), steps, optimizer,
                           batch_size, eval_every, data=fields)
    cfgs = [resolve_data(with_data(c, limit)) for c in cfgs]  # data and model identities, checked before any run
    portable = factory_is_portable(name)
    with open_store(outp, str(store) if store is not None else None, check=True) as st:
        todo = len({config_hash(c) for c in cfgs if not st.has(config_hash(c))})
        n = 1 if not portable else (workers if workers is not None else auto_workers(todo))
        runs = run_sweep(cfgs, st, workers=max(1, n), on_done=on_done)
        tgt = target if target is not None else 0.8
        tab = compare_table(runs, tgt)
        params = {"dataset": data_name, "models": [name], "norms": list(dict.fromkeys(norms)),
                  "lrs": list(dict.fromkeys(lrs)) if lrs else None, "batch_sizes": None,
                  "seeds": list(dict.fromkeys(seeds)), "target": tgt, "steps": steps, "optimizer": optimizer,
                  "batch_size": batch_size, "eval_every": eval_every, "limit": limit,
                  "data_id": runs[0]["config"]["data_id"], "task": task,
                  "model_ids": sorted({r["config"].get("model_id") or "" for r in runs})}
        exp = experiment_name("compare", f"{name.rpartition(':')[2]}-{data_name}", params)
        st.put_experiment(exp, "compare", params, [r["hash"] for r in runs])
        store_path = Path(st.path)
    return CompareResult(runs, tab, outp, store_path, exp)
