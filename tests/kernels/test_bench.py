"""The ``batchnorm bench`` command runs end to end on a tiny shape and writes its JSON (no timing checks)."""

import json

import torch

from batchnorm import bench, cli


def test_bench_command_writes_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shape", "2,3,8,8", "--repeats", "2", "--threads", "1", "--out", str(out),
                   "--quiet", "--no-malloc-reuse"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert not (tmp_path / "bench.json.tmp").exists()
    passes = {(r["layout"], r["pass"]) for r in data["rows"]}
    assert passes == {(layout, p) for layout in ("contiguous", "channels_last") for p in bench.PASSES}
    for r in data["rows"]:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0 and r["floor_bytes"] > 0
    assert data["copy_gbps"] > 0
    assert "torch ms / ours ms" in capsys.readouterr().out
    assert torch.get_num_threads() == threads


def test_bench_rejects_unknown_pass(capsys):
    assert cli.main(["bench", "--shape", "2,3,4,4", "--passes", "nope", "--no-malloc-reuse"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass(es) 'nope'" in err and "usage: batchnorm bench" in err


def test_bench_json_is_the_last_line_and_writes_no_file_uninvited(tmp_path, monkeypatch, capsys):
    """``--json`` means what it means in the lab: the last stdout line is the JSON object (the table and
    progress go to stderr); without ``--out`` nothing is written to the working directory."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "--shape", "4,3", "--repeats", "1", "--threads", "1", "--passes", "eval", "--json",
                     "--dtype", "float32,float64", "--no-malloc-reuse"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out.strip().splitlines()[-1])
    assert [(r["pass"], r["dtype"]) for r in data["rows"]] == [("eval", "float32"), ("eval", "float64")]
    assert data["rows"][0]["shape"] == [4, 3]
    assert "torch ms / ours ms" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_bench_help_and_bad_values_do_not_import_torch():
    """``batchnorm bench --help`` is answered by the stdlib-only front (no torch import), with defaults and
    examples; so is a bad value."""
    import subprocess
    import sys

    code = ("import sys, batchnorm_cli; rc = batchnorm_cli.main(sys.argv[1:]); "
            "print('torch' in sys.modules, file=sys.stderr); raise SystemExit(rc)")
    for argv, rc in ((["bench", "--help"], 0), (["bench", "--repeats", "0"], 2), (["bench", "--jsn"], 2)):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == rc, r.stderr
        assert r.stderr.strip().endswith("False"), r.stderr
        if rc == 0:
            assert "(default: 30)" in r.stdout and "--out FILE" in r.stdout and "examples:" in r.stdout
        else:
            assert "usage: batchnorm bench" in r.stderr
    assert "did you mean --json" in r.stderr


def test_network_bench_runs_on_a_tiny_stack(tmp_path, capsys):
    """benchmarks/network_bench.py end to end: both stacks timed, per-call BN times found in the
    profile, threads restored (no timing checks)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "network_bench.py"
    spec = importlib.util.spec_from_file_location("network_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    out = tmp_path / "net.json"
    assert module.main(["--shape", "4,3,6,6", "--layers", "1", "--repeats", "2", "--threads", "1",
                        "--out", str(out), "--no-malloc-reuse"]) == 0
    data = json.loads(out.read_text())
    for key in ("train_step_ms", "inference_ms"):
        assert data[key]["torch"] > 0 and data[key]["ours"] > 0
    for side in ("torch", "ours"):
        assert data["bn_call_us"][side]["forward_us"] > 0 and data["bn_call_us"][side]["backward_us"] > 0
    assert "training step" in capsys.readouterr().out
    assert torch.get_num_threads() == threads
