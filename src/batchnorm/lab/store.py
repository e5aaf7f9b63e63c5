"""SQLite store of lab runs: configuration hash -> configuration, final metrics, curves, environment.

Writes are single transactions (a run is either fully stored or absent), the database runs in WAL mode
with a busy timeout so several worker processes can write to it, and a run whose hash is already stored
is reused instead of retrained. Experiments (a named set of runs plus their parameters) are stored too,
so ``batchnorm report DIR`` can rebuild every table and plot from the database alone.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import subprocess
import time
from pathlib import Path

__all__ = ["Store", "environment"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    result TEXT NOT NULL,
    curves TEXT NOT NULL,
    init TEXT NOT NULL,
    env TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    hashes TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def _json(obj) -> str:
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    return json.dumps(clean(obj), default=str)


_GIT: str | None = None


def git_hash() -> str | None:
    global _GIT
    if _GIT is None:
        try:
            _GIT = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                text=True, timeout=5,
            ).stdout.strip() or ""
        except Exception:
            _GIT = ""
    return _GIT or None


def environment() -> dict:
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "git": git_hash(),
    }


class Store:
    """A lab database (``lab.sqlite``). Safe to open from several processes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self._conn.execute("PRAGMA busy_timeout=60000")
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:  # e.g. a file system without shared memory: keep the rollback journal
            pass
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._tx():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)

    def _tx(self):
        conn = self._conn

        class _Tx:
            def __enter__(self_inner):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, et, ev, tb):
                conn.execute("COMMIT" if et is None else "ROLLBACK")
                return False

        return _Tx()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------------------------------- runs
    def has(self, h: str) -> bool:
        return self._conn.execute("SELECT 1 FROM runs WHERE hash=?", (h,)).fetchone() is not None

    def put(self, run: dict) -> None:
        """Store one finished run (``train()``'s return value) atomically; replaces an older copy."""
        with self._tx():
            self._conn.execute(
                "INSERT OR REPLACE INTO runs(hash, config, result, curves, init, env, created) "
                "VALUES (?,?,?,?,?,?,?)",
                (run["hash"], _json(run["config"]), _json(run["result"]), _json(run["curves"]),
                 _json(run.get("init", {})), _json(run.get("env") or environment()), time.time()),
            )

    def get(self, h: str) -> dict | None:
        row = self._conn.execute(
            "SELECT hash, config, result, curves, init, env, created FROM runs WHERE hash=?", (h,)
        ).fetchone()
        if row is None:
            return None
        return {
            "hash": row[0], "config": json.loads(row[1]), "result": json.loads(row[2]),
            "curves": json.loads(row[3]), "init": json.loads(row[4]), "env": json.loads(row[5]),
            "created": row[6],
        }

    def hashes(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT hash FROM runs ORDER BY created")]

    def count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    # --------------------------------------------------------------------------------- experiments
    def put_experiment(self, name: str, kind: str, params: dict, hashes: list[str]) -> None:
        with self._tx():
            self._conn.execute(
                "INSERT OR REPLACE INTO experiments(name, kind, params, hashes, created) VALUES (?,?,?,?,?)",
                (name, kind, _json(params), _json(hashes), time.time()),
            )

    def experiments(self) -> list[dict]:
        rows = self._conn.execute("SELECT name, kind, params, hashes, created FROM experiments ORDER BY created")
        return [
            {"name": r[0], "kind": r[1], "params": json.loads(r[2]), "hashes": json.loads(r[3]), "created": r[4]}
            for r in rows
        ]
