"""``batchnorm`` sub-commands of the lab: train, compare, figure1, claims, demo, report.

Their options are declared (and checked) in :mod:`batchnorm_cli`, which parses a command line without
importing torch; :func:`batchnorm.cli.run` calls the ``cmd_*`` functions here with the parsed arguments."""

from __future__ import annotations

import argparse
import json
import sqlite3
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from ..cli import CommandError, UsageError
from .data import DATASETS, DataError, DataUnavailable
from .tables import claims_table, compare_tables, new_table, pct, print_findings, score_fmt

__all__ = ["cmd_claims", "cmd_compare", "cmd_demo", "cmd_figure1", "cmd_report", "cmd_train", "compare_configs",
           "figure1_configs"]

DEFAULT_OUT = "bn-report"
MAX_SEED = 2**32 - 1


def _console(args) -> Console:
    # progress and tables on stderr when --json, so stdout ends with the JSON line only
    return Console(stderr=bool(getattr(args, "json", False)))


# ------------------------------------------------------------------------------------------ helpers


def _store(args, check: bool = False):
    from .store import Store
    from .sweep import open_store

    if getattr(args, "plan", False) and not Path(_store_path(args)).exists():
        return Store(":memory:")  # a plan changes nothing: no store file is created
    return open_store(args.out, args.store, check=check)


class _PlanShown(Exception):
    """``--plan``: the runs still to train were shown; the command stops before training any."""

    def __init__(self, payload: dict) -> None:
        super().__init__("plan shown")
        self.payload = payload


def _makespan(costs: list[float], workers: int) -> float:
    """Wall time of ``costs`` started longest first on ``workers`` (each run to the least loaded worker)."""
    loads = [0.0] * max(1, workers)
    for c in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += c
    return max(loads)


def _show_plan(console: Console, title: str, configs: list, new: dict, cost, workers: int) -> dict:
    """What ``--plan`` prints: the runs still to train by data set and model, with their estimated time."""
    groups: dict[tuple[str, str], list[float]] = {}
    for c in new.values():
        groups.setdefault((c.dataset, c.model), []).append(cost(c))
    stored = len(configs) - len(new)
    table = new_table(f"{title}: {len(new)} runs to train" + (f" ({stored} more are stored)" if stored else ""),
                      ["dataset", "model", "runs", "CPU time"])
    rows: list[dict] = []
    for (ds, model), secs in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        table.add_row(ds, model, str(len(secs)), _duration(sum(secs)))
        rows.append({"dataset": ds, "model": model, "runs": len(secs), "cpu_seconds": sum(secs)})
    cpu = sum(sum(v) for v in groups.values())
    wall = _makespan([x for v in groups.values() for x in v], workers)
    console.print(table)
    console.print(f"about {_duration(cpu)} of CPU time: {_duration(wall)} on {workers} worker(s), longest first "
                  "(each run's time from the stored runs most like it). Nothing was trained.")
    return {"plan": {"title": title, "runs": len(configs), "to_train": len(new), "stored": stored,
                     "cpu_seconds": cpu, "wall_seconds": wall, "workers": workers, "groups": rows}}


def _workers(args, n_todo: int) -> int:
    from .sweep import auto_workers

    if args.workers is not None:
        return max(1, args.workers)
    return auto_workers(n_todo)


def _check_dataset(args, dataset: str) -> None:
    if dataset == "idx" and not args.data_dir:
        raise UsageError("--dataset idx (your own IDX files) needs --data-dir DIR")


def _resolved(args, configs):
    """The configurations with the command line's --limit/--data-dir and the identity of their data (the data
    is found and checked here, before anything is trained or stored)."""
    from .train import resolve_data, with_data

    for ds in {c.dataset for c in configs}:
        _check_dataset(args, ds)
    return [resolve_data(with_data(c, args.limit, args.data_dir)) for c in configs]


def _data_id(args, dataset: str) -> str:
    from .data import data_identity

    _check_dataset(args, dataset)
    return data_identity(dataset, args.data_dir)


