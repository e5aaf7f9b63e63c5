"""The package's layers import downwards only: kernels <- ops (the operators) <- functional (with its
argument checks, _checks, and the layers' lean eager paths, _lean) <- nn (layers) <- tools <- lab and
command line; and only kernels, ops and functional reach into the reference backends (kernels.reference,
kernels.reference_act): everything above goes through batchnorm.functional. Checked on the source (every
import statement, at any depth, so a function-local import counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "batchnorm"

# package part -> the parts it must never import
ABOVE_FUNCTIONAL = ("nn", "tools", "lab", "cli", "bench")
FORBIDDEN = {
    "kernels": (*ABOVE_FUNCTIONAL, "functional", "_checks", "_lean", "ops"),
    "ops": (*ABOVE_FUNCTIONAL, "functional", "_checks", "_lean"),
    "_checks": (*ABOVE_FUNCTIONAL, "functional", "_lean"),
    "functional": (*ABOVE_FUNCTIONAL, "_lean"),
    "_lean": ABOVE_FUNCTIONAL,
    "nn": ("tools", "lab", "cli", "bench"),
    "tools": ("lab", "cli", "bench"),
}


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported_modules(path: Path, source: str | None = None) -> set[tuple[str, ...]]:
    """The modules of ``batchnorm`` that ``path`` (or ``source`` as if it were at ``path``) imports,
    absolute or relative, as dotted paths below ``batchnorm`` (``from .kernels import reference``
    gives both ``("kernels",)`` and ``("kernels", "reference")``: a name may be a module)."""
    tree = ast.parse(path.read_text() if source is None else source)
    package = path.relative_to(SRC).parent.parts  # e.g. ("nn",)
    modules: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("batchnorm."):
                    modules.add(tuple(alias.name.split(".")[1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module and node.module.startswith("batchnorm.")):
                    continue
                target = tuple(node.module.split(".")[1:])
            else:
                base = package[: len(package) - (node.level - 1)]
                target = (*base, *(node.module.split(".") if node.module else []))
            if target:
                modules.add(target)
            modules.update((*target, alias.name) for alias in node.names)
    return modules


def _imported_parts(path: Path, source: str | None = None) -> set[str]:
    """The top-level parts of ``batchnorm`` that ``path`` imports."""
    return {m[0] for m in _imported_modules(path, source)}


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


# the reference backends, reached only from these parts (the others call batchnorm.functional)
REFERENCE = (("kernels", "reference"), ("kernels", "reference_act"))
REFERENCE_USERS = ("kernels", "ops", "functional", "_checks", "_lean")
ALL_FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_only_the_math_layers_import_the_reference_backends(path):
    if _part(path) in REFERENCE_USERS:
        return
    bad = {".".join(m) for m in _imported_modules(path) if m[:2] in REFERENCE}
    assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}; go through batchnorm.functional instead"


def test_the_check_sees_reference_imports():
    probe = SRC / "tools" / "probe.py"
    for source in ("from ..kernels.reference import inverse_std\n", "from ..kernels import reference as _ref\n",
                   "import batchnorm.kernels.reference_act\n", "def f():\n    from ..kernels import reference_act\n"):
        assert {m[:2] for m in _imported_modules(probe, source)} & set(REFERENCE), source
    assert not {m[:2] for m in _imported_modules(probe, "from ..kernels import select\n")} & set(REFERENCE)
