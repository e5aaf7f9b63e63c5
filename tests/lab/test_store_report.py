"""What the store guarantees: a run is keyed by its configuration *and* the identity of its data,
experiments with different parameters coexist in one --out, and the report escapes every
string that comes from the store or the command line."""

from __future__ import annotations

import hashlib
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from batchnorm.cli import main
from batchnorm.lab import data as D
from batchnorm.lab import sources
from batchnorm.lab.report import build_report
from batchnorm.lab.store import Store

TINY = ["--model", "mlp", "--norm", "none", "--steps", "2", "--limit", "30", "--json"]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_ID = "sha256:17ab7fb6d77d6a8863aac2f8bb416e6c"


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _write_set(path: Path, seed: int, n_train=60, n_test=20, side=6) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        D.write_idx(rng.integers(0, 256, (n, side, side), dtype=np.uint8), path / f"{prefix}-images-idx3-ubyte.gz")
        D.write_idx(rng.integers(0, 10, n, dtype=np.uint8), path / f"{prefix}-labels-idx1-ubyte.gz")
    return path


@pytest.fixture
def official_fashion(tmp_path, monkeypatch):
    """A tiny stand-in for Fashion-MNIST: its files are installed where Debian puts them and declared the
    official ones (published MD5s monkeypatched), so the CLI runs its real checks on little data."""
    system = tmp_path / "system"
    official = _write_set(system / "fashion-mnist", seed=1)
    spec = dict(D._IDX_SETS["fashion-mnist"])
    spec["files"] = {k: D.IdxFile(f.name, md5=hashlib.md5((official / f.name).read_bytes()).hexdigest())
                     for k, f in spec["files"].items()}
    spec["shapes"] = {"train_x": (60, 6, 6), "train_y": (60,), "test_x": (20, 6, 6), "test_y": (20,)}
    monkeypatch.setitem(D._IDX_SETS, "fashion-mnist", spec)
    monkeypatch.setattr(sources, "SYSTEM_DATASETS", system)
    return official


def test_runs_on_other_files_are_never_reused_as_the_real_dataset(tmp_path, capsys, official_fashion):
    """`train --dataset fashion-mnist --data-dir FAKE` then the same without --data-dir must
    train anew, not answer "reused": true with the fake accuracy."""
    out = str(tmp_path / "out")
    fake = _write_set(tmp_path / "fake", seed=2)  # same shapes and names, other content
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fake), *TINY, "--out", out]) == 1
    assert "is not the official fashion-mnist file" in capsys.readouterr().err
    assert not (Path(out) / "lab.sqlite").exists()  # refused before anything was stored

    assert main(["train", "--dataset", "fashion-mnist", *TINY, "--out", out]) == 0
    real = _last_json(capsys)
    assert real["reused"] is False and real["config"]["data_id"] == D.data_identity("fashion-mnist")
    assert main(["train", "--dataset", "fashion-mnist", *TINY, "--out", out]) == 0
    assert _last_json(capsys)["reused"] is True

    # the fake files as your own dataset: trained, under another key, never mistaken for the real one
    assert main(["train", "--dataset", "idx", "--data-dir", str(fake), *TINY, "--out", out]) == 0
    own = _last_json(capsys)
    assert own["reused"] is False and own["hash"] != real["hash"]
    assert own["config"]["data_id"] != real["config"]["data_id"]

    # the same official content somewhere else is the same data: reused
    copy = tmp_path / "copy"
    shutil.copytree(official_fashion, copy)
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(copy), *TINY, "--out", out]) == 0
    again = _last_json(capsys)
    assert again["reused"] is True and again["hash"] == real["hash"]


