"""Adversarial inputs for the ``batchnorm`` command line: each is refused with one ``error:`` line naming
what was wrong, the documented exit code (2: usage error, nothing run or stored; 1: runtime failure), and
never a traceback.

To add a case, add one line to ``CASES``: ``(argv, expected exit code, fragment of the error message)``.
Placeholders in argv are filled by the ``places`` fixture:

=================  ==========================================================================
``{out}``          a fresh, empty output directory (the default ``--out`` of every case)
``{file}``         a regular file
``{tmp}``          an existing directory
``{corrupt}``      a directory whose ``lab.sqlite`` is random bytes
``{truncated}``    a directory whose ``lab.sqlite`` is a real store cut in half
``{small}``        Fashion-MNIST-named IDX files with 10x10 images
``{labels12}``     full-size (60000/10000 x 28x28) files whose labels are 12
``{fake}``         full-size files with valid labels that are not the official Fashion-MNIST
``{truncgz}``      IDX files whose training images ``.gz`` is cut in half
=================  ==========================================================================

Cases run in-process (``batchnorm.cli.main``); ``SUBPROCESS_CASES`` run the real entry point.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from batchnorm.cli import main
from batchnorm.lab import data as D
from batchnorm.lab.store import Store

TINY = ["--steps", "2", "--limit", "40"]

CASES = [
    # ---- train: option values out of range
    (["train", "--steps", "-5"], 2, "argument --steps: -5 is out of range; expected an integer >= 1"),
    (["train", "--steps", "0"], 2, "argument --steps: 0 is out of range"),
    (["train", "--steps", "abc"], 2, "argument --steps: 'abc' is not an integer"),
    (["train", "--batch-size", "-4"], 2, "argument --batch-size: -4 is out of range; expected an integer >= 1"),
    (["train", "--limit", "0"], 2, "argument --limit: 0 is out of range; expected an integer >= 2"),
    (["train", "--limit", "-5"], 2, "argument --limit: -5 is out of range"),
    (["train", "--eval-every", "-1"], 2, "argument --eval-every: -1 is out of range"),
    (["train", "--probes", "nope"], 2, "argument --probes: unknown probe(s) 'nope'; choose from percentiles"),
    (["train", "--probes", "ics,nope"], 2, "argument --probes: unknown probe(s) 'nope'"),
    (["train", "--lr", "-0.1"], 2, "argument --lr: -0.1 is out of range; expected a finite number > 0"),
    (["train", "--lr", "nan"], 2, "argument --lr: nan is out of range"),
    (["train", "--seed", "-1"], 2, "argument --seed: -1 is out of range"),
    (["train", "--workers", "0"], 2, "argument --workers: 0 is out of range"),
    (["train", "--depth", "0"], 2, "argument --depth: 0 is out of range"),
    (["train", "--model", "nope"], 2, "argument --model: unknown model 'nope'"),
    (["train", "--dataset", "cifar"], 2, "argument --dataset: unknown dataset 'cifar'"),
    # ---- train: norms
    (["train", "--norm", "nosuchmod:X"], 2, "argument --norm: cannot import 'nosuchmod:X'"),
    (["train", "--norm", "evilnorm:<img src=x onerror=alert(2)>"], 2, "argument --norm: cannot import"),
    (["train", "--norm", "torch.nn:NoSuchLayer"], 2, "cannot import 'torch.nn:NoSuchLayer'"),
    (["train", "--norm", "torch.nn:Linear"], 2, "cannot be built as a norm layer: Linear(num_features) failed"),
    (["train", "--norm", "torch.nn.functional:relu"], 2, "is a function, not a class"),
    (["train", "--norm", "nope"], 2, "argument --norm: unknown norm 'nope'"),
    # ---- paths of the wrong kind
    (["train", "--out", "{file}"], 2, "argument --out: {file} exists and is not a directory"),
    (["train", "--out", "{file}/sub"], 2, "argument --out: {file} is a file"),
    (["train", "--store", "{tmp}"], 2, "argument --store: {tmp} is a directory; the store is a file"),
    (["train", "--data-dir", "{tmp}/nowhere"], 2, "argument --data-dir: {tmp}/nowhere is not a directory"),
    (["train", "--dataset", "idx"], 2, "--dataset idx (your own IDX files) needs --data-dir DIR"),
    # ---- data files that are not the named dataset, or broken
    (["train", "--dataset", "fashion-mnist", "--data-dir", "{small}", *TINY], 1,
     "has shape 60x10x10; fashion-mnist's is 60000x28x28"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "{labels12}", *TINY], 1,
     "holds label 12; labels must be 0..9"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "{fake}", *TINY], 1,
     "is not the official fashion-mnist file"),
    (["compare", "--dataset", "fashion-mnist", "--data-dir", "{fake}", "--seeds", "0", *TINY], 1,
     "is not the official fashion-mnist file"),
    (["train", "--dataset", "idx", "--data-dir", "{truncgz}", *TINY], 1, "truncated or corrupt"),
    # ---- unusable stores
    (["train", "--out", "{corrupt}", *TINY], 1, "{corrupt}/lab.sqlite is not a usable lab store"),
    (["train", "--out", "{truncated}", *TINY], 1, "{truncated}/lab.sqlite is not a usable lab store"),
    (["compare", "--out", "{corrupt}", "--seeds", "0", *TINY], 1, "is not a usable lab store"),
    (["compare", "--out", "{truncated}", "--seeds", "0", *TINY], 1, "is not a usable lab store"),
    (["report", "{corrupt}"], 1, "{corrupt}/lab.sqlite is not a usable lab store"),
    (["report", "{truncated}"], 1, "is not a usable lab store"),
    (["report", "{file}"], 2, "exists and is not a directory"),
    (["report", "{tmp}/empty"], 2, "no lab store at {tmp}/empty/lab.sqlite"),
    (["report", "{out}", "--store", "{tmp}"], 2, "argument --store: {tmp} is a directory"),
    # ---- compare
    (["compare", "--model", "nope"], 2, "argument --model: models: unknown model 'nope'"),
    (["compare", "--model", "mlp,nope"], 2, "unknown model 'nope'"),
    (["compare", "--seeds", ""], 2, "argument --seeds: empty list"),
    (["compare", "--seeds", ","], 2, "argument --seeds: empty list"),
    (["compare", "--seeds", "0,x"], 2, "argument --seeds: seeds: 'x' is not an integer"),
    (["compare", "--target", "5"], 2, "argument --target: 5 is out of range; expected an accuracy in (0, 1]"),
    (["compare", "--target", "0"], 2, "argument --target: 0 is out of range"),
    (["compare", "--lrs", "0,0.1"], 2, "argument --lrs: learning rates: 0 is out of range"),
    (["compare", "--norms", "batchnorm,nosuchmod:X"], 2, "argument --norms: norms: cannot import 'nosuchmod:X'"),
    (["compare", "--batch-sizes", "0"], 2, "argument --batch-sizes: batch sizes: 0 is out of range"),
    # ---- figure1, claims
    (["figure1", "--steps", "0"], 2, "argument --steps: 0 is out of range"),
    (["figure1", "--eval-every", "0"], 2, "argument --eval-every: 0 is out of range"),
    (["claims", "--only", "nope"], 2, "argument --only: unknown claim(s) 'nope'"),
    # ---- bench
    (["bench", "--shape", "0,0"], 2, "argument --shape: '0,0' has an empty dimension"),
    (["bench", "--shape", "8"], 2, "argument --shape: '8' has 1 dimension(s); expected 2 to 5"),
    (["bench", "--shape", "a,b"], 2, "argument --shape: 'a,b' is not a shape"),
    (["bench", "--shape", "1,3"], 2, "argument --shape: '1,3' has one value per channel"),
    (["bench", "--repeats", "0"], 2, "argument --repeats: 0 is out of range"),
    (["bench", "--threads", "-1"], 2, "argument --threads: -1 is out of range"),
    (["bench", "--out", "{tmp}"], 2, "argument --out: {tmp} is a directory"),
    (["bench", "--out", "{tmp}/nowhere/b.json"], 2, "argument --out: the directory {tmp}/nowhere does not exist"),
    (["bench", "--json", "out.json"], 2, "unrecognized arguments: out.json"),
    (["bench", "--dtype", "int8"], 2, "argument --dtype: unknown dtype(s) 'int8'"),
    (["bench", "--passes", "nope"], 2, "argument --passes: unknown pass(es) 'nope'"),
    (["bench", "--layouts", "nhwc"], 2, "argument --layouts: unknown layout(s) 'nhwc'"),
    # ---- the command itself
    (["nope"], 2, "argument COMMAND: invalid choice: 'nope'"),
]

# The real entry point in a subprocess: exit status and stderr of the process itself.
SUBPROCESS_CASES = [
    (["compare", "--model", "nope"], 2, "unknown model 'nope'"),
    (["train", "--out", "{corrupt}", *TINY], 1, "is not a usable lab store"),
]


def _idx_set(path, side=28, n_train=60, n_test=20, labels=None, images=None):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = images[prefix] if images else rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        y = np.full(n, labels, np.uint8) if labels is not None else rng.integers(0, 10, n, dtype=np.uint8)
        D.write_idx(x, path / f"{prefix}-images-idx3-ubyte.gz")
        D.write_idx(y, path / f"{prefix}-labels-idx1-ubyte.gz")
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Files shared by the cases (built once per module)."""
    base = tmp_path_factory.mktemp("adversarial")
    (base / "file").write_text("not a directory\n")
    corrupt = base / "corrupt"
    corrupt.mkdir()
    (corrupt / "lab.sqlite").write_bytes(np.random.default_rng(0).bytes(8192))
    truncated = base / "truncated"
    truncated.mkdir()
    with Store(truncated / "lab.sqlite") as s:
        for i in range(40):
            s.put({"hash": f"h{i}", "config": {"i": i}, "result": {}, "curves": {"x": list(range(500))},
                   "init": {}, "env": {}})
    raw = (truncated / "lab.sqlite").read_bytes()
    (truncated / "lab.sqlite").write_bytes(raw[: len(raw) // 2])
    _idx_set(base / "small", side=10)
    zeros = {"train": np.zeros((60000, 28, 28), np.uint8), "t10k": np.zeros((10000, 28, 28), np.uint8)}
    _idx_set(base / "labels12", n_train=60000, n_test=10000, labels=12, images=zeros)
    _idx_set(base / "fake", n_train=60000, n_test=10000, labels=3, images=zeros)
    trunc = _idx_set(base / "truncgz", side=8)
    f = trunc / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:40])
    assert gzip.decompress((trunc / "t10k-images-idx3-ubyte.gz").read_bytes())
    return base


