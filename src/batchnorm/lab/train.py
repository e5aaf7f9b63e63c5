"""One training loop for every lab experiment.

``train(RunConfig(...))`` is deterministic for a given configuration (seeded model init and batch order),
evaluates every ``eval_every`` steps (``steps / EVALS`` by default: steps-to-target has that resolution),
runs the requested probes, and ends a run whose loss turns non-finite or blows up
(``> blowup * initial loss``) as ``diverged`` instead of raising.

The reported test accuracy is the one **at the best validation checkpoint** (the weights of the
evaluation with the highest validation accuracy, restored at the end and evaluated on the whole test
set); the test set never selects anything. Which test examples that checkpoint gets right is stored
too (``result["test_correct"]``, packed bits), so that the lab's bootstrap can resample test examples.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from . import probes as P
from .byo import FILE_KINDS, ModelError, is_user_model, load_user_data, model_identity, user_data_identity
from .data import Dataset, load_dataset
from .models import build_model, norm_name, recipe

__all__ = ["RunConfig", "config_hash", "config_key", "evaluate", "load_data", "resolve_data", "recipe_fields", "train",
           "with_data", "with_recipe"]

# lab-2: the run key includes the data identity (``data_id``); runs of lab-1 stores are not reused
# lab-3: the test accuracy is taken at the best validation checkpoint, 40 evaluations per run
LAB_VERSION = "lab-3"
EVAL_SUBSET = 2000  # examples of val/test used for the intermediate points of the curves
EVALS = 40  # evaluations per run when ``eval_every`` is not given
PROBE_EVERY = 4  # the ICS and smoothness probes (a few extra passes per layer) run at every 4th evaluation


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run. Fields left ``None`` take the model's recipe."""

    dataset: str = "mnist1d"
    model: str = "mlp"
    norm: str = "none"
    optimizer: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    steps: int | None = None
    seed: int = 0
    eval_every: int | None = None
    momentum: float = 0.9
    schedule: str = "constant"  # learning-rate schedule: constant | cosine (to 0 over the run's steps)
    weight_decay: float = 0.0
    weight_scale: float = 1.0
    model_kw: tuple = ()  # sorted (key, value) pairs, hashable
    norm_kw: tuple = ()
    data_limit: int | None = None
    data_dir: str | None = None  # where to look for the files: not part of the key
    data_id: str | None = None  # identity of the data (``data.data_identity``): part of the key
    task: str = "classification"  # or "regression" (MSE); key only when not the default
    data_kw: tuple = ()  # options of a user's dataset file (``label`` column of a CSV)
    model_id: str | None = None  # identity of a user's model factory (``byo.model_identity``): part of the key
    probes: tuple = ()
    probe_layer: int = -1
    probe_unit: int = 0
    blowup: float = 20.0

    def __post_init__(self):
        for k in ("model_kw", "norm_kw", "data_kw"):
            v = getattr(self, k)
            if isinstance(v, dict):
                object.__setattr__(self, k, tuple(sorted(v.items())))
        if not isinstance(self.probes, tuple):
            object.__setattr__(self, "probes", tuple(self.probes))
        if not isinstance(self.norm, str):
            object.__setattr__(self, "norm", norm_name(self.norm))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_kw"] = dict(self.model_kw)
        d["norm_kw"] = dict(self.norm_kw)
        d["data_kw"] = dict(self.data_kw)
        d["probes"] = list(self.probes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        d["model_kw"] = tuple(sorted(dict(d.get("model_kw") or {}).items()))
        d["norm_kw"] = tuple(sorted(dict(d.get("norm_kw") or {}).items()))
        d["data_kw"] = tuple(sorted(dict(d.get("data_kw") or {}).items()))
        d["probes"] = tuple(d.get("probes") or ())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw) -> RunConfig:
        for k in ("model_kw", "norm_kw", "data_kw"):
            if k in kw and isinstance(kw[k], dict):
                kw[k] = tuple(sorted(kw[k].items()))
        if "norm" in kw:
            kw["norm"] = norm_name(kw["norm"])
        return dataclasses.replace(self, **kw)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.norm}"


