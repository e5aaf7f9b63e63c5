"""SQLite store of lab runs: configuration hash -> configuration, final metrics, curves, environment.

Writes are single transactions (a run is either fully stored or absent), the database runs in WAL mode
with a busy timeout so several worker processes can write to it, and a run whose hash is already stored
is reused instead of retrained. Experiments (a named set of runs plus their parameters) are stored too,
so ``batchnorm report DIR`` can rebuild every table and plot from the database alone.

A run's key (``hash``) covers its configuration and the identity of its data (``train.config_hash``). An
experiment's name covers its parameters (:func:`experiment_name`), so experiments with different
parameters coexist in one store and running the same command again replaces its own entry only.
A file that is not a usable lab store (a directory, a corrupt or truncated database, another program's
database) raises :class:`StoreError`, whose message says what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sqlite3
import subprocess
import time
from pathlib import Path

__all__ = ["Store", "StoreError", "environment", "experiment_name"]

class StoreError(RuntimeError):
    """The store cannot be used (wrong kind of path, unreadable, corrupt, not a lab store)."""


_COLUMNS = {
    "runs": ["hash", "config", "result", "curves", "init", "env", "created"],
    "experiments": ["name", "kind", "params", "hashes", "created"],
}

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


def experiment_name(kind: str, label: str, params: dict) -> str:
    """``kind-label-XXXXXXXX``: the last part is a digest of ``params``, so two experiments of the same kind
    and label with different parameters (other seeds, learning rates, steps...) get different names."""
    digest = hashlib.sha256(_json(params).encode()).hexdigest()[:8]
    return f"{kind}-{label}-{digest}"


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

    def __init__(self, path: str | os.PathLike, check: bool = False):
        """Open (or create) the store at ``path``. ``check=True`` also verifies every page of an existing
        database (``PRAGMA quick_check``): a truncated or corrupt file is then refused here rather than
        half-way through a sweep."""
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory; the store is a file: give a file path such as "
                             f"{self.path / 'lab.sqlite'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of the store {self.path} ({exc.strerror or exc}); "
                             "choose another --out/--store") from None
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        except sqlite3.DatabaseError as exc:  # OperationalError included
            raise self._unusable(exc) from None
        try:
            self._open(check)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise self._unusable(exc) from None

    def _unusable(self, exc: sqlite3.DatabaseError) -> StoreError:
        if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
            return StoreError(f"cannot open the store {self.path} ({exc}): check that its directory exists and "
                              "is writable, or choose another --out/--store")
        return StoreError(f"{self.path} is not a usable lab store ({exc}): it is corrupt, truncated or another "
                          "program's database. Move it aside and run the command again (its runs are lost), "
                          "or choose another --out/--store")

    def _open(self, check: bool) -> None:
        """Configure the new connection and create or check the tables."""
        self._conn.execute("PRAGMA busy_timeout=60000")
        if check:
            rows = self._conn.execute("PRAGMA quick_check").fetchall()
            if rows != [("ok",)]:
                raise sqlite3.DatabaseError("; ".join(str(r[0]) for r in rows[:3]))
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:  # e.g. no shared memory: keep the rollback journal
            if "malformed" in str(exc) or "not a database" in str(exc):
                raise
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._tx():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
        for table, cols in _COLUMNS.items():
            have = [r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")]
            if have != cols:
                raise sqlite3.DatabaseError(f"table {table} has columns {have}, a lab store has {cols}")

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
        if self._conn is not None:
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

    def timings(self) -> list[tuple[dict, float, int]]:
        """Every stored run's configuration, seconds of training and steps trained (sweeps' cost estimates)."""
        rows = self._conn.execute(
            "SELECT config, json_extract(result, '$.seconds'), json_extract(result, '$.steps') FROM runs")
        return [(json.loads(c), float(sec), int(n)) for c, sec, n in rows if sec is not None and n is not None]

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
