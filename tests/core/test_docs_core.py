"""docs/core.md's Python examples run as written (in order, one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

from batchnorm import kernels

CORE = Path(__file__).resolve().parents[2] / "docs" / "core.md"


def test_core_doc_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", CORE.read_text(), flags=re.S)
    assert blocks, "docs/core.md has no python example"
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/core.md[python block {i}]", "exec"), namespace)
    finally:  # the example's backend must not stay registered for later tests
        kernels._REGISTRY.pop("mine", None)
        kernels._ORDER[:] = [kernels._REGISTRY[n][1] for n in kernels.available_backends()]
