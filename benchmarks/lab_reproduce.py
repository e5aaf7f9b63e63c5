"""Slow reproductions of published numbers with the lab (minutes on 2 cores).

* MNIST-1D (Greydanus 2020) reference models with the reference recipe (Adam lr 1e-2, batch 100,
  8000 steps): published test accuracy MLP 68%, CNN 94%. Also with BN, for comparison.
* Ioffe & Szegedy Figure 1 on Fashion-MNIST (``--figure1``), when the IDX files are available.

Usage::

    python benchmarks/lab_reproduce.py [--seeds 0,1,2] [--out runs/reproduce] [--workers 2] [--figure1]

Prints a table and, as its last line, a JSON object with the measured accuracies.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from batchnorm.lab.sweep import default_workers, open_store, run_sweep
from batchnorm.lab.train import RunConfig

PUBLISHED = {"mlp": 0.68, "cnn": 0.94}


def reproduce_mnist1d(seeds, out, workers, norms=("none", "batchnorm"), steps=None):
    cfgs = [RunConfig(model=m, seed=s, steps=steps).replace(norm=n) for m in PUBLISHED for n in norms for s in seeds]
    with open_store(out) as store:
        runs = run_sweep(cfgs, store, workers=workers)
    table = {}
    for m in PUBLISHED:
        for n in norms:
            accs = [r["result"]["test_accuracy"] for r in runs
                    if r["config"]["model"] == m and r["config"]["norm"] == n]
            std = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
            table[f"{m}/{n}"] = {"mean": float(np.mean(accs)), "std": std, "runs": accs,
                                 "published": PUBLISHED[m] if n == "none" else None}
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--steps", type=int, default=None, help="override the 8000-step recipe (smoke tests)")
    p.add_argument("--figure1", action="store_true", help="also Figure 1 on Fashion-MNIST (needs the IDX files)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    table = reproduce_mnist1d(seeds, args.out, args.workers, steps=args.steps)
    out = {"mnist1d": table}
    print(f"{'model/norm':18} {'test accuracy':>18} {'published':>10}")
    for k, v in table.items():
        pub = f"{100 * v['published']:.0f}%" if v["published"] else "–"
        print(f"{k:18} {100 * v['mean']:8.1f}% ± {100 * v['std']:4.1f}% {pub:>10}")
    if args.figure1:
        from batchnorm.lab.analysis import figure1_series
        from batchnorm.lab.commands import figure1_configs

        cfgs = figure1_configs("fashion-mnist", 5000, 0)
        with open_store(args.out) as store:
            runs = run_sweep(cfgs, store, workers=args.workers)
        series = figure1_series(runs)
        out["figure1_fashion"] = {s["norm"]: {"final_test_accuracy": s["test_accuracy"][-1],
                                              "p50_start": s["percentiles"]["p50"][0],
                                              "p50_end": s["percentiles"]["p50"][-1]} for s in series["runs"]}
        for n, v in out["figure1_fashion"].items():
            print(f"Figure 1 Fashion-MNIST {n:10} test {100 * v['final_test_accuracy']:.1f}%, "
                  f"median pre-activation {v['p50_start']:.2f} -> {v['p50_end']:.2f}")
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
