"""Your own model and data in the lab ("bring your own").

**Models.** A model is named ``module:qualname`` (``mypkg.models:build``; ``path/to/file.py:build`` works
too): a factory returning a ``torch.nn.Module``. When it accepts a ``norm`` argument it is called as
``build(norm=NAME)`` with the lab's norm name (``"none"``, ``"batchnorm"``, ``"ghost"``, ... or
``"module:Class"``; :func:`batchnorm.lab.models.make_norm` builds such a layer); otherwise it is called
without it and, for every norm but ``"none"``, the lab inserts the layers itself with
:func:`batchnorm.insert` (after each Linear/Conv but the last). ``input_shape``, ``num_classes`` and
``num_outputs`` are passed too when the factory accepts them. The factory's identity -- ``module:qualname``
plus the SHA-256 of its source file -- is part of every run's key: editing the file makes new runs.

**Data.** A ``.npz`` file with ``x_train, y_train`` and optionally ``x_val, y_val, x_test, y_test``; a
``.csv`` file with a header, numeric feature columns and a label column (``label=``); or a directory in
torchvision's ImageFolder layout (``DIR/<class>/<image>``, or ``DIR/train|val|test/<class>/<image>``).
Missing validation/test splits are carved from the training split with a fixed seed (test: 20%, then
validation: 10% of the rest). Inputs are standardized on the training split (tabular data, i.e. ``(N, F)``
inputs, per feature; anything else with one mean and standard deviation). Classification labels may be any
integers or strings: they are mapped to ``0..K-1`` in sorted order. ``task="regression"`` keeps float
targets (``(N,)`` or ``(N, K)``) and trains with the mean squared error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import marshal
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from batchnorm_cli import dataset_kind  # the command line's front decides it without torch

from .data import DataError, Dataset, DataUnavailable, _array_digest, _identity

if TYPE_CHECKING:  # torch is imported only when a model is built
    from torch import nn

__all__ = ["FILE_KINDS", "TASKS", "ModelError", "build_user_model", "dataset_kind", "is_user_model",
           "load_user_data", "model_identity", "register_factory", "resolve_factory", "user_data_identity"]

FILE_KINDS = ("npz", "csv", "imagefolder")
TASKS = ("classification", "regression")
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
SPLIT_SEED = 0

#: Factories given as Python objects (``batchnorm.lab.compare(model_fn, ...)``) that cannot be imported by
#: name (defined in ``__main__`` or a notebook): found here by their name in this process.
_REGISTERED: dict[str, Callable] = {}


class ModelError(ValueError):
    """A model factory that cannot be imported, called or used."""


# ----------------------------------------------------------------------------------------------- models


def is_user_model(name: str) -> bool:
    return isinstance(name, str) and ":" in name


def register_factory(fn: Callable) -> str:
    """The ``module:qualname`` name of ``fn``; registered in this process when it is not importable by it."""
    name = f"{getattr(fn, '__module__', None) or '__main__'}:{getattr(fn, '__qualname__', None) or repr(fn)}"
    try:
        importable = resolve_factory(name, registered=False) is fn
    except ModelError:
        importable = False
    if not importable:
        _REGISTERED[name] = fn
    return name


def factory_is_portable(name: str) -> bool:
    """Whether worker processes can import the factory by its name (not registered in this process only)."""
    return name not in _REGISTERED


def _import_module(mod: str):
    if mod.endswith(".py"):
        path = Path(mod).resolve()
        if not path.is_file():
            raise ModelError(f"{mod} is not a file")
        modname = "_bn_user_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        if modname in sys.modules:
            return sys.modules[modname]
        spec = importlib.util.spec_from_file_location(modname, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(modname, None)
            raise
        return module
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        # console scripts do not have the working directory on sys.path; a module beside the user is meant
        cwd = os.getcwd()
        if exc.name and mod.startswith(exc.name) and cwd not in sys.path:
            sys.path.insert(0, cwd)
            return importlib.import_module(mod)
        raise


def resolve_factory(name: str, registered: bool = True) -> Callable:
    """The factory named ``module:qualname`` (or ``file.py:qualname``)."""
    if registered and name in _REGISTERED:
        return _REGISTERED[name]
    mod, _, qual = name.rpartition(":")
    if not mod or not qual:
        raise ModelError(f"model {name!r} is not module:function (e.g. mypkg.models:build)")
    try:
        obj = _import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot import model {name!r} ({type(exc).__name__}: {exc}); give an importable "
                         "factory as module:function (run from the directory holding the module, or set "
                         "PYTHONPATH)") from None
    if not callable(obj):
        raise ModelError(f"model {name!r} is a {type(obj).__name__}, not a callable returning a torch.nn.Module")
    return obj


def model_identity(name: str) -> str:
    """``module:qualname@sha256:<source digest>``: the SHA-256 of the factory's source file (of its source
    text when it has no file, e.g. a notebook cell)."""
    fn = resolve_factory(name)
    target = inspect.unwrap(fn)
    try:
        path = inspect.getsourcefile(target)
    except TypeError:
        path = None
    if path and Path(path).is_file():
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    else:
        try:
            blob = inspect.getsource(target).encode()
        except (OSError, TypeError):  # no source (e.g. typed into ``python -``): its compiled code
            code = getattr(target, "__code__", None)
            blob = marshal.dumps(code) if code is not None else repr(target).encode()
        digest = hashlib.sha256(blob).hexdigest()
    return f"{name}@sha256:{digest[:16]}"


def _accepts(fn: Callable, arg: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _layer_factory(norm: str, norm_kw: dict):
    from .models import make_norm

    def build(num_features: int, layer) -> object:
        ks = getattr(layer, "kernel_size", None)
        rank = len(ks) if isinstance(ks, tuple) else 1
        return make_norm(norm, num_features, rank=rank, **norm_kw)

    return build


def build_user_model(name: str, input_shape, num_outputs: int, norm: str = "none",
                     norm_kw: dict | None = None) -> nn.Module:
    """Build the user's model for ``norm`` (see the module's docstring)."""
    from torch import nn

    fn = resolve_factory(name)
    kw: dict = {}
    for arg, value in (("input_shape", tuple(input_shape)), ("num_classes", num_outputs),
                       ("num_outputs", num_outputs)):
        if _accepts(fn, arg):
            kw[arg] = value
    takes_norm = _accepts(fn, "norm")
    if takes_norm:
        kw["norm"] = norm
    try:
        model = fn(**kw)
    except Exception as exc:
        raise ModelError(f"model {name}({', '.join(f'{k}={v!r}' for k, v in kw.items())}) failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name} returned a {type(model).__name__}, not a torch.nn.Module")
    if not takes_norm and norm != "none":
        from ..tools import insert

        layer = "batchnorm" if norm == "batchnorm" and not norm_kw else _layer_factory(norm, dict(norm_kw or {}))
        try:
            model = insert(model, layer=layer)
        except Exception as exc:
            raise ModelError(f"cannot insert {norm} layers into {name}'s model ({type(exc).__name__}: {exc}); "
                             "let the factory take a norm argument and place the layers itself") from exc
    return model


# ------------------------------------------------------------------------------------------------- data




_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_MEMO: dict[tuple, tuple[dict, str, dict]] = {}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc}); write it with numpy.savez(path, "
                        "x_train=..., y_train=..., x_test=..., y_test=...)") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise DataError(f"{path} has no {', '.join(missing)} (it holds {', '.join(sorted(arrays)) or 'nothing'}); "
                        "it needs x_train and y_train, optionally x_val, y_val, x_test, y_test")
    for x, y in (("x_val", "y_val"), ("x_test", "y_test")):
        if (x in arrays) != (y in arrays):
            raise DataError(f"{path} has {x if x in arrays else y} without {y if x in arrays else x}; give both "
                            "or neither")
    return {k: arrays[k] for k in _KEYS if k in arrays}


def _read_csv(path: Path, label: str | None) -> dict[str, np.ndarray]:
    import csv

    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    rows = [r for r in rows if r]
    if len(rows) < 3:
        raise DataError(f"{path} has {max(0, len(rows) - 1)} data rows; it needs a header line and at least 2 rows")
    header = [h.strip() for h in rows[0]]
    if label is None:
        label = next((h for h in ("label", "target", "y", "class") if h in header), None)
        if label is None:
            raise DataError(f"{path}: which column is the label? give --label COLUMN (columns: "
                            f"{', '.join(header)})")
    if label not in header:
        from difflib import get_close_matches

        near = get_close_matches(label, header, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise DataError(f"{path} has no column {label!r} (columns: {', '.join(header)}){hint}")
    li = header.index(label)
    feats = [i for i in range(len(header)) if i != li]
    if not feats:
        raise DataError(f"{path} has no feature column besides the label {label!r}")
    body = rows[1:]
    for n, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(f"{path} line {n} has {len(r)} fields, the header {len(header)}")
    x = np.empty((len(body), len(feats)), dtype=np.float32)
    for j, i in enumerate(feats):
        try:
            x[:, j] = [float(r[i]) for r in body]
        except ValueError:
            bad = next(r[i] for r in body if not _is_float(r[i]))
            raise DataError(f"{path}: column {header[i]!r} holds {bad!r}, not a number; feature columns must be "
                            "numeric (encode categories as numbers first)") from None
    y = np.array([r[li].strip() for r in body])
    return {"x_train": x, "y_train": y}


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _read_imagefolder(path: Path) -> dict[str, np.ndarray]:
    try:
        from torchvision.datasets import ImageFolder
    except Exception as exc:  # ImportError, or torchvision's operators failing to load
        raise DataUnavailable(f"{path} is a directory; reading it as an ImageFolder needs torchvision "
                              f"({type(exc).__name__}: {exc}): pip install torchvision") from None
    import torchvision.transforms.functional as TVF

    splits = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    if "train" not in splits:
        splits = {"train": path}
    out: dict[str, np.ndarray] = {}
    classes = None
    for split, d in splits.items():
        try:
            ds = ImageFolder(str(d))
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"{d}: not an ImageFolder directory (DIR/<class>/<image>): {exc}") from None
        if classes is None:
            classes = ds.classes
        elif ds.classes != classes:
            raise DataError(f"{d} has classes {ds.classes}, the training split {classes}; use the same class folders")
        xs = []
        for img_path, _ in ds.samples:
            img = ds.loader(img_path)
            xs.append(TVF.pil_to_tensor(img).numpy())
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:
            raise DataError(f"{d}: images of different sizes ({', '.join(map(str, sorted(shapes)[:3]))}...); "
                            "resize them to one size first")
        out[f"x_{split}"] = np.stack(xs).astype(np.float32) / 255.0
        out[f"y_{split}"] = np.array([c for _, c in ds.samples], dtype=np.int64)
    return out


def _raw_user(kind: str, path: str, label: str | None) -> dict[str, np.ndarray]:
    p = Path(path)
    if kind != "imagefolder" and not p.is_file():
        raise DataUnavailable(f"dataset file {path} not found")
    if kind == "npz":
        return _read_npz(p)
    if kind == "csv":
        return _read_csv(p, label)
    if kind == "imagefolder":
        if not p.is_dir():
            raise DataUnavailable(f"dataset directory {path} not found")
        return _read_imagefolder(p)
    raise ValueError(f"unknown dataset kind {kind!r}; choose from {', '.join(FILE_KINDS)}")


def _load(kind: str, path: str, task: str, label: str | None) -> tuple[dict, str, dict]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    p = Path(path)
    try:
        st = p.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    key = (kind, str(p.resolve()), task, label, stamp)
    if key not in _MEMO:
        raw = _raw_user(kind, path, label)
        for x, y in (("x_train", "y_train"), ("x_val", "y_val"), ("x_test", "y_test")):
            if x in raw and len(raw[x]) != len(raw[y]):
                raise DataError(f"{path}: {x} has {len(raw[x])} rows, {y} {len(raw[y])}")
            if x in raw and raw[x].dtype.kind not in "biuf":
                raise DataError(f"{path}: {x} is of type {raw[x].dtype}; inputs must be numbers")
        if len(raw["y_train"]) < 5:
            raise DataError(f"{path} has {len(raw['y_train'])} training examples; it needs at least 5")
        parts = [(k, _array_digest(raw[k])) for k in _KEYS if k in raw]
        parts += [("task", task)] + ([("label", label)] if label else [])
        _MEMO[key] = (raw, _identity(parts), {"source": f"{kind} file {p.name}", "path": str(p)})
    return _MEMO[key]


def user_data_identity(kind: str, path: str, task: str = "classification", label: str | None = None) -> str:
    """The identity of a user's dataset: SHA-256 over its arrays as read, the task and the label column."""
    return _load(kind, path, task, label)[1]


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return perm[:k], perm[k:]


