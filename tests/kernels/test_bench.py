"""The ``batchnorm bench`` command runs end to end on a tiny shape and writes its JSON (no timing checks)."""

import json

import torch

from batchnorm import bench, cli


def test_bench_command_writes_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--shape", "2,3,8,8", "--repeats", "2", "--threads", "1", "--json", str(out),
                   "--quiet", "--no-malloc-reuse"])
    assert rc == 0
    data = json.loads(out.read_text())
    passes = {(r["layout"], r["pass"]) for r in data["rows"]}
    assert passes == {(layout, p) for layout in ("contiguous", "channels_last") for p in bench.PASSES}
    for r in data["rows"]:
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0 and r["floor_bytes"] > 0
    assert data["copy_gbps"] > 0
    assert "torch/ours" in capsys.readouterr().out
    assert torch.get_num_threads() == threads


def test_bench_rejects_unknown_pass(capsys):
    assert cli.main(["bench", "--shape", "2,3,4,4", "--passes", "nope", "--json", "", "--no-malloc-reuse"]) == 2


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
                        "--json", str(out), "--no-malloc-reuse"]) == 0
    data = json.loads(out.read_text())
    for key in ("train_step_ms", "inference_ms"):
        assert data[key]["torch"] > 0 and data[key]["ours"] > 0
    for side in ("torch", "ours"):
        assert data["bn_call_us"][side]["forward_us"] > 0 and data["bn_call_us"][side]["backward_us"] > 0
    assert "training step" in capsys.readouterr().out
    assert torch.get_num_threads() == threads