@pytest.fixture
def places(shared, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = ("file", "corrupt", "truncated", "small", "labels12", "fake", "truncgz")
    return {"out": str(out), "tmp": str(tmp_path), **{k: str(shared / k) for k in names}}


def _fill(argv: list[str], places: dict) -> list[str]:
    argv = [a.format(**places) for a in argv]
    if argv and argv[0] in ("train", "compare", "figure1", "claims", "demo") and "--out" not in argv:
        argv += ["--out", places["out"]]
    return argv


def _check(code: int, err: str, want_code: int, fragment: str, places: dict) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err  # one error line
    assert fragment.format(**places) in errors[0], err
    assert code == want_code, err


@pytest.mark.parametrize("argv,want_code,fragment", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_adversarial_input(argv, want_code, fragment, places, capsys):
    code = main(_fill(argv, places))
    err = capsys.readouterr().err
    _check(code, err, want_code, fragment, places)
    if want_code == 2:  # usage errors: refused before anything was run or stored
        assert not os.path.exists(os.path.join(places["out"], "lab.sqlite"))
        assert os.listdir(places["out"]) == []


@pytest.mark.parametrize("argv,want_code,fragment", SUBPROCESS_CASES, ids=[" ".join(c[0]) for c in SUBPROCESS_CASES])
def test_adversarial_input_subprocess(argv, want_code, fragment, places):
    env = {**os.environ, "BATCHNORM_BACKEND": "reference"}
    env.pop("BATCHNORM_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-m", "batchnorm.cli", *_fill(argv, places)], capture_output=True,
                          text=True, env=env, timeout=300)
    _check(proc.returncode, proc.stderr, want_code, fragment, places)


def test_unexpected_failures_are_one_line_too(tmp_path, capsys, monkeypatch):
    """A bug (any exception the lab does not expect) is still one line, exit code 1; the traceback only
    with BATCHNORM_TRACEBACK=1."""
    from batchnorm.lab import train as T

    def boom(*a, **k):
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(T, "train", boom)
    monkeypatch.setattr("batchnorm.lab.sweep.train", boom)
    argv = ["train", *TINY, "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected failure: ZeroDivisionError: simulated bug" in err
    monkeypatch.setenv("BATCHNORM_TRACEBACK", "1")
    assert main(argv) == 1
    assert "Traceback" in capsys.readouterr().err