class RecipeFields(NamedTuple):
    """The training fields of a :class:`RunConfig` with the model's recipe filling those left ``None``."""

    optimizer: str
    lr: float
    batch_size: int
    steps: int
    eval_every: int


def recipe_fields(cfg: RunConfig) -> RecipeFields:
    """``cfg``'s optimizer, learning rate, batch size, steps and evaluation interval, the ones left ``None``
    (or 0) taken from the model's default recipe; the values :func:`with_recipe` writes into the config."""
    r = recipe(cfg.model)
    steps = cfg.steps if cfg.steps is not None else r.steps
    return RecipeFields(
        optimizer=cfg.optimizer or r.optimizer,
        lr=cfg.lr if cfg.lr is not None else r.lr,
        batch_size=cfg.batch_size or r.batch_size,
        steps=steps,
        eval_every=cfg.eval_every or max(1, steps // EVALS),
    )


def with_recipe(cfg: RunConfig) -> RunConfig:
    """Fill the fields left ``None`` from the model's default recipe."""
    return dataclasses.replace(cfg, **recipe_fields(cfg)._asdict(), norm=norm_name(cfg.norm))


def with_data(cfg: RunConfig, limit: int | None = None, data_dir: str | None = None) -> RunConfig:
    """``cfg`` with a command line's ``--limit`` / ``--data-dir`` applied (unchanged when both are None)."""
    if limit is None and data_dir is None:
        return cfg
    return dataclasses.replace(cfg, data_limit=limit if limit is not None else cfg.data_limit,
                               data_dir=data_dir or cfg.data_dir)


def resolve_data(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``data_id`` set to the identity of its data as found now (loads and checks the data,
    memoized per process; raises ``DataUnavailable``/``DataError`` for missing or wrong files)."""
    if cfg.data_id is None:
        cfg = dataclasses.replace(cfg, data_id=_data_identity(cfg))
    if cfg.model_id is None and is_user_model(cfg.model):
        cfg = dataclasses.replace(cfg, model_id=model_identity(cfg.model))
    return cfg


def _data_identity(cfg: RunConfig) -> str:
    from .data import data_identity

    if cfg.dataset in FILE_KINDS:
        if not cfg.data_dir:
            raise ValueError(f"dataset {cfg.dataset!r} needs the file's path as data_dir")
        return user_data_identity(cfg.dataset, cfg.data_dir, cfg.task, dict(cfg.data_kw).get("label"))
    return data_identity(cfg.dataset, cfg.data_dir)


def load_data(cfg: RunConfig) -> Dataset:
    """The dataset ``cfg`` names: a built-in one or the user's file (``cfg.data_dir``)."""
    if cfg.dataset in FILE_KINDS:
        return load_user_data(cfg.dataset, cfg.data_dir or "", cfg.task, dict(cfg.data_kw).get("label"),
                              limit=cfg.data_limit)
    if cfg.task != "classification":
        raise ValueError(f"task {cfg.task!r} needs your own dataset file; the built-in datasets are classification")
    return load_dataset(cfg.dataset, data_dir=cfg.data_dir, limit=cfg.data_limit)


def config_key(cfg: RunConfig) -> str:
    """Canonical JSON of the recipe-completed configuration, without the data's location and identity."""
    full = with_recipe(cfg).to_dict()
    full.pop("data_dir", None)  # where the files live does not change the run
    full.pop("data_id", None)
    full.pop("model_id", None)  # in the key beside the configuration (config_hash)
    if full.get("task") == "classification":  # keys of runs from before these fields existed stay the same
        full.pop("task")
    if not full.get("data_kw"):
        full.pop("data_kw", None)
    if full.get("schedule") == "constant":
        full.pop("schedule")
    return json.dumps({"v": LAB_VERSION, **full}, sort_keys=True, default=str)


def config_hash(cfg: RunConfig) -> str:
    """The run's key: SHA-256 over the configuration (:func:`config_key`) and the identity of its data.

    A user's model (``module:qualname``) adds its factory's identity (``model_id``: the name and the SHA-256
    of its source file). A configuration without ``data_id`` gets the identity of the data it names as found now
    (:func:`resolve_data`): the same configuration on other data is another run."""
    cfg = resolve_data(cfg)
    key = {"config": config_key(cfg), "data": cfg.data_id}
    if cfg.model_id is not None:  # a user's model: its factory's identity (name and source digest)
        key["model"] = cfg.model_id
    blob = json.dumps(key)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    if name in ("momentum", "sgdm"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, momentum, adam, adamw")


@torch.no_grad()
def evaluate_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      batch: int = 250) -> tuple[np.ndarray, float]:
    """(which examples are right, as a bool array; mean cross-entropy) in eval mode; non-finite logits
    count as wrong."""
    was = model.training
    model.eval()
    right = []
    loss = 0.0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        yb = y[i : i + batch]
        ok = torch.isfinite(out).all(dim=1)
        right.append(((out.argmax(1) == yb) & ok).numpy())
        loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
    model.train(was)
    n = max(1, len(y))
    return (np.concatenate(right) if right else np.zeros(0, dtype=bool)), loss / n


@torch.no_grad()
def evaluate_regression(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> tuple[float, float]:
    """(R², mean squared error) in eval mode. R² = 1 - SSE / SST over the examples given (1: perfect, 0: as good
    as predicting their mean); non-finite outputs give R² = -inf."""
    was = model.training
    model.eval()
    sse = 0.0
    for i in range(0, len(y), batch):
        out = _as_target(model(x[i : i + batch]), y[i : i + batch])
        sse += float(((out - y[i : i + batch]) ** 2).sum())
    model.train(was)
    if len(y) == 0:
        return float("nan"), float("nan")
    sst = float(((y - y.mean(0)) ** 2).sum())
    mse = sse / y.numel()
    if not math.isfinite(sse):
        return float("-inf"), float("inf")
    return (1.0 - sse / sst if sst > 0 else float("nan")), mse


def _as_target(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A regression model's output shaped like its targets ((N, 1) outputs for (N,) targets)."""
    if out.dim() == y.dim() + 1 and out.shape[-1] == 1:
        return out.squeeze(-1)
    return out


def loss_function(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for classification, mean squared error for regression."""
    if task == "regression":
        return lambda out, y: nn.functional.mse_loss(_as_target(out, y), y)
    if task != "classification":
        raise ValueError(f"unknown task {task!r}; choose classification or regression")
    return nn.functional.cross_entropy


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode; non-finite logits count as wrong."""
    right, loss = evaluate_examples(model, x, y, batch)
    return float(right.sum()) / max(1, len(y)), loss


def pack_correct(right: np.ndarray) -> str:
    """Per-example correctness as stored in a run: base64 of the packed bits."""
    return base64.b64encode(np.packbits(right.astype(bool)).tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> np.ndarray:
    """Inverse of :func:`pack_correct` for ``n`` examples (float32 0/1, ready for weighted sums)."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n]
    return bits.astype(np.float32)


def _t(a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def train(cfg: RunConfig, data: Dataset | None = None, progress: Callable[[int, int, dict], None] | None = None,
          deadline: float | None = None) -> dict:
    """Run one configuration. Returns ``{"config", "hash", "result", "curves", "init"}``.

    ``progress(step, total, last_eval)`` is called at every evaluation (for progress bars).
    """
    cfg = with_recipe(cfg)
    rf = recipe_fields(cfg)  # the same values, typed as filled in
    t0 = time.perf_counter()
    data = data or load_data(cfg)
    if is_user_model(cfg.model):
        mid = model_identity(cfg.model)
        if cfg.model_id is not None and mid != cfg.model_id:
            raise ModelError(f"the model {cfg.model} changed: the run was planned with {cfg.model_id}, its source "
                             f"now is {mid}; run the command again")
        cfg = dataclasses.replace(cfg, model_id=mid)
    found = data.info.get("data_id") or _arrays_identity(data)
    if cfg.data_id is not None and found is not None and found != cfg.data_id:
        from .data import DataError

        raise DataError(f"the {cfg.dataset} data changed: the run was planned on {cfg.data_id}, the files read "
                        f"now are {found}; run the command again")
    if cfg.data_id is None:
        cfg = dataclasses.replace(cfg, data_id=found)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model, data.input_shape, data.num_classes, norm=cfg.norm, weight_scale=cfg.weight_scale,
        norm_kw=dict(cfg.norm_kw), **dict(cfg.model_kw)
    )
    opt = _optimizer(rf.optimizer, model.parameters(), rf.lr, cfg.momentum, cfg.weight_decay)
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose constant or cosine")
    regression = cfg.task == "regression"
    loss_fn = loss_function(cfg.task)
    ev = evaluate_regression if regression else evaluate  # regression: R² in the accuracy slots, MSE as loss
    ydt = torch.float32 if regression else torch.int64
    xtr, ytr = _t(data.x_train), _t(data.y_train, ydt)
    xva, yva = _t(data.x_val), _t(data.y_val, ydt)
    xte, yte = _t(data.x_test), _t(data.y_test, ydt)
    n_train_eval = min(len(ytr), 2000)
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    n = len(ytr)
    bs = min(rf.batch_size, n)

    want = set(cfg.probes)
    pre = preactivation_probe_or_none(model, cfg) if "percentiles" in want else None
    curves: dict[str, list] = {k: [] for k in ("step", "train_loss", "train_acc", "val_acc", "val_loss",
                                               "test_acc", "test_loss", "seconds")}
    if pre:
        curves.update({"p15": [], "p50": [], "p85": []})
    if "grad_norms" in want:
        curves["grad_norms"] = []
    if "ics" in want:
        curves.update({"ics_step": [], "ics_diff": [], "ics_rel": [], "ics_cos": []})
    if "smoothness" in want:
        curves.update({"smooth_step": [], "loss_range": [], "beta": []})
    init: dict = {}

    # gradient norms at initialization, on a fixed batch of up to 500 training examples
    model.train()
    if "grad_norms" in want:
        k = min(500, n)
        loss = loss_fn(model(xtr[:k]), ytr[:k])
        model.zero_grad()
        loss.backward()
        init["grad_norms"] = P.grad_norms(model)
        init["layers"] = [name for name, _ in P.layer_groups(model)]
        model.zero_grad()
        # that forward pass updated running statistics; rebuild the model so the run itself is unaffected
        torch.manual_seed(cfg.seed)
        model = build_model(
            cfg.model, data.input_shape, data.num_classes, norm=cfg.norm, weight_scale=cfg.weight_scale,
            norm_kw=dict(cfg.norm_kw), **dict(cfg.model_kw)
        )
        opt = _optimizer(rf.optimizer, model.parameters(), rf.lr, cfg.momentum, cfg.weight_decay)
        if pre:
            pre.remove()
            pre = preactivation_probe_or_none(model, cfg)

    best: dict = {"val": float("-inf"), "step": 0, "state": None, "train_acc": float("nan")}

    def record(step: int, window_losses: list[float], final: bool = False):
        # intermediate points on fixed subsets (speed on 10k-image test sets), the final one on everything;
        # the validation subset is the same at every evaluation, so checkpoints compare like with like
        n_eval = None if final else EVAL_SUBSET
        tr_acc, _ = ev(model, xtr[:n_train_eval], ytr[:n_train_eval])
        va_acc, va_loss = (ev(model, xva[:EVAL_SUBSET], yva[:EVAL_SUBSET]) if len(yva)
                           else (float("nan"), float("nan")))
        if (not len(yva) and final) or va_acc > best["val"]:
            best.update(val=va_acc, step=step, train_acc=tr_acc,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        def test_eval():
            return ev(model, xte[:n_eval], yte[:n_eval])

        if pre:  # the percentiles are taken during the test-set pass
            (te_acc, te_loss), pcts = pre.collect(test_eval)
            for k2, v in pcts.items():
                curves[k2].append(v)
        else:
            te_acc, te_loss = test_eval()
        curves["step"].append(step)
        curves["train_loss"].append(float(np.mean(window_losses)) if window_losses else float("nan"))
        curves["train_acc"].append(tr_acc)
        curves["val_acc"].append(va_acc)
        curves["val_loss"].append(va_loss)
        curves["test_acc"].append(te_acc)
        curves["test_loss"].append(te_loss)
        curves["seconds"].append(time.perf_counter() - t0)
        if progress:
            progress(step, rf.steps, {"test_acc": te_acc, "train_loss": curves["train_loss"][-1]})

    record(0, [], final=rf.steps == 0)
    window: list[float] = []
    diverged = False
    diverged_at = None
    first_loss = None
    step = 0
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    while step < rf.steps:
        if deadline is not None and time.time() > deadline:
            break
        if pos + bs > n:
            order = torch.randperm(n, generator=gen)
            pos = 0
        idx = order[pos : pos + bs]
        pos += bs
        xb, yb = xtr[idx], ytr[idx]
        out = model(xb)
        loss = loss_fn(out, yb)
        lv = float(loss.detach())
        if first_loss is None:
            first_loss = lv
        if not math.isfinite(lv) or lv > cfg.blowup * max(first_loss, 1e-3):
            diverged, diverged_at = True, step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        step += 1
        is_eval = step % rf.eval_every == 0 or step == rf.steps
        if is_eval and "grad_norms" in want:
            curves["grad_norms"].append(P.grad_norms(model))
        probing = (is_eval and ("ics" in want or "smoothness" in want)
                   and ((step // rf.eval_every) % PROBE_EVERY == 0 or step == rf.steps))
        before = {k: p.detach().clone() for k, p in model.named_parameters()} if probing else None
        if cfg.schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = 0.5 * rf.lr * (1 + math.cos(math.pi * (step - 1) / max(1, rf.steps)))
        opt.step()
        window.append(lv)
        if before is not None and "smoothness" in want:
            delta = {k: p.detach() - before[k] for k, p in model.named_parameters()}
            s = P.smoothness(model, xb, yb, base=before, direction=delta)
            curves["smooth_step"].append(step)
            curves["loss_range"].append(s["loss_range"])
            curves["beta"].append(s["beta"])
        if before is not None and "ics" in want:
            m = P.ics_measure(model, before, xb, yb)
            curves["ics_step"].append(step)
            for k2 in ("ics_diff", "ics_rel", "ics_cos"):
                curves[k2].append(m[k2])
        if is_eval:
            record(step, window, final=step == rf.steps)
            window = []
    if diverged or (0 < step < rf.steps):  # diverged or stopped by the deadline: a final full evaluation
        record(step, window, final=True)
    if pre:
        pre.remove()
    seconds = time.perf_counter() - t0
    final_test = curves["test_acc"][-1]
    if best["state"] is not None:  # the best validation checkpoint, evaluated on the whole test set
        model.load_state_dict(best["state"])
    extra: dict = {}
    if regression:  # R² (the "accuracy" of every table) and the MSE; no per-example correctness
        te_r2, te_loss = evaluate_regression(model, xte, yte)
        scores = {"test_accuracy": te_r2, "test_r2": te_r2, "test_mse": _finite_or_none(te_loss),
                  "task": "regression", "test_examples": int(len(yte))}
    else:
        right, te_loss = evaluate_examples(model, xte, yte)
        scores = {"test_accuracy": float(right.mean()) if len(right) else float("nan"),
                  "test_correct": pack_correct(right), "test_examples": int(len(right))}
        if "inference" in want:
            extra["batch_stat_accuracy"] = batch_stat_accuracy(model, xte, yte)
        if "recalibrate" in want:
            extra.update(recalibrated_accuracy(model, xtr, xte, yte))
    result = {
        **scores,
        "test_loss": _finite_or_none(te_loss),
        "best_step": best["step"],
        "final_test_accuracy": final_test,
        "val_accuracy": best["val"] if len(yva) else None,
        "train_accuracy": best["train_acc"],
        "train_loss": _finite_or_none(curves["train_loss"][-1]),
        "best_val_accuracy": float(np.nanmax(curves["val_acc"])) if len(yva) else None,
        "eval_every": rf.eval_every,
        "steps": step,
        "diverged": diverged,
        "diverged_at": diverged_at,
        "seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
        **extra,
    }
    return {"config": cfg.to_dict(), "hash": config_hash(cfg), "result": result, "curves": curves, "init": init}


def _arrays_identity(data: Dataset) -> str:
    """Identity of a Dataset built by hand (no ``info["data_id"]``): SHA-256 over its split arrays."""
    h = hashlib.sha256()
    for a in (data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return "arrays:" + h.hexdigest()[:32]


@torch.no_grad()
def batch_stat_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sizes=(4, 16, 1000)) -> dict:
    """Test accuracy when each test batch of ``size`` examples is normalized by its own statistics instead of
    the running statistics (on a copy whose BN layers alone are in training mode: dropout stays off), for
    several test batch sizes; full batches only.

    Our BN layers do it in one pass per chunk: ``virtual_batch_size=size`` makes each group of ``size``
    consecutive examples use its own statistics, exactly as separate batches would."""
    out = {}
    for size in sizes:
        m = copy.deepcopy(model).eval()
        norms = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._NormBase)]
        ghost = all(hasattr(mod, "virtual_batch_size") for mod in norms)
        for mod in norms:
            mod.train()
            if ghost:
                mod.virtual_batch_size = size
        n = (len(y) // size) * size
        step = size * max(1, 2000 // size) if ghost else size
        correct = 0
        for i in range(0, n, step):
            o = m(x[i : min(i + step, n)])
            yb = y[i : min(i + step, n)]
            correct += int(((o.argmax(1) == yb) & torch.isfinite(o).all(1)).sum())
        out[str(size)] = correct / max(1, n)
    return out


@torch.no_grad()
def recalibrated_accuracy(model: nn.Module, xtr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor) -> dict:
    """Test accuracy with the BN layers' running statistics replaced by the exact population statistics of
    the training set (:func:`batchnorm.tools.recalibrate`, on a copy; batches of 500)."""
    from ..tools import recalibrate

    if not any(isinstance(mod, nn.modules.batchnorm._NormBase) for mod in model.modules()):
        right, _ = evaluate_examples(model, xte, yte)  # nothing to recalibrate
        return {"recalibrated_test_accuracy": float(right.mean()), "recalibrated_test_correct": pack_correct(right)}
    m = copy.deepcopy(model).train()
    recalibrate(m, [xtr[i : i + 500] for i in range(0, len(xtr), 500)])
    right, _ = evaluate_examples(m, xte, yte)
    return {"recalibrated_test_accuracy": float(right.mean()), "recalibrated_test_correct": pack_correct(right)}


def _finite_or_none(v):
    return float(v) if v is not None and math.isfinite(v) else None


def preactivation_probe_or_none(model, cfg):
    try:
        return P.PreactivationProbe(model, layer=cfg.probe_layer, unit=cfg.probe_unit)
    except ValueError:
        return None


def steps_to(curves: dict, key: str, target: float) -> int | None:
    """First evaluated step at which ``curves[key] >= target`` (None if never)."""
    for s, v in zip(curves["step"], curves[key]):
        if v is not None and v >= target:
            return int(s)
    return None


_ = field  # keep dataclasses.field importable for subclasses
