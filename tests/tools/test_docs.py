"""The Python examples of docs/tools.md run as written (each block on its own)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "tools.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_docs_have_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_docs_tools_example_runs(i, capsys):
    exec(compile(BLOCKS[i], f"docs/tools.md[python block {i}]", "exec"), {})
    out = capsys.readouterr().out
    for expected in re.findall(r"# (True|BatchNorm2d SyncBatchNorm BatchNorm2d FrozenBatchNorm2d|fold: .*)$",
                               BLOCKS[i], flags=re.M):
        assert expected in out