def _data_fields(args) -> dict:
    """RunConfig fields for ``--dataset`` (a built-in name, or the user's file with --task/--label)."""
    task = getattr(args, "task", "classification")
    label = getattr(args, "label", None)
    if args.dataset in DATASETS:
        if task != "classification":
            raise UsageError(f"--task {task} needs your own data (--dataset data.npz or data.csv); the built-in "
                             "datasets are classification")
        if label is not None:
            raise UsageError("--label names the label column of a .csv dataset; give --dataset data.csv")
        return {"dataset": args.dataset}
    from .byo import dataset_kind

    kind = dataset_kind(args.dataset)
    if args.data_dir:
        raise UsageError(f"--data-dir is for the built-in IDX datasets; your data is --dataset {args.dataset} alone")
    if label is not None and kind != "csv":
        raise UsageError(f"--label names the label column of a .csv dataset; {args.dataset} is {kind} data")
    return {"dataset": kind, "data_dir": str(Path(args.dataset).resolve()), "task": task,
            "data_kw": {"label": label} if label else {}}


def _dataset_label(args) -> str:
    return args.dataset if args.dataset in DATASETS else Path(args.dataset).stem or "data"


def _model_label(model: str) -> str:
    return model.rpartition(":")[2].replace(".", "-") if ":" in model else model


#: Seconds between two progress lines when the output is not a terminal.
PLAIN_PROGRESS_EVERY = 10.0
#: Seconds without a finished run after which a plain progress line says the sweep is still running.
PLAIN_HEARTBEAT = 60.0


