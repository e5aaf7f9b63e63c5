"""The repository speaks of the product, not of how the work on it was organised: measurements are
labelled by date, commit, machine and command, never by ordinal work periods ("the ninth session",
"a later period"). docs/performance.md stays a reference of at most 300 lines (the dated history is
in docs/results/), and every benchmark result file is indexed and every cited one exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("README.md", "docs", "benchmarks", "src")
SUFFIXES = {".py", ".md", ".sh", ".txt", ".json", ".toml", ".cfg", ".yml", ".yaml", ".rst"}
SKIPPED_DIRS = {"__pycache__", ".ipynb_checkpoints"}

_ORDINAL = (r"first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth"
            r"|\d+(?:st|nd|rd|th)")
_COUNT = r"one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|\d+"
WORK_PERIOD = re.compile(
    rf"\b(?:{_ORDINAL})[\s-]+(?:work\s+)?(?:sessions?|periods?|stops?)\b"  # "the ninth session"
    rf"|\b(?:sessions?|periods?)\s+(?:{_COUNT})\b"  # "sessions six to nine"
    r"|\b(?:a|the|this|that|next|previous|earlier|later)\s+(?:work\s+)?(?:session|work\s+period)\b"
    r"|\bgpu_session\b"
    r"|\bprototypes?\s+in\s+`?/tmp",
    re.IGNORECASE,
)


def _files() -> list[Path]:
    out: list[Path] = []
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            out.append(top)
            continue
        for p in sorted(top.rglob("*")):
            rel = p.relative_to(ROOT).parts
            if (p.is_file() and p.suffix in SUFFIXES and not SKIPPED_DIRS.intersection(rel)
                    and not any(part.endswith(".egg-info") for part in rel)):
                out.append(p)
    return out


def work_period_labels(text: str) -> list[str]:
    """The ordinal work-period labels in ``text``, with their line numbers."""
    return [f"{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in WORK_PERIOD.finditer(text)]


@pytest.mark.parametrize("text", [
    "measured in the ninth session", "the 7th period of work", "a later session found",
    "no device in sessions six to nine", "see benchmarks/gpu_session.sh", "Seventh-session code",
    "prototypes in `/tmp`, not committed", "the eighth work period",
])
def test_pattern_finds_planted_labels(text):
    assert work_period_labels(f"ok line\n{text}\n")


@pytest.mark.parametrize("text", [
    "measured on 2026-12-01 (commit 36b9198) with `batchnorm bench`", "scope='session' fixtures",
    "the first call of a dtype compiles", "once per session of pytest", "a period of 10 steps",
])
def test_pattern_leaves_ordinary_text(text):
    assert not work_period_labels(text)


def test_no_work_period_labels():
    found = {str(p.relative_to(ROOT)): hits for p in _files()
             if (hits := work_period_labels(p.read_text(errors="replace")))}
    assert not found, ("ordinal work-period labels (say the date, commit, machine and command "
                       f"instead): {found}")


def test_performance_doc_is_a_short_reference():
    lines = (ROOT / "docs" / "performance.md").read_text().splitlines()
    assert lines[0] == "<!-- reference -->"
    assert len(lines) <= 300, f"docs/performance.md has {len(lines)} lines; move history to docs/results/"


def test_results_are_indexed_and_citations_exist():
    results = ROOT / "benchmarks" / "results"
    index = (results / "README.md").read_text()
    names = {p.name for p in results.iterdir() if p.is_file() and p.name != "README.md"}
    missing = sorted(n for n in names if n not in index)
    assert not missing, f"not in benchmarks/results/README.md: {missing}"
    cited = set()
    for p in _files():
        for m in re.finditer(r"benchmarks/results/([\w.*-]+\.(?:json|txt))", p.read_text(errors="replace")):
            cited.add((str(p.relative_to(ROOT)), m.group(1)))
    dangling = sorted((f, c) for f, c in cited if not any(Path(n).match(c) for n in names))
    assert not dangling, f"cited result files that do not exist: {dangling}"
