"""The ``batchnorm`` command line, parsed without importing torch.

``batchnorm --help`` and every sub-command's ``--help`` (and every usage error) are answered from this package,
which imports nothing but the standard library: the names a command line may use (models, norms, datasets,
claims) are listed here, and ``tests/lab/test_cli_fast.py`` checks them against the lab's own tables. Only a
command that runs imports :mod:`batchnorm` (and with it torch), through :func:`batchnorm.cli.run`.

The entry point of the ``batchnorm`` script is :func:`main`; ``batchnorm.cli.main`` is the same function.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from difflib import get_close_matches
from pathlib import Path

__all__ = ["build_parser", "main", "version"]

EXIT_USAGE = 2
DEFAULT_OUT = "bn-report"
MAX_SEED = 2**32 - 1
#: batchnorm.lab.models.MODELS / NORMS, batchnorm.lab.data.DATASETS, batchnorm.lab.experiments.CLAIMS' keys
MODELS = ("logistic", "paper-mlp", "seed-mlp", "mlp", "cnn", "cnn2d", "deep-mlp", "resnet-mlp", "resnet", "lstm")
NORMS = ("none", "batchnorm", "ghost", "renorm", "frozen", "groupnorm", "layernorm", "noisy")
DATASETS = ("mnist1d", "fashion-mnist", "mnist", "digits", "idx")
CLAIM_KEYS = ("faster", "higher-lr", "regularizes", "init", "gradients", "deep", "ics", "smooth", "accuracy",
              "running-stats", "population-stats", "small-batch", "placement", "dropout", "noisy-bn")
PORTABLE_CLAIMS = ("faster", "higher-lr", "regularizes", "accuracy", "running-stats", "small-batch")
PROBES = ("percentiles", "grad_norms", "ics", "smoothness", "inference", "recalibrate")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
TASKS = ("classification", "regression")
EXECUTORS = ("local", "ray")
RAY_INSTALL = 'pip install "batchnorm[ray]"'
TENSORBOARD_INSTALL = 'pip install "batchnorm[tensorboard]"'

#: sub-command -> (module, function) run by batchnorm.cli.run
COMMANDS = {
    "train": ("batchnorm.lab.commands", "cmd_train"),
    "compare": ("batchnorm.lab.commands", "cmd_compare"),
    "figure1": ("batchnorm.lab.commands", "cmd_figure1"),
    "claims": ("batchnorm.lab.commands", "cmd_claims"),
    "demo": ("batchnorm.lab.commands", "cmd_demo"),
    "report": ("batchnorm.lab.commands", "cmd_report"),
    "bench": ("batchnorm.bench", "main"),
}


def version() -> str:
    try:
        from importlib.metadata import version as _v

        return _v("batchnorm")
    except Exception:  # running from a source tree without metadata
        return "unknown"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (unless the help already says it), examples kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (d is None or d is False or d == () or d is argparse.SUPPRESS or "default" in text
                or isinstance(action, argparse._VersionAction | argparse._HelpAction)):
            return text
        if not action.option_strings and action.nargs != "?":
            return text
        shown = ",".join(map(str, d)) if isinstance(d, list | tuple) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=min(100, _terminal_width()))

    def _fill_text(self, text, width, indent):  # descriptions wrapped, examples as written
        if text.startswith("examples:"):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _split_lines(self, text, width):  # never break a name at its hyphen (deep-mlp, fashion-mnist)
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False) or [""]


def _terminal_width() -> int:
    import shutil

    return max(60, shutil.get_terminal_size((80, 24)).columns - 2)


def _suggest(message: str, parser: argparse.ArgumentParser) -> str:
    """Add "did you mean ..." to argparse's messages about unknown choices and options."""
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2))
        near = get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
        if near:
            return message[: m.end(1) + 1] + f" (did you mean {near[0]!r}?)" + message[m.end(1) + 1:]
        return message
    m = re.match(r"unrecognized arguments: (.*)", message)
    if m:
        options = [s for a in parser._actions for s in a.option_strings]
        hints = []
        for tok in m.group(1).split():
            if tok.startswith("-"):
                near = get_close_matches(tok.split("=")[0], options, n=1, cutoff=0.6)
                if near:
                    hints.append(f"did you mean {near[0]} for {tok}?")
        if hints:
            return f"{message} ({'; '.join(hints)})"
    return message


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: the sub-command's usage line, then one line
    ``batchnorm train: error: argument --steps: ...`` (with "did you mean" for a mistyped name or option)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **kw)

    def error(self, message: str):  # type: ignore[override]
        message = _suggest(message, self)
        self.exit(EXIT_USAGE, f"{self.format_usage().rstrip()}\n{self.prog}: error: {message} "
                              f"(see `{self.prog} --help`)\n")


def dataset_kind(name: str | os.PathLike) -> str | None:
    """``npz``, ``csv`` or ``imagefolder`` for a dataset path, None for anything else (a built-in name)."""
    p = Path(name)
    if p.suffix.lower() == ".npz":
        return "npz"
    if p.suffix.lower() == ".csv":
        return "csv"
    if p.is_dir():
        return "imagefolder"
    return None


# ------------------------------------------------------------------------------------- option validators
# argparse ``type=`` functions: a bad value is refused before anything runs or is stored, with a message
# naming the allowed range (argparse prefixes it with the option: "argument --steps: ...").


def _int_at_least(lo: int, hi: int | None = None):
    allowed = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {allowed}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range; expected {allowed}")
        return v

    parse.__name__ = allowed
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a finite number > 0") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} is out of range; expected a finite number > 0")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected an accuracy in (0, 1]") from None
    if not (0 < v <= 1):
        raise argparse.ArgumentTypeError(f"{text} is out of range; expected an accuracy in (0, 1] (0.6 = 60%)")
    return v


def _items(text: str) -> list[str]:
    return [x for x in text.replace(",", " ").split() if x]


def _list_of(item, what: str):
    """A non-empty comma (or space) separated list, each item parsed by ``item``."""

    def parse(text: str) -> list:
        parts = _items(text)
        if not parts:
            raise argparse.ArgumentTypeError(f"empty list; give one or more {what}, comma separated")
        out = []
        for p in parts:
            try:
                out.append(item(p))
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{what}: {exc}") from None
        return out

    parse.__name__ = f"list of {what}"
    return parse


def _did_you_mean(name: str, choices) -> str:
    from difflib import get_close_matches

    near = get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _model(name: str) -> str:
    """A zoo model, or your factory as ``module:function`` (it must import)."""
    if name in MODELS:
        return name
    if ":" not in name:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}{_did_you_mean(name, MODELS)}; choose from "
                                         f"{', '.join(MODELS)}, or give your model factory as module:function")
    from batchnorm.lab.byo import ModelError, resolve_factory  # imports torch: only for a module:function

    try:
        resolve_factory(name)
    except ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _builtin_dataset(name: str) -> str:
    if name not in DATASETS:
        raise argparse.ArgumentTypeError(f"unknown dataset {name!r}{_did_you_mean(name, DATASETS)}; choose from "
                                         f"{', '.join(DATASETS)}")
    return name


def _dataset(name: str) -> str:
    """A built-in dataset, or your own: a .npz or .csv file, or an ImageFolder directory."""
    if name in DATASETS:
        return name
    kind = dataset_kind(name)
    if kind is None or not Path(name).exists():
        what = f"no such file {name!r}" if kind in ("npz", "csv") else f"unknown dataset {name!r}"
        near = _did_you_mean(name, DATASETS) if kind is None else ""
        raise argparse.ArgumentTypeError(f"{what}{near}; choose from {', '.join(DATASETS)}, or give your own data "
                                         "as a .npz file, a .csv file or an ImageFolder directory")
    return name


def _norm(name: str) -> str:
    """A norm name or ``module:Class`` that imports and builds as ``Class(num_features)``."""
    if name in NORMS:
        return name
    if ":" not in name:
        raise argparse.ArgumentTypeError(
            f"unknown norm {name!r}; choose from {', '.join(NORMS)} or give a layer class as module:Class")
    mod, _, qual = name.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # ImportError, AttributeError, or an error raised by the module itself
        raise argparse.ArgumentTypeError(f"cannot import {name!r} ({type(exc).__name__}: {exc}); give an "
                                         "importable layer class as module:Class, e.g. torch.nn:LayerNorm") from None
    if not isinstance(obj, type):
        raise argparse.ArgumentTypeError(f"{name!r} is a {type(obj).__name__}, not a class; give a layer class "
                                         "as module:Class")
    try:
        layer = obj(4)
    except Exception as exc:
        raise argparse.ArgumentTypeError(f"{name!r} cannot be built as a norm layer: {qual}(num_features) "
                                         f"failed ({type(exc).__name__}: {exc})") from None
    from torch import nn

    if not isinstance(layer, nn.Module):
        raise argparse.ArgumentTypeError(f"{name!r} builds a {type(layer).__name__}, not a torch.nn.Module")
    return name


def _probes(text: str) -> tuple[str, ...]:
    out = tuple(_items(text))
    unknown = [p for p in out if p not in PROBES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown probe(s) {', '.join(map(repr, unknown))}; choose from "
                                         f"{', '.join(PROBES)}")
    return out


def _claim_keys(text: str) -> list[str]:
    keys = _items(text)
    known = list(CLAIM_KEYS)
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown claim(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                                         f"choose from {', '.join(known)}")
    return keys


def _creatable(text: str) -> str:
    """``text``, refused when a parent on its path is a file (then it cannot be created)."""
    for parent in Path(text).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file; {text} cannot be created")
            break
    return text


def _out_dir(text: str) -> str:
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory; give a directory for the "
                                         "store and the report")
    return _creatable(text)


def _tensorboard_dir(text: str) -> str:
    """A directory for TensorBoard event files; refused at once when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise argparse.ArgumentTypeError(f"--tensorboard needs the tensorboard package, which is not installed; "
                                         f"install it with: {TENSORBOARD_INSTALL}")
    return _out_dir(text)


def _store_file(text: str) -> str:
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; the store is a file, e.g. {p / 'lab.sqlite'}")
    return _creatable(text)


def _data_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory; give the directory holding the IDX files")
    return text


_seed = _int_at_least(0, MAX_SEED)
_positive_int = _int_at_least(1)


def _add_common(p: argparse.ArgumentParser, out_default: str | None = DEFAULT_OUT) -> None:
    p.add_argument("--out", type=_out_dir, default=out_default, help="output directory (store + report)")
    p.add_argument("--store", type=_store_file, default=None, help="SQLite store to use (default OUT/lab.sqlite)")
    p.add_argument("--workers", type=_int_at_least(1, 256), default=None,
                   help="worker processes for sweeps (default: one per idle CPU, i.e. CPUs minus load average; "
                        "1 = in-process)")
    p.add_argument("--data-dir", type=_data_dir, default=None,
                   help="directory with the IDX files (fashion-mnist, mnist, idx; default: Debian's directory, "
                        "the cache or a verified download)")
    p.add_argument("--limit", type=_int_at_least(2), default=None,
                   help="use at most this many training examples (>= 2; default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.add_argument("--plan", action="store_true",
                   help="show the runs still to train and their estimated time, then stop without training or "
                        "writing anything (claims: the current round; later rounds depend on its results)")
    p.add_argument("--no-report", action="store_true", help="do not rebuild the HTML report")
    p.add_argument("--csv", type=_out_dir, default=None, metavar="DIR",
                   help="also write the command's tables as CSV files into DIR, and curves.csv (one row per run "
                        "and evaluation)")
    p.add_argument("--tensorboard", type=_tensorboard_dir, default=None, metavar="DIR",
                   help="also log every run's curves as TensorBoard scalars under DIR/<run> (needs tensorboard: "
                        f"{TENSORBOARD_INSTALL}); view with: tensorboard --logdir DIR")
    p.add_argument(
        "--executor", choices=EXECUTORS, default=None,
        help="where runs are trained: 'local' worker processes (default: local; ray when --address is given) or "
             f"'ray' tasks (optional extra: {RAY_INSTALL}); with ray and no --address, a local Ray instance on "
             "--workers CPUs. The store is written by this process only",
    )
    p.add_argument(
        "--address", default=None, metavar="ADDRESS",
        help="address of a running Ray cluster (HOST:6379, ray://HOST:10001 or auto; implies --executor ray; "
             "default: none, or $RAY_ADDRESS with --executor ray). The nodes need batchnorm installed, not the data",
    )


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer (default: the model's recipe)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="examples per step (>= 1; default: the model's recipe)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps (>= 1; default: the model's recipe)")
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="steps between evaluations (>= 1; default: steps / 40)")


def _add_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist1d", type=_dataset, metavar="DATASET",
                   help=f"{{{', '.join(DATASETS)}}} or your own data: a .npz file (x_train, y_train, optional "
                        "x_val, y_val, x_test, y_test), a .csv file (with --label) or an ImageFolder directory")
    p.add_argument("--task", default="classification", choices=TASKS,
                   help="your own data: classification (cross-entropy) or regression (MSE)")
    p.add_argument("--label", default=None, metavar="COLUMN",
                   help="CSV data: the label column (default: the column named label, target, y or class)")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_lab_commands(sub) -> dict[str, argparse.ArgumentParser]:
    models = ", ".join(MODELS)
    datasets = ", ".join(DATASETS)
    norm_help = f"{{{', '.join(NORMS)}}} or any layer class as module:Class (built as Class(num_features))"
    parsers = {}

    p = sub.add_parser(
        "train", help="train one model (with or without BN) and store the run",
        usage="batchnorm train [--dataset DATASET] [--model MODEL] [--norm NORM] [--steps N] [--lr LR] [options]",
        description="Train one model on one dataset and store the run (reused when run again).",
        epilog=_examples("batchnorm train --model cnn --norm batchnorm --steps 2000",
                         "batchnorm train --model mypkg.models:build --dataset data.npz --norm none",
                         "batchnorm train --model mypkg.models:build --dataset data.csv --label species --json"))
    _add_dataset(p)
    p.add_argument("--model", default="mlp", type=_model, metavar="MODEL",
                   help=f"{{{models}}} or your model factory as module:function")
    p.add_argument("--norm", type=_norm, default="batchnorm", metavar="NORM", help=norm_help)
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (> 0; default: the model's recipe)")
    p.add_argument("--seed", type=_seed, default=0, help=f"0..{MAX_SEED}")
    p.add_argument("--depth", type=_int_at_least(1, 10000), default=None, help="depth of deep-mlp / resnet-mlp")
    p.add_argument("--width", type=_int_at_least(1, 100000), default=None,
                   help="width of mlp / deep-mlp / resnet-mlp")
    p.add_argument("--skipinit", action="store_true", help="resnet-mlp: SkipInit residual scalars")
    p.add_argument("--virtual-batch-size", type=_positive_int, default=None, help="ghost BN virtual batch size")
    p.add_argument("--probes", type=_probes, default=(), help=f"comma list of {{{', '.join(PROBES)}}}")
    _add_training(p)
    _add_common(p)
    parsers["train"] = p

    p = sub.add_parser(
        "compare", help="the same model with and without BN over learning rates and seeds",
        usage="batchnorm compare [--dataset DATASET] [--model MODEL[,MODEL]] [--norms NORMS] [--lrs LRS] "
              "[--seeds SEEDS] [options]",
        description="Train each model with each norm at each learning rate and seed; the best learning rate of "
                    "each norm is chosen on validation, and its test accuracy (at the best validation checkpoint) "
                    "reported.",
        epilog=_examples("batchnorm compare --model mlp,cnn --lrs 0.001,0.01,0.1 --seeds 0,1,2",
                         "batchnorm compare --model mypkg.models:build --dataset data.npz",
                         "batchnorm compare --model mypkg.models:build --dataset data.csv --label price "
                         "--task regression"))
    _add_dataset(p)
    p.add_argument("--model", type=_list_of(_model, "models"), default=["mlp"], metavar="MODEL[,MODEL]",
                   help=f"one or more (comma separated) of {{{models}}}, or your model factory as module:function")
    p.add_argument("--norms", type=_list_of(_norm, "norms"), default=["none", "batchnorm"], metavar="NORMS",
                   help=f"comma list; each {norm_help}")
    p.add_argument("--lrs", type=_list_of(_positive_float, "learning rates"), default=None,
                   help="learning rates > 0 (default: the model's recipe LR)")
    p.add_argument("--seeds", type=_list_of(_seed, "seeds"), default=[0, 1, 2], help="comma list of seeds")
    p.add_argument("--batch-sizes", type=_list_of(_positive_int, "batch sizes"), default=None,
                   help="batch-size grid (default: --batch-size or the recipe's)")
    p.add_argument("--target", type=_fraction, default=None,
                   help="target validation accuracy for 'steps to target', in (0, 1] (default: 0.5 for mlp on "
                        "mnist1d, else 0.8)")
    _add_training(p)
    _add_common(p)
    parsers["compare"] = p

    p = sub.add_parser(
        "figure1", help="Ioffe & Szegedy Figure 1: paper-mlp with/without BN, percentiles",
        usage="batchnorm figure1 [--dataset DATASET] [--steps N] [options]",
        description="Ioffe & Szegedy (2015) Figure 1: test accuracy and the 15/50/85th percentiles of a "
                    "last-layer sigmoid's input, with and without BN.",
        epilog=_examples("batchnorm figure1 --steps 3000",
                         "batchnorm figure1 --dataset fashion-mnist --steps 5000 --out fig1"))
    p.add_argument("--dataset", default="mnist1d", type=_builtin_dataset, metavar="DATASET",
                   help=f"{{{datasets}}}")
    p.add_argument("--steps", type=_positive_int, default=3000, help="training steps (>= 1)")
    p.add_argument("--seed", type=_seed, default=0, help=f"0..{MAX_SEED}")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (> 0; default: 0.5, the paper's)")
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="steps between evaluations (>= 1; default: steps / 50)")
    _add_common(p)
    parsers["figure1"] = p

    p = sub.add_parser(
        "claims", help="test every claim of the seed articles; verdicts with effect sizes",
        usage="batchnorm claims [--quick | --full | --tiny] [--dataset D[,D]] [--only CLAIM[,CLAIM]] [options]",
        description="Every claim about BN as an experiment: each arm's learning rate tuned on validation, a "
                    "paired bootstrap interval and a Holm-corrected verdict.",
        epilog=_examples("batchnorm claims --tiny --dataset mnist1d --out smoke",
                         "batchnorm claims --quick --out claims",
                         "batchnorm claims --only faster,accuracy --model mypkg.models:build --dataset data.npz"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick",
                   help="5 seeds, the main conditions (the default; 9-17 min on 2 idle cores)")
    g.add_argument("--full", dest="mode", action="store_const", const="full",
                   help="10 seeds, every condition, longer and deeper (hours)")
    g.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="smoke test (seconds)")
    p.set_defaults(mode="quick")
    p.add_argument("--dataset", type=_list_of(_dataset, "datasets"), default=["mnist1d", "fashion-mnist"],
                   metavar="D[,D]", help=f"comma list of {{{datasets}}}; or one dataset of your own (a .npz, a .csv "
                                          "or an ImageFolder directory)")
    p.add_argument("--model", type=_model, default=None, metavar="MODULE:FUNCTION",
                   help="your model factory: the claims that make sense on any model "
                        f"({', '.join(PORTABLE_CLAIMS)}) are run on it instead of the reference MLP")
    p.add_argument("--label", default=None, metavar="COLUMN", help="CSV data: the label column")
    p.add_argument("--only", type=_claim_keys, default=None, metavar="CLAIM[,CLAIM]",
                   help=f"comma list of {{{', '.join(CLAIM_KEYS)}}} (default: all; on your model or data: "
                        f"{', '.join(PORTABLE_CLAIMS)})")
    _add_common(p)
    parsers["claims"] = p

    p = sub.add_parser(
        "demo", help="Figure 1 + with/without comparison on MNIST-1D (< 5 min), then report",
        usage="batchnorm demo [--quick] [options]",
        description="Figure 1 and the MNIST-1D reference MLP and CNN with and without BN, then the report.",
        epilog=_examples("batchnorm demo", "batchnorm demo --quick --out /tmp/demo"))
    p.add_argument("--quick", action="store_true", help="a much shorter demo (smoke test)")
    _add_common(p)
    parsers["demo"] = p

    p = sub.add_parser(
        "report", help="rebuild the HTML report from the stored results",
        usage="batchnorm report [DIR] [--store PATH] [--json]",
        description="Rebuild report.html, the PNGs and summary.json from DIR/lab.sqlite.",
        epilog=_examples("batchnorm report bn-report", "batchnorm report claims --json"))
    p.add_argument("dir", nargs="?", type=_out_dir, default=DEFAULT_OUT, help="output directory of a lab command")
    p.add_argument("--store", type=_store_file, default=None, help="SQLite store to use (default: DIR/lab.sqlite)")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    parsers["report"] = p
    return parsers


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the sub-commands' parsers (stdlib only: no torch import)."""
    parser = _Parser(
        prog="batchnorm",
        description="Batch normalization lab: train with and without BN, test the claims, benchmark kernels.",
        epilog=_examples("batchnorm demo                      # Figure 1 + with/without BN on MNIST-1D",
                         "batchnorm compare --model mypkg.models:build --dataset data.npz",
                         "batchnorm claims --quick --out claims",
                         "batchnorm COMMAND --help            # a command's options and examples"),
    )
    parser.add_argument("--version", action="version", version=f"batchnorm {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parsers = _add_lab_commands(sub)
    from .bench_args import DESCRIPTION, add_arguments

    p = sub.add_parser(
        "bench", help="time our batch-norm kernels against torch's native ones", description=DESCRIPTION,
        epilog=_examples("batchnorm bench                                  # (32,64,56,56), both layouts",
                         "batchnorm bench --shape 256,100 --shape 64,64,8,8 --threads 2",
                         "batchnorm bench --passes backward --repeats 100 --out bench.json"))
    add_arguments(p)
    parsers["bench"] = p
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    """Parse (no torch import), then run the command through :func:`batchnorm.cli.run`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            parsers.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help/--version (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from batchnorm.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