class _PlainProgress:
    """Progress as plain lines where the console is not a terminal (a log file, a pipe, CI): rich
    draws its bar only on a terminal, so a run of hours would otherwise print nothing until it ends.
    One line per finished run, at most one every :data:`PLAIN_PROGRESS_EVERY` seconds, and the last;
    between :meth:`start` and :meth:`stop`, a line every :data:`PLAIN_HEARTBEAT` seconds in which no
    run finished (sweeps start with their longest runs, ~10 minutes each in ``claims --full``)."""

    def __init__(self, console: Console, title: str, total: int, cost: float) -> None:
        self.console, self.title, self.total, self.cost = console, title, total, cost
        self.count, self.done_cost, self.start_time, self.last = 0, 0.0, time.monotonic(), float("-inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def done(self, info: str, cost: float) -> None:
        """A run finished; ``cost``: its estimated seconds (:class:`~batchnorm.lab.sweep.CostModel`;
        0 for a run reused from the store)."""
        with self._lock:
            self.count += 1
            self.done_cost += cost
            now = time.monotonic()
            if self.console.is_terminal or (now - self.last < PLAIN_PROGRESS_EVERY and self.count < self.total):
                return
            self._line(now, f"last {info}")

    def _line(self, now: float, tail: str) -> None:
        self.last = now
        # the time left at the pace so far per unit of estimated cost: sweeps start with their longest
        # runs, so a count of runs would overestimate it several times over at first
        left = max(0.0, self.cost - self.done_cost)
        eta = (f", eta {_duration((now - self.start_time) * left / self.done_cost)}"
               if self.count < self.total and self.done_cost > 0 else "")
        self.console.print(f"{self.title}: {self.count}/{self.total} runs, {_duration(now - self.start_time)}{eta}; "
                           f"{tail}", markup=False, highlight=False, soft_wrap=True)

    def start(self) -> None:
        """Say every :data:`PLAIN_HEARTBEAT` seconds without a line that the sweep still runs (plain output only)."""
        if self.console.is_terminal:
            return
        self.last = time.monotonic()
        threading.Thread(target=self._beat, daemon=True, name="batchnorm-progress").start()

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(min(PLAIN_HEARTBEAT, 5.0)):
            with self._lock:
                now = time.monotonic()
                if now - self.last >= PLAIN_HEARTBEAT and self.count < self.total:
                    self._line(now, "running")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _run(args, configs, console: Console, title: str) -> list[dict]:
    """Sweep with a rich progress bar."""
    from .sweep import CostModel, executor_options, run_sweep
    from .train import config_hash

    opts = executor_options(args)  # a missing Ray is refused before the store or the data is touched
    configs = _resolved(args, configs)
    store = _store(args, check=True)
    try:
        new = {h: c for c in configs if not store.has(h := config_hash(c))}  # each key computed once
        todo = len(new)
        workers = _workers(args, todo)
        cost = CostModel.of(store)  # seconds per run, from the stored runs most like it
        if getattr(args, "plan", False):
            raise _PlanShown(_show_plan(console, title, configs, new, cost, workers))
        # at most ~76 columns (readable on an 80-column terminal): the run's label and info are cut, not the counts
        fixed = Column(no_wrap=True)
        cols = [TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, max_width=22)),
                BarColumn(bar_width=10), MofNCompleteColumn(table_column=fixed), TextColumn("eta", table_column=fixed),
                TimeRemainingColumn(table_column=fixed),
                TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, max_width=24))]
        with Progress(*cols, console=console, transient=False) as prog:
            total = prog.add_task(title, total=len(configs), info=f"{todo} to train, {workers} worker(s)")
            step_task = prog.add_task("  current run", total=1, info="",
                                      visible=workers == 1 and todo > 0 and opts["executor"] == "local")

            lines = _PlainProgress(console, title, len(configs), sum(map(cost, new.values())))

            def on_done(cfg, result, reused):
                prog.advance(total)
                tag = "reused" if reused else f"{result['seconds']:.1f}s"
                info = f"{cfg.model}/{cfg.norm} seed {cfg.seed}: {100 * result['test_accuracy']:.1f}% ({tag})"
                prog.update(total, info=escape(info))
                lines.done(info, 0.0 if reused else cost(cfg))

            def on_step(cfg, step, steps, last):
                prog.update(step_task, total=max(1, steps), completed=step,
                            description=escape(f"  {cfg.model}/{cfg.norm} lr {cfg.lr:g} seed {cfg.seed}"),
                            info=f"test {100 * last['test_acc']:.1f}%")

            lines.start()
            try:
                runs = run_sweep(configs, store, workers=workers, on_done=on_done, on_step=on_step, cost=cost,
                                 **opts)
            finally:
                lines.stop()
    finally:
        store.close()
    return runs


def _finish(args, console, payload: dict, rebuild: bool = True, runs: list[dict] | None = None,
            tables: dict[str, list[dict]] | None = None, curves_in_json: bool = True) -> int:
    """Report, ``--csv DIR`` (the command's tables and its runs' curves), ``--tensorboard DIR`` (the runs' curves)
    and the ``--json`` line (with the runs' curves unless ``curves_in_json`` is false)."""
    if runs is not None and curves_in_json:
        from .export import curves_of

        payload["curves"] = curves_of(runs)
    if getattr(args, "csv", None):
        from .export import write_csv

        paths = write_csv(args.csv, tables or {}, runs)
        payload["csv"] = [str(p) for p in paths]
        console.print(f"csv: [bold]{escape(', '.join(p.name for p in paths))}[/bold] in {escape(str(args.csv))}")
    if getattr(args, "tensorboard", None):
        from .export import write_tensorboard

        logged = write_tensorboard(args.tensorboard, runs or [])
        payload["tensorboard"] = str(args.tensorboard)
        console.print(f"tensorboard: {len(logged)} run(s) in [bold]{escape(str(args.tensorboard))}[/bold] "
                      f"(tensorboard --logdir {escape(str(args.tensorboard))})")
    if rebuild and not getattr(args, "no_report", False):
        from .report import build_report

        store = _store(args)
        try:
            path = build_report(store, args.out)
        finally:
            store.close()
        payload["report"] = str(path)
        console.print(f"report: [bold]{path}[/bold]")
    if args.json:
        from .report import clean_json

        print(json.dumps(clean_json(payload)), flush=True)
    return 0


