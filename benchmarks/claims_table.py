"""The claims table of README.md and docs/lab.md, in Markdown, from the output of ``batchnorm claims --json``.

``claims --json`` prints its result object as the last line of its output; this script reads that
line from a file (or stdin) and prints one row per claim: the claim with its effect's unit and
minimum, the claim's verdict, and every condition's effect, unadjusted 95% interval and verdict::

    batchnorm claims --full --out claims-full --json > claims-full.log
    python benchmarks/claims_table.py claims-full.log             # every condition (docs/lab.md)
    python benchmarks/claims_table.py --summary claims-full.log   # a row per claim (README.md)
"""

from __future__ import annotations

import argparse
import json
import sys


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (the ``--json`` result)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "claims" in obj:
                return obj
    raise ValueError("no claims --json result line found (run `batchnorm claims ... --json`)")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def condition_cell(c: dict) -> str:
    lo, hi = c.get("ci95") or (None, None)
    return (f"{c['dataset']}, {c['condition']}: {_num(c.get('effect'))} [{_num(lo)}, {_num(hi)}] "
            f"{c['verdict']}")


def _table(payload: dict, header: str, cell) -> str:
    """A row per claim (its name from ``cell(claim)``, its verdict, the rest of the row), then a count line."""
    rows = [f"| claim | verdict | {header} |", "|---|---|---|"]
    for r in payload["claims"]:
        name, rest = cell(r)
        rows.append(f"| {name} | **{r['verdict']}** | {rest} |")
    n = sum(len(r["conditions"]) for r in payload["claims"])
    rows += ["", f"{len(payload['claims'])} claims, {n} conditions, `--{payload['mode']}`."]
    return "\n".join(rows)


def markdown(payload: dict) -> str:
    """Every condition's effect, interval and verdict (docs/lab.md's table)."""
    return _table(payload, "conditions: effect [95% CI], verdict",
                  lambda r: (f"{r['claim']} ({r['unit']}; claimed ≥ {r['min_effect']:g})",
                             "<br>".join(condition_cell(c) for c in r["conditions"])))


def summary(payload: dict) -> str:
    """README's short form: per claim its verdict and how many of its conditions got each verdict."""
    def counts(r):
        n = [sum(c["verdict"] == v for c in r["conditions"]) for v in ("supported", "contradicted", "inconclusive")]
        return r["claim"], " / ".join(map(str, n))

    return _table(payload, "conditions supported / contradicted / inconclusive", counts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", nargs="?", help="the output of `batchnorm claims --json` (default: stdin)")
    ap.add_argument("--summary", action="store_true",
                    help="one row per claim: its verdict and its conditions' verdicts counted (README's table)")
    args = ap.parse_args(argv)
    text = open(args.log, encoding="utf-8").read() if args.log else sys.stdin.read()
    try:
        print((summary if args.summary else markdown)(last_json(text)))
    except (ValueError, KeyError) as exc:
        print(f"claims_table: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
