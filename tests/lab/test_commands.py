"""Short versions of every command on tiny data, with the JSON schemas of their last line."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess

import pytest

from batchnorm.cli import main


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert out, "no output"
    return json.loads(out[-1])


def _num(x):
    return isinstance(x, int | float) and not isinstance(x, bool)


def test_train_json(tmp_path, capsys):
    args = ["train", "--model", "mlp", "--norm", "batchnorm", "--steps", "20", "--limit", "300",
            "--out", str(tmp_path), "--json"]
    assert main(args) == 0
    r = _last_json(capsys)
    assert _num(r["test_accuracy"]) and 0 <= r["test_accuracy"] <= 1
    assert _num(r["train_loss"]) and r["steps"] == 20 and r["diverged"] is False and _num(r["seconds"])
    assert r["reused"] is False
    # identical configuration: reused, not retrained
    assert main(args) == 0
    r2 = _last_json(capsys)
    assert r2["reused"] is True and r2["test_accuracy"] == r["test_accuracy"]


def test_train_any_layer_class_and_divergence(tmp_path, capsys):
    assert main(["train", "--model", "mlp", "--norm", "torch.nn:LayerNorm", "--steps", "5", "--limit", "200",
                 "--out", str(tmp_path), "--json"]) == 0
    assert _last_json(capsys)["steps"] == 5
    assert main(["train", "--model", "mlp", "--norm", "none", "--optimizer", "sgd", "--lr", "1e4", "--steps", "40",
                 "--limit", "200", "--out", str(tmp_path), "--json"]) == 0
    assert _last_json(capsys)["diverged"] is True


def test_train_missing_data_is_a_clean_error(tmp_path, capsys, monkeypatch):
    from batchnorm.lab import sources

    monkeypatch.setattr(sources, "_find_local", lambda *a: None)
    monkeypatch.setattr(sources, "_urlopen", lambda url: (_ for _ in ()).throw(OSError("offline")))
    # a runtime failure (the data is missing), not a usage error: exit code 1, one line, nothing stored
    assert main(["train", "--dataset", "mnist", "--steps", "2", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: dataset 'mnist' is not available") and "Traceback" not in err
    assert not (tmp_path / "lab.sqlite").exists()


def test_claims_without_fashion_mnist_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    """The default claims run needs Fashion-MNIST: where it is missing, one line naming the Debian package,
    before any run is trained or stored."""
    from batchnorm.lab import data as D
    from batchnorm.lab import sources

    monkeypatch.setattr(sources, "_find_local", lambda *a: None)
    monkeypatch.setattr(sources, "_urlopen", lambda url: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setattr(D, "_RAW_MEMO", {})
    assert main(["claims", "--tiny", "--only", "accuracy", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "dataset 'fashion-mnist' is not available" in err and "apt-get install dataset-fashion-mnist" in err
    assert "Traceback" not in err and not (tmp_path / "lab.sqlite").exists()


def test_compare_every_norm(tmp_path, capsys):
    assert main(["compare", "--model", "cnn", "--norms", "none,batchnorm,ghost,renorm,frozen,groupnorm,layernorm,noisy",
                 "--seeds", "0",
                 "--steps", "6", "--batch-size", "32", "--limit", "200", "--workers", "1", "--no-report",
                 "--out", str(tmp_path), "--json"]) == 0
    r = _last_json(capsys)
    assert [row["norm"] for row in r["rows"]] == sorted(["none", "batchnorm", "ghost", "renorm", "frozen", "groupnorm",
                                                         "layernorm", "noisy"])


def test_figure1_json_schema(tmp_path, capsys):
    assert main(["figure1", "--steps", "20", "--eval-every", "5", "--limit", "300", "--out", str(tmp_path),
                 "--json"]) == 0
    r = _last_json(capsys)
    assert [run["norm"] for run in r["runs"]] == ["none", "batchnorm"]
    for run in r["runs"]:
        assert run["steps"] == [0, 5, 10, 15, 20]
        assert len(run["test_accuracy"]) == 5 and all(_num(a) for a in run["test_accuracy"])
        assert set(run["percentiles"]) == {"p15", "p50", "p85"}
        for k in ("p15", "p50", "p85"):
            assert len(run["percentiles"][k]) == 5
        assert all(a <= b <= c for a, b, c in zip(*(run["percentiles"][k] for k in ("p15", "p50", "p85"))))
    assert (tmp_path / "report.html").is_file()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian `chromium`) not installed")
def test_report_renders_in_headless_chromium(tmp_path, capsys):
    """The self-contained report renders offline: the findings box at the top (its blue frame and the coloured
    verdict bars of its lines), and below it the embedded plots; at desktop and at phone width."""
    import numpy as np
    from matplotlib.image import imread

    assert main(["figure1", "--steps", "10", "--eval-every", "5", "--limit", "200", "--out", str(tmp_path)]) == 0
    assert main(["compare", "--model", "mlp", "--seeds", "0,1", "--steps", "10", "--limit", "200", "--workers", "1",
                 "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert '<section id="findings">' in html and 'name="viewport"' in html

    def shot(width: int, height: int) -> np.ndarray:
        path = tmp_path / f"shot-{width}.png"
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", f"--screenshot={path}", (tmp_path / "report.html").as_uri()],
                       check=True, capture_output=True, timeout=120)
        return imread(path)[..., :3]

    def near(px: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
        return (np.abs(px - np.array(rgb) / 255).max(axis=-1) < 0.08)

    for width, height in ((1200, 1400), (390, 1600)):
        px = shot(width, height)
        top = px[: height // 2]
        frame = near(top, (0x1F, 0x77, 0xB4)).sum()  # the findings box's frame, in the top half
        bars = near(top, (0xFF, 0xBF, 0x47)).sum() + near(top, (0x2C, 0xA0, 0x2C)).sum() + near(
            top, (0xD6, 0x27, 0x28)).sum()  # the verdict bars of its lines
        assert frame > 200 and bars > 50, (width, frame, bars)
        dark = (px.mean(axis=-1) < 0.5).mean()  # text, axes and curves
        colored = (px.std(axis=-1) > 0.15).mean()  # the red/blue curves of the embedded plots
        assert dark > 0.005 and colored > 0.0005, (width, dark, colored)
        # nothing wider than the window: the page does not scroll sideways at phone width
        assert px.shape[1] == width


def test_compare_and_report(tmp_path, capsys):
    assert main(["compare", "--model", "mlp", "--lrs", "0.01,0.1", "--seeds", "0,1", "--steps", "10", "--limit", "200",
                 "--workers", "1", "--out", str(tmp_path), "--json"]) == 0
    r = _last_json(capsys)
    assert len(r["rows"]) == 4  # 2 norms x 2 lrs, 2 seeds each
    assert all(row["seeds"] == 2 for row in r["rows"])
    assert {s["norm"] for s in r["summary"]} == {"none", "batchnorm"}
    con = sqlite3.connect(tmp_path / "lab.sqlite")
    assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 8
    (tmp_path / "report.html").unlink()
    assert main(["report", str(tmp_path), "--json"]) == 0
    rep = _last_json(capsys)
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "With and without BN: mlp on MNIST-1D" in html
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the findings box says what the terminal said: the same lines
    assert [f["text"] for f in r["findings"]] == summary["findings"][0]["lines"]
    assert all(line in html for line in summary["findings"][0]["lines"])
    assert r["findings"][0]["n_seeds"] == 2 and len(r["findings"][0]["ci95"]) == 2
    assert summary["experiments"][0]["kind"] == "compare" and summary["pngs"]
    assert rep["report"].endswith("report.html")
    assert main(["report", str(tmp_path / "nothing")]) == 2


def _fashion_or_skip() -> None:
    from batchnorm.lab.data import DataUnavailable, data_identity

    try:
        data_identity("fashion-mnist")
    except DataUnavailable as exc:
        if os.environ.get("BATCHNORM_REQUIRE_DATA"):
            raise
        pytest.skip(str(exc))


def test_claims_tiny(tmp_path, capsys):
    """The ``claims --json`` contract: per claim its datasets; per condition the dataset, effect, 95%
    interval, seeds, minimum effect, one of three verdicts and the learning rate of each arm with how it was
    chosen. Tiny mode has 2 seeds: every verdict is inconclusive (fewer than 5 seeds never decide)."""
    _fashion_or_skip()
    assert main(["claims", "--tiny", "--only", "accuracy,gradients,running-stats", "--workers", "1",
                 "--dataset", "mnist1d,fashion-mnist", "--out", str(tmp_path), "--json"]) == 0
    r = _last_json(capsys)
    assert [c["key"] for c in r["claims"]] == ["accuracy", "gradients", "running-stats"]
    for c in r["claims"]:
        assert c["datasets"] == ["mnist1d", "fashion-mnist"]
        assert c["verdict"] in ("supported", "contradicted", "inconclusive", "depends")
        assert c["evidence"] and c["unit"] and c["min_effect"] > 0
        for cond in c["conditions"]:
            assert cond["dataset"] in c["datasets"] and cond["condition"]
            assert cond["n_seeds"] == 2 and len(cond["effects"]) == 2 and cond["verdict"] == "inconclusive"
            lo, hi = cond["ci95"]
            assert lo <= cond["effect"] <= hi and cond["min_effect"] == c["min_effect"]
            assert cond["lr"]["selected_on"]
            arms = {k: v for k, v in cond["lr"].items() if k not in ("selected_on", "tuning")}
            assert arms and all(v > 0 for v in arms.values())
    acc = r["claims"][0]["conditions"]
    tuned = [x for x in acc if x["lr"]["selected_on"] == "validation"]
    shared = [x for x in acc if "shared lr" in x["condition"]]
    assert tuned and shared and all(x["lr"]["none"] == x["lr"]["batchnorm"] for x in shared)
    html = (tmp_path / "report.html").read_text()
    assert "Claims" in html and "inconclusive" in html and "95%" in html


@pytest.mark.slow
def test_claims_tiny_all(tmp_path, capsys):
    assert main(["claims", "--tiny", "--out", str(tmp_path), "--json"]) == 0
    from batchnorm.lab.experiments import CLAIMS

    assert len(_last_json(capsys)["claims"]) == len(CLAIMS)


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--workers", "1", "--out", str(tmp_path), "--json"]) == 0
    r = _last_json(capsys)
    assert r["report"].endswith("report.html") and _num(r["seconds"])
    assert {row["model"] for row in r["compare"]} == {"mlp", "cnn"}
    assert [s["norm"] for s in r["figure1"]["runs"]] == ["none", "batchnorm"]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.html", "summary.json", "lab.sqlite"} <= names
    assert any(n.startswith("figure1-mnist1d-") and n.endswith(".png") for n in names)


def test_progress_lines_when_the_output_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """Under a log file, a pipe or CI, rich draws no bar: a sweep of hours would print nothing until it
    ends. It prints plain progress lines instead (here one per run: the interval is set to 0) with the
    count, the time so far and an estimate of the time left, the last one with the total."""
    from batchnorm.lab import commands

    monkeypatch.setattr(commands, "PLAIN_PROGRESS_EVERY", 0.0)
    argv = ["compare", "--model", "mlp", "--seeds", "0,1", "--steps", "5", "--limit", "200", "--workers", "1",
            "--out", str(tmp_path / "o"), "--no-report", "--json"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("compare: ")]
    assert [ln.split(" runs")[0] for ln in lines] == [f"compare: {i}/4" for i in range(1, 5)], err
    assert "eta" in lines[0] and "eta" not in lines[-1] and "mlp/" in lines[-1]


def test_plain_progress_estimates_the_time_left_by_cost_not_by_count(monkeypatch):
    """Sweeps start with their longest runs: after one run of cost 3 out of a total of 6 (three more
    runs of cost 1), the time left is the time so far, not three times it as a count would say; runs
    reused from the store cost nothing."""
    from rich.console import Console

    from batchnorm.lab import commands

    clock = iter([0.0, 60.0, 70.0, 80.0, 90.0])
    monkeypatch.setattr(commands.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(commands, "PLAIN_PROGRESS_EVERY", 0.0)
    console = Console(record=True, force_terminal=False, width=200)
    progress = commands._PlainProgress(console, "claims", 5, cost=6.0)
    for info, cost in (("long", 3.0), ("reused", 0.0), ("a", 1.0), ("b", 1.0)):
        progress.done(info, cost)
    lines = console.export_text().splitlines()
    assert lines[0] == "claims: 1/5 runs, 1m00s, eta 1m00s; last long", lines
    assert lines[1] == "claims: 2/5 runs, 1m10s, eta 1m10s; last reused", lines
    assert lines[3] == "claims: 4/5 runs, 1m30s, eta 0m18s; last b", lines


def test_plain_progress_says_a_long_sweep_still_runs(monkeypatch):
    """A sweep's first runs are its longest (~10 minutes in claims --full): in plain output a line says
    it still runs when no run has finished for a while, and none comes after stop()."""
    import time

    from rich.console import Console

    from batchnorm.lab import commands

    monkeypatch.setattr(commands, "PLAIN_HEARTBEAT", 0.05)
    monkeypatch.setattr(commands, "PLAIN_PROGRESS_EVERY", 0.0)
    console = Console(record=True, force_terminal=False, width=200)
    progress = commands._PlainProgress(console, "claims", 3, cost=30.0)
    progress.start()
    time.sleep(0.5)
    progress.done("first", 10.0)
    progress.stop()
    time.sleep(0.2)
    lines = console.export_text().splitlines()
    assert lines and lines[0] == "claims: 0/3 runs, 0m00s; running", lines
    assert sum(line == "claims: 0/3 runs, 0m00s; running" for line in lines) >= 2, lines
    assert any(line.startswith("claims: 1/3 runs") and line.endswith("; last first") for line in lines), lines
    time.sleep(0.3)
    assert console.export_text().splitlines() == [], "a line after stop()"


def test_plan_shows_what_is_left_and_changes_nothing(tmp_path, capsys):
    """``--plan``: the runs still to train and their estimated time, exit 0, nothing trained or written
    (no store created in a fresh directory; an existing store byte for byte as it was)."""
    out = tmp_path / "lab"
    common = ["--model", "mlp", "--norms", "none,batchnorm", "--seeds", "0,1", "--steps", "4", "--limit", "200",
              "--workers", "1", "--out", str(out)]
    assert main(["compare", *common, "--plan", "--json"]) == 0
    plan = _last_json(capsys)["plan"]
    assert (plan["runs"], plan["to_train"], plan["stored"]) == (4, 4, 0) and not out.exists()
    assert plan["groups"] == [{"dataset": "mnist1d", "model": "mlp", "runs": 4, "cpu_seconds": plan["cpu_seconds"]}]
    assert plan["cpu_seconds"] > 0 and plan["wall_seconds"] == pytest.approx(plan["cpu_seconds"])  # one worker
    assert main(["compare", *common[:3], "none", *common[4:], "--seeds", "0", "--no-report"]) == 0  # 1 run stored
    capsys.readouterr()
    before = (out / "lab.sqlite").read_bytes()
    assert main(["compare", *common, "--plan", "--json", "--workers", "2"]) == 0
    plan = _last_json(capsys)["plan"]
    assert (plan["to_train"], plan["stored"], plan["workers"]) == (3, 1, 2)
    assert plan["wall_seconds"] < plan["cpu_seconds"]  # two workers share the three runs
    assert (out / "lab.sqlite").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["lab.sqlite"]
    assert main(["claims", "--tiny", "--only", "accuracy", "--dataset", "mnist1d", "--out", str(out), "--plan",
                 "--json"]) == 0
    plan = _last_json(capsys)["plan"]
    assert plan["title"] == "claims (tiny), round 1" and plan["to_train"] > 0
    assert (out / "lab.sqlite").read_bytes() == before


def test_makespan_of_longest_first():
    from batchnorm.lab.commands import _makespan

    assert _makespan([3.0, 5.0, 3.0, 4.0, 3.0], 2) == 10.0  # 5 | 4, then 3 each to the less loaded: 5+3 | 4+3+3
    assert _makespan([1.0, 1.0], 1) == 2.0 and _makespan([], 3) == 0.0