def load_user_data(kind: str, path: str, task: str = "classification", label: str | None = None,
                   limit: int | None = None) -> Dataset:
    """A :class:`~batchnorm.lab.data.Dataset` from the user's file (see the module's docstring)."""
    raw, ident, info = _load(kind, path, task, label)
    x, y = raw["x_train"], raw["y_train"]
    if "x_test" in raw:
        xte, yte = raw["x_test"], raw["y_test"]
    else:
        te, tr = _split(len(y), TEST_FRACTION, SPLIT_SEED)
        x, y, xte, yte = x[tr], y[tr], x[te], y[te]
    if "x_val" in raw:
        xva, yva = raw["x_val"], raw["y_val"]
    else:
        va, tr = _split(len(y), VAL_FRACTION, SPLIT_SEED + 1)
        x, y, xva, yva = x[tr], y[tr], x[va], y[va]
    if limit is not None:
        x, y = x[:limit], y[:limit]
        xva, yva = xva[: max(1, limit // 4)], yva[: max(1, limit // 4)]
        xte, yte = xte[: max(1, limit // 2)], yte[: max(1, limit // 2)]
    x = x.astype(np.float32)
    if x.ndim == 2:  # tabular: per feature
        mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        std[std == 0] = 1.0
    else:
        mean = np.float64(x.mean(dtype=np.float64))
        std = np.float64(x.std(dtype=np.float64)) or np.float64(1.0)

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a.astype(np.float64) - mean) / std).astype(np.float32)

    if task == "classification":
        ys = [np.asarray(a) for a in (y, yva, yte)]
        if any(a.ndim != 1 for a in ys):
            raise DataError(f"{path}: classification labels must be one value per example; for real-valued "
                            "targets use --task regression")
        if all(a.dtype.kind in "iu" for a in ys) and min(int(a.min()) for a in ys if a.size) >= 0:
            classes = max(int(a.max()) for a in ys if a.size) + 1
            ys = [a.astype(np.int64) for a in ys]
        else:
            if any(a.dtype.kind == "f" for a in ys) and not all(np.all(a == np.round(a)) for a in ys):
                raise DataError(f"{path}: the labels are not whole numbers; for real-valued targets use "
                                "--task regression")
            names = np.unique(np.concatenate([a.astype(str) for a in ys]))
            ys = [np.searchsorted(names, a.astype(str)).astype(np.int64) for a in ys]
            classes = len(names)
            info = {**info, "class_names": [str(s) for s in names]}
        if classes < 2:
            raise DataError(f"{path}: the labels hold {classes} class; classification needs at least 2")
        outputs = classes
    else:
        try:
            ys = [np.asarray(a, dtype=np.float32) for a in (y, yva, yte)]
        except ValueError:
            raise DataError(f"{path}: regression targets must be numbers") from None
        outputs = 1 if ys[0].ndim == 1 else int(ys[0].shape[1])
    return Dataset(name=kind, x_train=norm(x), y_train=ys[0], x_val=norm(xva), y_val=ys[1], x_test=norm(xte),
                   y_test=ys[2], num_classes=outputs, mean=float(np.mean(mean)), std=float(np.mean(std)),
                   info={**info, "data_id": ident, "task": task})