def _store_path(args) -> str:
    if getattr(args, "store", None):
        return str(args.store)
    out: str | None = getattr(args, "out", None)  # lab commands name the folder --out, `report` names it DIR
    folder: str = getattr(args, "dir", DEFAULT_OUT)
    return str(Path(out or folder) / "lab.sqlite")


def _guard(fn):
    """Turn the lab's known failures into one-line errors with their exit code (see ``batchnorm.cli``)."""

    def wrapper(args):
        from .store import StoreError
        from .sweep import SweepError

        try:
            if hasattr(args, "executor"):  # a missing Ray is refused before any data, store or file is touched
                from .sweep import executor_options

                executor_options(args)
            return fn(args)
        except _PlanShown as shown:
            if getattr(args, "json", False):
                from .report import clean_json

                print(json.dumps(clean_json(shown.payload)), flush=True)
            return 0
        except (DataUnavailable, DataError, StoreError) as exc:
            raise CommandError(str(exc)) from None
        except SweepError as exc:
            raise CommandError(str(exc), code=3) from None
        except sqlite3.DatabaseError as exc:  # the store went bad after it was opened
            raise CommandError(f"the lab store {_store_path(args)} failed ({exc}): it is corrupt or was changed "
                               "by another program; move it aside and run again, or choose another "
                               "--out/--store") from None
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise CommandError(f"cannot access{where}: {exc.strerror or exc}") from None

    wrapper.__name__ = fn.__name__
    return wrapper


# ------------------------------------------------------------------------------------------ commands


@_guard
def cmd_train(args) -> int:
    from .store import experiment_name
    from .sweep import open_store
    from .train import RunConfig, config_hash

    console = _console(args)
    model_kw = {k: v for k, v in (("depth", args.depth), ("width", args.width)) if v is not None}
    if args.skipinit:
        model_kw["skipinit"] = True
    norm_kw = {"virtual_batch_size": args.virtual_batch_size} if args.virtual_batch_size else {}
    cfg = RunConfig(model=args.model, optimizer=args.optimizer, lr=args.lr,
                    batch_size=args.batch_size, steps=args.steps, seed=args.seed, eval_every=args.eval_every,
                    probes=tuple(args.probes)).replace(norm=args.norm, model_kw=model_kw, norm_kw=norm_kw,
                                                       **_data_fields(args))
    t0 = time.perf_counter()
    h = config_hash(_resolved(args, [cfg])[0])
    with open_store(args.out, args.store, check=True) as store:
        reused = store.has(h)
    args.workers = 1
    run = _run(args, [cfg], console, "train")[0]
    res = run["result"]
    fmt = score_fmt(cfg.task)
    metric = "R²" if cfg.task == "regression" else "acc %"
    table = new_table(escape(f"{_dataset_label(args)} / {cfg.model} / {cfg.norm}"),
                   [f"test {metric}", f"val {metric}", f"train {metric}", "train loss", "steps", "diverged", "s"])
    table.add_row(fmt(res["test_accuracy"]), fmt(res["val_accuracy"]), fmt(res["train_accuracy"]),
                  f"{res['train_loss']:.4f}" if res["train_loss"] is not None else "–", str(res["steps"]),
                  str(res["diverged"]), f"{res['seconds']:.1f}")
    console.print(table)
    with open_store(args.out, args.store) as store:
        store.put_experiment(experiment_name("train", h[:8], {"hash": h}), "train", {"config": run["config"]}, [h])
    payload = {
        "test_accuracy": res["test_accuracy"], "train_loss": res["train_loss"], "steps": res["steps"],
        "diverged": res["diverged"], "seconds": res["seconds"], "val_accuracy": res["val_accuracy"],
        "train_accuracy": res["train_accuracy"], "hash": h, "reused": reused,
        "wall_seconds": time.perf_counter() - t0, "config": run["config"],
    }
    if res.get("task") == "regression":  # the accuracy fields hold R²
        payload.update(task="regression", test_r2=res["test_r2"], test_mse=res["test_mse"])
    return _finish(args, console, payload, rebuild=False, runs=[run],
                   tables={"run": [{k: v for k, v in payload.items() if k != "config"}]})


