"""Lint (ruff) and type checks (mypy on the public core API) run as part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("ruff") is None and _run("ruff", "--version").returncode != 0,
                    reason="ruff not installed")
def test_ruff_clean():
    result = _run("ruff", "check", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_public_api():
    result = _run("mypy")  # files and options come from [tool.mypy] in pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr
