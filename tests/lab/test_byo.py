"""Your own model and data, end to end, from files a user would write: a model module, an .npz, a .csv, an
ImageFolder directory; through the command line and ``batchnorm.lab.compare``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from batchnorm.cli import main

MODULE = """
from torch import nn
import batchnorm as bn


def build(norm="none", input_shape=(8,), num_classes=3):
    # the factory places BN itself when it is asked for
    layers = [nn.Linear(input_shape[0], 32)]
    if norm == "batchnorm":
        layers.append(bn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Linear(32, num_classes)]
    return nn.Sequential(*layers)


def plain():
    # no norm argument: the lab inserts BN with batchnorm.insert
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def regressor(num_outputs=1):
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, num_outputs))
"""


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A model module on sys.path, an .npz with a test split, a .csv with string labels, a regression .npz."""
    name = f"usermodels_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 3))).argmax(1)
    np.savez(tmp_path / "data.npz", x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    with open(tmp_path / "data.csv", "w") as fh:
        fh.write(",".join([f"f{i}" for i in range(8)] + ["species"]) + "\n")
        for xi, yi in zip(x, y):
            fh.write(",".join(f"{v:.5f}" for v in xi) + f",{'abc'[yi]}\n")
    np.savez(tmp_path / "reg.npz", x_train=x, y_train=(x @ rng.normal(size=8)).astype(np.float32))
    yield {"dir": tmp_path, "module": name}


def _count(out: Path) -> int:
    import sqlite3

    with sqlite3.connect(out / "lab.sqlite") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def test_cli_compare_own_model_and_npz(user, capsys):
    out = user["dir"] / "out"
    args = ["compare", "--model", f"{user['module']}:build", "--dataset", str(user["dir"] / "data.npz"),
            "--steps", "30", "--seeds", "0,1", "--lrs", "0.003,0.03", "--workers", "1", "--out", str(out), "--json",
            "--csv", str(out / "csv")]
    assert main(args) == 0
    r = _last_json(capsys)
    # results out: the runs' curves in --json, one CSV per table and curves.csv
    assert len(r["curves"]) == 8
    assert {"hash", "norm", "lr", "seed", "step", "val_acc", "test_acc"} <= set(r["curves"][0])
    assert sorted(p.name for p in (out / "csv").iterdir()) == ["curves.csv", "findings.csv", "rows.csv", "summary.csv"]
    curves_csv = (out / "csv" / "curves.csv").read_text().splitlines()
    assert curves_csv[0].startswith("hash,model,norm")
    assert len(curves_csv) == 1 + sum(len(c["step"]) for c in r["curves"])
    assert json.loads((out / "summary.json").read_text())["experiments"][0]["curves"]
    assert {row["norm"] for row in r["rows"]} == {"none", "batchnorm"} and len(r["rows"]) == 4
    assert all(0 <= row["test_accuracy"] <= 1 for row in r["rows"])
    assert {s["selected_on"] for s in r["summary"]} == {"validation"}
    assert Path(r["report"]).is_file()
    n = _count(out)
    assert n == 8
    # the same command again: every run reused, nothing trained
    assert main(args) == 0
    _last_json(capsys)
    assert _count(out) == n


def test_factory_with_norm_argument_and_inserted_bn(user):
    from batchnorm.lab.models import build_model
    from batchnorm.nn.freeze import is_batchnorm

    def n_bn(m):
        return sum(is_batchnorm(x) for x in m.modules())

    assert n_bn(build_model(f"{user['module']}:build", (8,), 3, norm="batchnorm")) == 1
    assert n_bn(build_model(f"{user['module']}:build", (8,), 3, norm="none")) == 0
    assert n_bn(build_model(f"{user['module']}:plain", (8,), 3, norm="batchnorm")) == 1  # inserted, not on the output
    assert n_bn(build_model(f"{user['module']}:plain", (8,), 3, norm="none")) == 0


def test_cli_train_csv_with_label_and_insert(user, capsys):
    out = user["dir"] / "out"
    assert main(["train", "--model", f"{user['module']}:plain", "--norm", "batchnorm", "--dataset",
                 str(user["dir"] / "data.csv"), "--label", "species", "--steps", "40", "--out", str(out),
                 "--json"]) == 0
    r = _last_json(capsys)
    assert r["config"]["dataset"] == "csv" and r["config"]["data_kw"] == {"label": "species"}
    assert r["config"]["model_id"].startswith(f"{user['module']}:plain@sha256:")
    assert 0 <= r["test_accuracy"] <= 1 and r["steps"] == 40


def test_regression(user, capsys):
    out = user["dir"] / "out"
    assert main(["train", "--model", f"{user['module']}:regressor", "--norm", "batchnorm", "--dataset",
                 str(user["dir"] / "reg.npz"), "--task", "regression", "--lr", "0.01", "--steps", "150",
                 "--out", str(out), "--json"]) == 0
    r = _last_json(capsys)
    assert r["task"] == "regression" and r["test_mse"] >= 0 and r["test_r2"] > 0.5  # a linear target is learnt


def test_run_key_holds_data_content_and_model_source(user, tmp_path):
    from batchnorm.lab.train import RunConfig, config_hash

    def key(path, model="build"):
        return config_hash(RunConfig(model=f"{user['module']}:{model}", dataset="npz", data_dir=str(path)))

    src = user["dir"] / "data.npz"
    k = key(src)
    # the same content elsewhere: the same run
    moved = tmp_path / "elsewhere" / "copy.npz"
    moved.parent.mkdir()
    moved.write_bytes(src.read_bytes())
    assert key(moved) == k
    # other content: another run
    with np.load(src) as z:
        arrays = dict(z)
    arrays["y_train"] = arrays["y_train"][::-1].copy()
    np.savez(moved, **arrays)
    assert key(moved) != k
    # the factory's source file changed: another run
    mod = user["dir"] / f"{user['module']}.py"
    mod.write_text(mod.read_text() + "\n# edited\n")
    assert key(src) != k


def test_bad_inputs_are_one_line_errors(user, capsys):
    out = str(user["dir"] / "out")
    csv_path = str(user["dir"] / "data.csv")
    assert main(["train", "--model", f"{user['module']}:nope", "--dataset", csv_path, "--out", out]) == 2
    assert "cannot import model" in capsys.readouterr().err
    assert main(["train", "--model", f"{user['module']}:plain", "--dataset", csv_path, "--label", "specie",
                 "--out", out]) == 1
    err = capsys.readouterr().err
    assert "has no column 'specie'" in err and "did you mean 'species'" in err and "Traceback" not in err
    np.savez(user["dir"] / "bad.npz", x=np.zeros((10, 2)))
    assert main(["train", "--model", f"{user['module']}:plain", "--dataset", str(user["dir"] / "bad.npz"),
                 "--out", out]) == 1
    assert "has no x_train, y_train" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist1e", "--out", out]) == 2
    assert "did you mean 'mnist1d'" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnist1d", "--task", "regression", "--out", out]) == 2
    assert not (user["dir"] / "out" / "lab.sqlite").exists()


def test_python_api(user, tmp_path):
    import matplotlib
    import torch

    from batchnorm.lab import compare

    matplotlib.use("Agg")
    with np.load(user["dir"] / "data.npz") as z:
        data = (torch.tensor(z["x_train"]), torch.tensor(z["y_train"]), z["x_test"], z["y_test"])

    def net(num_classes=3):  # defined here, not importable by name: trains in this process
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, num_classes))

    out = tmp_path / "api"
    res = compare(net, data, lrs=[0.003, 0.03], seeds=[0, 1], steps=25, out=out)
    rows = res.table()
    assert len(rows) == 8 and {"norm", "lr", "seed", "test_accuracy", "val_accuracy"} <= set(rows[0])
    assert {r["norm"] for r in rows} == {"none", "batchnorm"}
    csv_text = res.to_csv(tmp_path / "runs.csv").read_text().splitlines()
    assert csv_text[0].startswith("model,norm,lr,batch_size,seed") and len(csv_text) == 9
    fig = res.plot()
    assert len(fig.axes) == 2
    assert res.report().is_file() and "<table>" in res._repr_html_()
    n = _count(out)
    # the same call, data as a dict of arrays and the model by name: the factory's identity differs (another
    # function), the data's does not
    again = compare(net, {"x_train": data[0].numpy(), "y_train": data[1].numpy(), "x_test": data[2],
                          "y_test": data[3]}, lrs=[0.003, 0.03], seeds=[0, 1], steps=25, out=out)
    assert _count(out) == n and [r["hash"] for r in again.table()] == [r["hash"] for r in rows]
    # a file path and an importable factory, in worker processes
    res2 = compare(f"{user['module']}:build", str(user["dir"] / "data.csv"), label="species", seeds=[0],
                   steps=10, out=out, workers=2)
    assert len(res2.table()) == 2


