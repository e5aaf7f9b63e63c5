"""benchmarks/claims_table.py: the Markdown claims table from ``batchnorm claims --json`` output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "claims_table.py"
_spec = importlib.util.spec_from_file_location("claims_table", _PATH)
claims_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims_table)  # type: ignore[union-attr]


def _payload():
    cond = {"condition": "mlp, Adam", "dataset": "mnist1d", "effect": 1.234, "ci95": [-0.5, 2.96],
            "n_seeds": 10, "min_effect": 1.0, "verdict": "inconclusive"}
    censored = dict(cond, dataset="fashion-mnist", effect=None, ci95=None, verdict="contradicted")
    return {"claims": [{"key": "accuracy", "claim": "BN improves accuracy", "verdict": "depends",
                        "unit": "pp test accuracy gained", "min_effect": 1.0, "datasets": ["mnist1d"],
                        "conditions": [cond, censored]}],
            "mode": "full", "seconds": 3600.0}


def test_the_table_has_a_row_per_claim_and_every_condition(tmp_path):
    log = tmp_path / "claims.log"
    log.write_text("claims (full), round 1: 3/3 runs\n" + json.dumps(_payload()) + "\n", encoding="utf-8")
    assert claims_table.main([str(log)]) == 0
    text = claims_table.markdown(claims_table.last_json(log.read_text(encoding="utf-8")))
    lines = text.splitlines()
    assert lines[0].startswith("| claim | verdict |")
    assert lines[2] == ("| BN improves accuracy (pp test accuracy gained; claimed ≥ 1) | **depends** | "
                        "mnist1d, mlp, Adam: +1.23 [-0.50, +2.96] inconclusive<br>"
                        "fashion-mnist, mlp, Adam: n/a [n/a, n/a] contradicted |")
    assert lines[-1] == "1 claims, 2 conditions, `--full`."


def test_the_summary_counts_each_claims_verdicts(tmp_path, capsys):
    log = tmp_path / "claims.log"
    log.write_text(json.dumps(_payload()) + "\n", encoding="utf-8")
    assert claims_table.main(["--summary", str(log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| claim | verdict | conditions supported / contradicted / inconclusive |"
    assert lines[2] == "| BN improves accuracy | **depends** | 0 / 1 / 1 |"
    assert lines[-1] == "1 claims, 2 conditions, `--full`."


def test_no_result_line_is_an_error_not_a_traceback(tmp_path, capsys):
    log = tmp_path / "claims.log"
    log.write_text("claims (full), round 1: 3/1968 runs\n{not json\n", encoding="utf-8")
    assert claims_table.main([str(log)]) == 2
    assert "no claims --json result line" in capsys.readouterr().err
    with pytest.raises(ValueError):
        claims_table.last_json("")