def compare_configs(dataset, models, norms, lrs, seeds, steps=None, optimizer=None, batch_size=None,
                    eval_every=None, probes=(), batch_sizes=None, data: dict | None = None):
    """The runs of a comparison; ``data`` holds RunConfig fields of a user's dataset (``dataset``,
    ``data_dir``, ``task``, ``data_kw``) and replaces ``dataset`` when given."""
    from .train import RunConfig

    data = data or {"dataset": dataset}
    cfgs = []
    for model in models:
        from .models import recipe

        for norm in norms:
            for lr in lrs or [recipe(model).lr]:
                for bs in batch_sizes or [batch_size or recipe(model).batch_size]:
                    for seed in seeds:
                        cfgs.append(RunConfig(model=model, lr=lr, seed=seed, steps=steps,
                                              optimizer=optimizer, batch_size=bs, eval_every=eval_every,
                                              probes=tuple(probes)).replace(norm=norm, **data))
    return cfgs


def _default_target(dataset: str, models: list[str]) -> float:
    return 0.5 if dataset == "mnist1d" and "cnn" not in models else 0.8


@_guard
def cmd_compare(args) -> int:
    from .analysis import compare_table
    from .store import experiment_name
    from .sweep import open_store

    console = _console(args)
    models = list(dict.fromkeys(args.model))
    norms = list(dict.fromkeys(args.norms))
    lrs = list(dict.fromkeys(args.lrs)) if args.lrs else None
    seeds = list(dict.fromkeys(args.seeds))
    batch_sizes = list(dict.fromkeys(args.batch_sizes)) if args.batch_sizes else None
    data = _data_fields(args)
    cfgs = compare_configs(args.dataset, models, norms, lrs, seeds, args.steps, args.optimizer, args.batch_size,
                           args.eval_every, batch_sizes=batch_sizes, data=data)
    runs = _run(args, cfgs, console, "compare")
    target = args.target if args.target is not None else _default_target(args.dataset, models)
    tab = compare_table(runs, target)
    compare_tables(console, tab, data.get("task", "classification"))
    from .findings import compare_findings

    found = compare_findings(runs, tab)
    print_findings(console, found)
    params = {"dataset": args.dataset, "models": models, "norms": norms, "lrs": lrs, "batch_sizes": batch_sizes,
              "seeds": seeds, "target": target, "steps": args.steps, "optimizer": args.optimizer,
              "batch_size": args.batch_size, "eval_every": args.eval_every, "limit": args.limit,
              "data_id": runs[0]["config"]["data_id"] if runs else None}
    if args.dataset not in DATASETS:  # your own data and models: their identities and the task
        params.update(task=data["task"], data_kw=data["data_kw"],
                      model_ids=sorted({r["config"].get("model_id") for r in runs if r["config"].get("model_id")}))
    name = experiment_name("compare", "-".join(map(_model_label, models)) + f"-{_dataset_label(args)}", params)
    with open_store(args.out, args.store) as store:
        store.put_experiment(name, "compare", params, [r["hash"] for r in runs])
    return _finish(args, console, {"rows": tab["rows"], "summary": tab["summary"], "target": target,
                                   "findings": found}, runs=runs,
                   tables={"rows": tab["rows"], "summary": tab["summary"], "findings": found})