def test_the_key_covers_the_data(tmp_path, monkeypatch):
    """The same configuration on two versions of your own dataset: two runs, two keys."""
    from batchnorm.lab.train import RunConfig, config_hash, resolve_data

    a, b = _write_set(tmp_path / "a", seed=1), _write_set(tmp_path / "b", seed=2)
    cfg_a = resolve_data(RunConfig(dataset="idx", data_dir=str(a), steps=2))
    cfg_b = resolve_data(RunConfig(dataset="idx", data_dir=str(b), steps=2))
    assert cfg_a.data_id != cfg_b.data_id and config_hash(cfg_a) != config_hash(cfg_b)
    moved = resolve_data(RunConfig(dataset="idx", data_dir=str(shutil.copytree(a, tmp_path / "moved")), steps=2))
    assert config_hash(moved) == config_hash(cfg_a)  # where the files are is not part of the key


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist not installed")
def test_a_mislabelled_fashion_mnist_is_refused_and_the_real_one_trains(tmp_path, capsys):
    """On the real files: 10x10 "fashion-mnist" refused, the real set trained."""
    fake = _write_set(tmp_path / "fake", seed=2, side=10)
    out = str(tmp_path / "out")
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fake), *TINY, "--out", out]) == 1
    assert "has shape 60x10x10; fashion-mnist's is 60000x28x28" in capsys.readouterr().err
    assert main(["train", "--dataset", "fashion-mnist", *TINY, "--out", out]) == 0
    r = _last_json(capsys)
    assert r["reused"] is False and r["config"]["data_id"] == FASHION_ID


# ------------------------------------------------------------------------------ experiments coexist (12)


def test_experiments_in_one_out_coexist(tmp_path, capsys):
    out = str(tmp_path)
    common = ["compare", "--model", "mlp", "--steps", "2", "--limit", "30", "--workers", "1", "--out", out]
    assert main([*common, "--seeds", "0", "--no-report"]) == 0
    assert main([*common, "--seeds", "1", "--lrs", "0.1"]) == 0  # this one rebuilds the report
    capsys.readouterr()
    with Store(tmp_path / "lab.sqlite") as s:
        exps = s.experiments()
    assert len(exps) == 2 and len({e["name"] for e in exps}) == 2
    assert sorted(e["params"]["seeds"] for e in exps) == [[0], [1]]
    html = (tmp_path / "report.html").read_text()
    for e in exps:
        assert e["name"] in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len([e for e in summary["experiments"] if e["kind"] == "compare"]) == 2
    # the same command again replaces its own entry only
    assert main([*common, "--seeds", "0", "--no-report"]) == 0
    with Store(tmp_path / "lab.sqlite") as s:
        assert sorted(e["name"] for e in s.experiments()) == sorted(e["name"] for e in exps)


# ------------------------------------------------------------------------------------ HTML escaping (10)

EVIL = {
    "norm": "evilnorm:<img src=x onerror=alert(2)>",
    "script": "<script>alert(1)</script>",
    "name": 'x"><img src=x onerror=alert(3)>/../../escaped',
    "dataset": "<iframe src=javascript:alert(4)>",
}
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "code", "b", "i", "img",
                "table", "thead", "tbody", "tr", "th", "td", "br", "span", "details", "summary", "div",
                "section", "ul", "li", "a"}  # the findings box: a section of lists, links to the sections


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, list]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_report_escapes_every_stored_string(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--model", "mlp", "--seeds", "0", "--steps", "2", "--limit", "30", "--workers", "1",
                 "--no-report", "--out", str(out)]) == 0
    assert main(["train", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    with Store(out / "lab.sqlite") as s:
        exps = s.experiments()
        runs = [s.get(h) for h in s.hashes()]
        for run, norm in zip(runs, (EVIL["norm"], EVIL["script"], EVIL["script"])):
            run["config"].update(norm=norm, model="mlp", dataset=EVIL["dataset"])
            s.put(run)
        for e in exps:  # evil experiment names and parameters
            s._conn.execute("DELETE FROM experiments WHERE name=?", (e["name"],))
            s.put_experiment(f"{e['kind']}-{EVIL['name']}", e["kind"],
                             {**e["params"], "dataset": EVIL["dataset"], "lrs": [EVIL["script"]]}, e["hashes"])
        path = build_report(s, out)
    page = path.read_text()
    parser = _Tags()
    parser.feed(page)
    assert {t for t, _ in parser.tags} <= ALLOWED_TAGS, {t for t, _ in parser.tags} - ALLOWED_TAGS
    for tag, attrs in parser.tags:
        assert not any(k.startswith("on") for k, _ in attrs), (tag, attrs)
        if tag == "img":
            assert dict(attrs)["src"].startswith("data:image/png;base64,")
    text = "".join(parser.text)
    for s in EVIL.values():  # shown as text, not interpreted
        assert s in text or s.replace("/../../escaped", "") in text, s
    assert "<script>" not in page and "<img src=x" not in page
    # experiment names never become paths: every PNG is inside out/
    assert not (tmp_path / "escaped.png").exists()
    assert all(Path(p).parent == Path(".") for p in json.loads((out / "summary.json").read_text())["pngs"])
