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