def figure1_configs(dataset, steps, seed, lr=None, eval_every=None):
    from .train import RunConfig

    return [RunConfig(dataset=dataset, model="paper-mlp", steps=steps, seed=seed, lr=lr,
                      eval_every=eval_every or max(1, steps // 50), probes=("percentiles",)).replace(norm=n)
            for n in ("none", "batchnorm")]


@_guard
def cmd_figure1(args) -> int:
    from .analysis import figure1_series
    from .sweep import open_store

    console = _console(args)
    cfgs = figure1_configs(args.dataset, args.steps, args.seed, args.lr, args.eval_every)
    runs = _run(args, cfgs, console, "figure1")
    series = figure1_series(runs)
    t = new_table(f"Figure 1 on {args.dataset} (paper-mlp, {args.steps} steps)",
               ["", "final test acc", "p15 / p50 / p85 at start", "p15 / p50 / p85 at end"])
    for s in series["runs"]:
        p = s["percentiles"]
        t.add_row(s["norm"], pct(s["test_accuracy"][-1]),
                  " / ".join(f"{p[k][0]:.2f}" for k in ("p15", "p50", "p85")),
                  " / ".join(f"{p[k][-1]:.2f}" for k in ("p15", "p50", "p85")))
    console.print(t)
    from .store import experiment_name

    params = {"dataset": args.dataset, "steps": args.steps, "seed": args.seed, "lr": args.lr,
              "eval_every": args.eval_every, "limit": args.limit, "data_id": _data_id(args, args.dataset)}
    with open_store(args.out, args.store) as store:
        store.put_experiment(experiment_name("figure1", args.dataset, params), "figure1", params,
                             [r["hash"] for r in runs])
    return _finish(args, console, series, runs=runs, curves_in_json=False,
                   tables={"figure1": [{"norm": s["norm"], "final_test_accuracy": s["test_accuracy"][-1],
                                        **{f"{k}_start": s["percentiles"][k][0] for k in ("p15", "p50", "p85")},
                                        **{f"{k}_end": s["percentiles"][k][-1] for k in ("p15", "p50", "p85")}}
                                       for s in series["runs"]]})


_CONDITION_KEYS = ("condition", "dataset", "effect", "ci95", "n_seeds", "min_effect", "verdict", "lr", "effects",
                   "censored", "p_for", "p_against", "p_for_holm", "p_against_holm", "resampled", "details")


def claims_payload(results: list[dict], mode: str, seconds: float) -> dict:
    """The ``claims --json`` object (see docs/lab.md)."""
    return {"claims": [{k: r[k] for k in ("key", "claim", "verdict", "condition", "unit", "min_effect", "datasets",
                                          "literature", "evidence")}
                       | {"conditions": [{k: c[k] for k in _CONDITION_KEYS if k in c} for c in r["conditions"]]}
                       for r in results],
            "mode": mode, "seconds": seconds}


def _claims_subject(args, datasets: list[str], only: list[str] | None) -> dict | None:
    """``claims`` on your model (``--model module:function``) or your data (a dataset path): the RunConfig
    fields that replace the reference MLP and its data (plus a ``label``), or None for the lab's own claims."""
    from .claims import PORTABLE_CLAIMS

    model = getattr(args, "model", None)
    own_data = any(d not in DATASETS for d in datasets)
    if model is None and not own_data:
        if getattr(args, "label", None) is not None:
            raise UsageError("--label names the label column of a .csv dataset; give --dataset data.csv")
        return None
    if len(datasets) != 1:
        raise UsageError("claims on your model or data take one --dataset")
    bad = [k for k in (only or []) if k not in PORTABLE_CLAIMS]
    if bad:
        raise UsageError(f"claim(s) {', '.join(bad)} need the lab's own models; on your model or data choose "
                         f"--only from {', '.join(PORTABLE_CLAIMS)}")
    ns = argparse.Namespace(dataset=datasets[0], task="classification", label=getattr(args, "label", None),
                            data_dir=args.data_dir)
    fields = _data_fields(ns)
    return {"model": model or "mlp", **fields, "label": _dataset_label(ns)}


@_guard
def cmd_claims(args) -> int:
    from .claims import analyze_claims, plan_claims
    from .store import experiment_name
    from .sweep import open_store
    from .train import config_hash, with_data

    console = _console(args)
    only = list(dict.fromkeys(args.only)) if args.only else None
    datasets = list(dict.fromkeys(args.dataset))
    t0 = time.perf_counter()
    subject = _claims_subject(args, datasets, only)
    if subject is not None:  # your model and/or data: the portable claims, on them
        from .train import RunConfig, resolve_data

        fields = {k: v for k, v in subject.items() if k != "label"}
        data_ids = {fields["dataset"]: resolve_data(RunConfig(**fields)).data_id}
        datasets = [subject["label"]]
        from .claims import PORTABLE_CLAIMS

        only = only or list(PORTABLE_CLAIMS)
    else:
        data_ids = {ds: _data_id(args, ds) for ds in datasets}  # finds and checks every dataset before any run
    hashes: set[str] = set()

    def key(c):
        return config_hash(with_data(c, args.limit, args.data_dir).replace(data_id=data_ids[c.dataset]))

    # tuning runs first, then the runs at each arm's selected learning rate (one round per step of the grid)
    for rnd in range(1, 20):
        with _store(args) as store:
            need = plan_claims(args.mode, datasets, only, lambda c: store.get(key(c)), subject=subject)
        if not need:
            if getattr(args, "plan", False):
                raise _PlanShown(_show_plan(console, f"claims ({args.mode})", [], {}, None, 1))
            break
        runs = _run(args, need, console, f"claims ({args.mode}), round {rnd}")
        hashes.update(r["hash"] for r in runs)
    with open_store(args.out, args.store) as store:
        cache: dict[str, dict | None] = {}

        def get(c):
            h = key(c)
            if h not in cache:
                cache[h] = store.get(h)
                if cache[h] is not None:
                    hashes.add(h)
            return cache[h]

        results = analyze_claims(get, args.mode, datasets, only, subject=subject)
        params = {"mode": args.mode, "datasets": datasets, "claims": only, "limit": args.limit,
                  "data_dir": args.data_dir, "data_ids": data_ids}
        if subject is not None:
            params["subject"] = subject
        store.put_experiment(experiment_name("claims", f"{args.mode}-{'-'.join(datasets)}", params), "claims",
                             params, sorted(hashes))
    claims_table(console, results)
    payload = claims_payload(results, args.mode, time.perf_counter() - t0)
    console.print(f"claims finished in {payload['seconds']:.0f} s")
    conditions = [{"claim": r["key"], "claim_verdict": r["verdict"],
                   **{k: c.get(k) for k in ("dataset", "condition", "effect", "ci95", "n_seeds", "min_effect",
                                            "verdict", "p_for_holm", "p_against_holm")}}
                  for r in results for c in r["conditions"]]
    used = [r for r in cache.values() if r is not None]
    return _finish(args, console, payload, runs=used, curves_in_json=False, tables={"claims": conditions})


@_guard
def cmd_demo(args) -> int:
    from .analysis import compare_table, figure1_series
    from .sweep import open_store

    console = _console(args)
    t0 = time.perf_counter()
    quick = args.quick
    f_steps = 60 if quick else 3000
    c_steps = 40 if quick else 2000
    seeds = [0, 1] if quick else [0, 1, 2]
    fig_cfgs = figure1_configs("mnist1d", f_steps, 0)
    cmp_cfgs = compare_configs("mnist1d", ["mlp", "cnn"], ["none", "batchnorm"], None, seeds, steps=c_steps)
    console.rule("[bold]batchnorm demo[/bold]: Ioffe & Szegedy Figure 1 + with/without BN on MNIST-1D")
    runs = _run(args, fig_cfgs + cmp_cfgs, console, "demo")
    fig_runs, cmp_runs = runs[: len(fig_cfgs)], runs[len(fig_cfgs):]
    target = 0.6
    tab = compare_table(cmp_runs, target)
    series = figure1_series(fig_runs)
    from .store import experiment_name

    data_id = _data_id(args, "mnist1d")
    fparams = {"dataset": "mnist1d", "steps": f_steps, "seed": 0, "lr": None, "eval_every": None,
               "limit": args.limit, "data_id": data_id}
    cparams = {"dataset": "mnist1d", "models": ["mlp", "cnn"], "norms": ["none", "batchnorm"], "lrs": None,
               "batch_sizes": None, "seeds": seeds, "target": target, "steps": c_steps, "optimizer": None,
               "batch_size": None, "eval_every": None, "limit": args.limit, "data_id": data_id}
    with open_store(args.out, args.store) as store:
        store.put_experiment(experiment_name("figure1", "mnist1d", fparams), "figure1", fparams,
                             [r["hash"] for r in fig_runs])
        store.put_experiment(experiment_name("compare", "mlp-cnn-mnist1d", cparams), "compare", cparams,
                             [r["hash"] for r in cmp_runs])
    t = new_table(f"demo summary: MNIST-1D, mean ± sd over {len(seeds)} seeds (test accuracy at the best validation "
               "checkpoint)", ["experiment", "without BN", "with BN", "BN effect"], wrap=("experiment",))
    f = {s["norm"]: s for s in series["runs"]}
    a0, a1 = f["none"]["test_accuracy"][-1], f["batchnorm"]["test_accuracy"][-1]
    t.add_row(f"Figure 1: paper-mlp, {f_steps} SGD steps", pct(a0), pct(a1), f"{100 * (a1 - a0):+.1f} pp")
    summ = {(s["model"], s["norm"]): s for s in tab["summary"]}
    rows = {(r["model"], r["norm"]): r for r in tab["rows"]}
    payload_rows = []
    for model in ("mlp", "cnn"):
        r0, r1 = rows[(model, "none")], rows[(model, "batchnorm")]
        t.add_row(f"{model}: test accuracy ({c_steps} steps)",
                  f"{pct(r0['test_accuracy'])} ± {pct(r0['test_accuracy_std'])}",
                  f"{pct(r1['test_accuracy'])} ± {pct(r1['test_accuracy_std'])}",
                  f"{100 * (r1['test_accuracy'] - r0['test_accuracy']):+.1f} pp")
        s0, s1 = r0["steps_to_target"], r1["steps_to_target"]
        t.add_row(f"{model}: steps to {pct(target)} val accuracy", "–" if s0 is None else f"{s0:.0f}",
                  "–" if s1 is None else f"{s1:.0f}",
                  f"×{s0 / s1:.2f} faster" if s0 and s1 else "–")
        t.add_row(f"{model}: train−test gap", pct(r0["gap"]), pct(r1["gap"]),
                  f"{100 * (r1['gap'] - r0['gap']):+.1f} pp")
        payload_rows.append({"model": model, "none": r0, "batchnorm": r1})
        _ = summ
    console.print(t)
    from .findings import compare_findings, figure1_findings

    found = figure1_findings(series) + compare_findings(cmp_runs, tab)
    for f in found:
        f.setdefault("class", "mid")
    print_findings(console, found)
    seconds = time.perf_counter() - t0
    console.print(f"demo finished in {seconds:.0f} s")
    payload = {"seconds": seconds, "figure1": series, "compare": payload_rows,
               "findings": [f["text"] for f in found]}
    return _finish(args, console, payload, runs=runs, curves_in_json=False,
                   tables={"compare": tab["rows"], "summary": tab["summary"],
                           "findings": [{"text": f["text"]} for f in found]})


@_guard
def cmd_report(args) -> int:
    from .report import build_report
    from .store import Store

    out = Path(args.dir)
    store_path = Path(args.store) if args.store else out / "lab.sqlite"
    if not store_path.is_file():
        raise UsageError(f"no lab store at {store_path}; run a lab command with --out {out} first")
    with Store(store_path, check=True) as store:
        path = build_report(store, out)
    console = Console(stderr=args.json)
    console.print(f"report: [bold]{path}[/bold]")
    if args.json:
        print(json.dumps({"report": str(path), "summary": str(out / "summary.json")}))
    return 0