def test_imagefolder(tmp_path, capsys):
    tp = pytest.importorskip("tests.models._thirdparty")
    try:
        tp.import_torchvision()
    except Exception as exc:
        pytest.skip(f"torchvision not importable: {exc}")
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls, level in (("cat", 40), ("dog", 200)):
            d = tmp_path / "images" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                px = np.clip(level + rng.normal(0, 20, (6, 6, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
    from batchnorm.lab.byo import load_user_data

    ds = load_user_data("imagefolder", str(tmp_path / "images"))
    assert ds.x_train.shape[1:] == (3, 6, 6) and ds.num_classes == 2 and len(ds.y_test) == 8
    assert main(["train", "--model", "cnn2d", "--dataset", str(tmp_path / "images"), "--steps", "5",
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    assert _last_json(capsys)["config"]["dataset"] == "imagefolder"


def test_console_script_finds_a_module_in_the_working_directory(user):
    """``batchnorm compare --model mymodule:build`` from the directory holding mymodule.py (a console script
    does not have the working directory on sys.path)."""
    script = Path(sys.executable).with_name("batchnorm")
    if not script.is_file():
        pytest.skip("the batchnorm console script is not installed beside this Python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([str(script), "compare", "--model", f"{user['module']}:build", "--dataset", "data.npz",
                        "--steps", "10", "--seeds", "0", "--workers", "1", "--out", "o", "--no-report", "--json"],
                       cwd=user["dir"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout.strip().splitlines()[-1])["rows"]) == 2


def test_claims_on_your_model_and_data(user, capsys):
    """``claims --only`` with the claims that make sense on any model: run on the user's model and data; the
    others are refused with the list; the report rebuilds the same verdicts from the store."""
    out = user["dir"] / "out"
    args = ["claims", "--tiny", "--model", f"{user['module']}:plain", "--dataset", str(user["dir"] / "data.npz"),
            "--only", "accuracy,running-stats", "--workers", "1", "--out", str(out), "--json"]
    assert main(args) == 0
    r = _last_json(capsys)
    assert [c["key"] for c in r["claims"]] == ["accuracy", "running-stats"]
    conds = [c for claim in r["claims"] for c in claim["conditions"]]
    assert conds and all(c["dataset"] == "data" and f"{user['module']}:plain" in c["condition"] for c in conds)
    assert all(c["n_seeds"] == 2 for c in conds)
    html = (out / "report.html").read_text()
    assert "Claims about BN, measured" in html and f"{user['module']}:plain" in html
    assert main(["claims", "--tiny", "--model", f"{user['module']}:plain", "--dataset",
                 str(user["dir"] / "data.npz"), "--only", "ics", "--out", str(out)]) == 2
    assert "need the lab's own models" in capsys.readouterr().err


def test_tensorboard_logs_every_runs_curves(user, capsys):
    """``--tensorboard DIR``: one event file per run under DIR/<run>, each curve a scalar series whose values
    and steps are the ones in ``--json`` (read back with tensorboard's own reader)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = user["dir"] / "out", user["dir"] / "tb"
    assert main(["compare", "--model", f"{user['module']}:build", "--dataset", str(user["dir"] / "data.npz"),
                 "--steps", "20", "--seeds", "0", "--lrs", "0.003,0.03", "--workers", "1", "--out", str(out),
                 "--json", "--no-report", "--tensorboard", str(tb)]) == 0
    r = _last_json(capsys)
    assert r["tensorboard"] == str(tb)
    dirs = sorted(p.name for p in tb.iterdir())
    assert len(dirs) == len(r["curves"]) == 4
    for curve in r["curves"]:
        (run_dir,) = [d for d in dirs if d.endswith(curve["hash"][:8])]
        assert run_dir == (f"{user['module']}_build-{curve['norm']}-npz-lr{curve['lr']:g}-bs{curve['batch_size']}"
                           f"-seed0-{curve['hash'][:8]}")
        acc = EventAccumulator(str(tb / run_dir))
        acc.Reload()
        assert {"val_acc", "test_acc", "train_loss"} <= set(acc.Tags()["scalars"])
        events = acc.Scalars("test_acc")
        assert [e.step for e in events] == curve["step"]
        np.testing.assert_allclose([e.value for e in events], curve["test_acc"], rtol=1e-6)


def test_tensorboard_missing_is_a_usage_error(user, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = user["dir"] / "out"
    assert main(["train", "--model", f"{user['module']}:build", "--dataset", str(user["dir"] / "data.npz"),
                 "--steps", "5", "--out", str(out), "--tensorboard", str(user["dir"] / "tb")]) == 2
    err = capsys.readouterr().err
    assert 'needs the tensorboard package' in err and 'pip install "batchnorm[tensorboard]"' in err
    assert not out.exists() and not (user["dir"] / "tb").exists()
