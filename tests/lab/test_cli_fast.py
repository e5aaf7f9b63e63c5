"""``batchnorm --help`` and every sub-command's ``--help`` are answered without importing torch (< 1 s), show
defaults and examples; usage errors are caught before any heavy import; the front's name lists match the lab's."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

LAB_COMMANDS = ("train", "compare", "figure1", "claims", "demo", "report")

_CHILD = """
import sys, time
t0 = time.perf_counter()
from batchnorm_cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "numpy", "batchnorm", "rich", "matplotlib") if m in sys.modules)
print(f"\\nRC={rc} HEAVY={','.join(heavy)} SECONDS={time.perf_counter() - t0:.3f}")
"""


def _child(*argv: str) -> tuple[int, str, list[str], float]:
    p = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, timeout=120)
    last = p.stdout.strip().splitlines()[-1]
    fields = dict(part.split("=", 1) for part in last.split())
    heavy = [m for m in fields["HEAVY"].split(",") if m]
    return int(fields["RC"]), p.stdout + p.stderr, heavy, float(fields["SECONDS"])


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in LAB_COMMANDS]], ids=lambda a: " ".join(a))
def test_help_imports_no_torch(argv):
    rc, out, heavy, seconds = _child(*argv)
    assert rc == 0, out
    assert heavy == [], f"--help imported {heavy}"
    assert "examples:" in out
    if argv[0] in ("train", "compare"):
        assert "(default: mnist1d)" in out and "(default: classification)" in out
        assert "mypkg.models:build --dataset data.npz" in out


@pytest.mark.parametrize("argv, fragment", [
    (["trian"], "did you mean 'train'?"),
    (["train", "--stpes", "5"], "did you mean --steps"),
    (["train", "--model", "mpl"], "did you mean 'mlp'?"),
    (["compare", "--dataset", "mnist1e"], "did you mean 'mnist1d'?"),
    (["train", "--optimizer", "adm"], "did you mean 'adam'?"),
    (["claims", "--only", "fastr"], "unknown claim(s) 'fastr'"),
])
def test_usage_errors_before_any_heavy_import(argv, fragment):
    rc, out, heavy, _ = _child(*argv)
    assert rc == 2 and fragment in out, out
    assert "usage: batchnorm" in out and "Traceback" not in out
    assert heavy == [], f"a usage error imported {heavy}"


def test_version():
    rc, out, heavy, _ = _child("--version")
    assert rc == 0 and out.startswith("batchnorm ") and heavy == []


def test_console_script_help_is_fast():
    script = Path(sys.executable).with_name("batchnorm")
    if not script.is_file():
        pytest.skip("the batchnorm console script is not installed beside this Python")
    if "batchnorm_cli" not in script.read_text():
        pytest.skip("the installed script predates the batchnorm_cli entry point: pip install -e . again")
    t0 = time.perf_counter()
    p = subprocess.run([str(script), "compare", "--help"], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert p.returncode == 0 and "examples:" in p.stdout
    assert seconds < 5  # ~0.2 s measured; generous for a loaded CI machine (torch alone takes ~3 s to import)


def test_front_names_match_the_lab():
    import batchnorm_cli as front
    from batchnorm.lab.data import DATASETS
    from batchnorm.lab.experiments import CLAIMS
    from batchnorm.lab.models import MODELS, NORMS

    assert front.MODELS == tuple(MODELS)
    assert front.NORMS == tuple(NORMS)
    assert front.DATASETS == tuple(DATASETS)
    assert front.CLAIM_KEYS == tuple(c.key for c in CLAIMS)
    from batchnorm.lab.claims import PORTABLE_CLAIMS

    assert front.PORTABLE_CLAIMS == PORTABLE_CLAIMS
    import importlib

    for module, name in front.COMMANDS.values():
        assert callable(getattr(importlib.import_module(module), name))
