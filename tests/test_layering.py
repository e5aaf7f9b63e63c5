"""The package's layers import downwards only: math (functional, _ops, kernels) <- layers (nn) <-
tools <- lab and command line. Checked on the source (every import statement, at any depth, so a
function-local import counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "batchnorm"

# package part -> the parts it must never import
FORBIDDEN = {
    "kernels": ("nn", "tools", "lab", "cli", "bench", "functional", "_ops", "_act_ops"),
    "_ops": ("nn", "tools", "lab", "cli", "bench", "functional"),
    "_act_ops": ("nn", "tools", "lab", "cli", "bench", "functional"),
    "functional": ("nn", "tools", "lab", "cli", "bench"),
    "nn": ("tools", "lab", "cli", "bench"),
    "tools": ("lab", "cli", "bench"),
}


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path, source: str | None = None) -> set[str]:
    """The top-level parts of ``batchnorm`` that ``path`` (or ``source`` as if it were at ``path``)
    imports, absolute or relative."""
    tree = ast.parse(path.read_text() if source is None else source)
    package = path.relative_to(SRC).parent.parts  # e.g. ("nn",)
    parts: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("batchnorm."):
                    parts.add(alias.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("batchnorm."):
                    parts.add(node.module.split(".")[1])
                continue
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                parts.add(target[0])
            else:  # "from .. import x": x are the parts
                parts.update(alias.name for alias in node.names)
    return parts


FILES = sorted(p for p in SRC.rglob("*.py") if _part(p) in FORBIDDEN)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    bad = _imported_parts(path) & set(FORBIDDEN[_part(path)])
    assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}, a layer above it"


def test_the_check_sees_relative_imports():
    """The parser resolves ``from ..tools import x`` in ``nn/`` to ``tools`` (the check can fail)."""
    probe = SRC / "nn" / "probe.py"
    assert _imported_parts(probe, "def f():\n    from ..tools.convert import convert\n") == {"tools"}
    assert _imported_parts(probe, "from .. import lab\n") == {"lab"}
    assert _imported_parts(probe, "from .modules import _NormBase\n") == {"nn"}
