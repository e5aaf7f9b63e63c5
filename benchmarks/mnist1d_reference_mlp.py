"""Does the MNIST-1D authors' own MLP recipe reach the 68% of their paper's table? (minutes on 2 cores)

Greydanus (2020), Table 1, gives the MLP 68% test accuracy. The lab's MLP reaches 65.8% over 5 seeds
(``tests/lab/test_published.py``). This script trains the authors' model and loop, restated from
``notebooks/models.py`` (``MLPBase``: ``h = relu(W1 x); h = h + relu(W2 h); W3 h``, width 100) and
``notebooks/train.py`` (``train_model``: Adam lr 1e-2, batch 100, batches taken in order without
shuffling, the last step's test accuracy) of github.com/greydanus/mnist1d, on

* ``pkl``: the authors' frozen data set, ``mnist1d_data.pkl`` from that repository (the file their
  notebooks load; pass it with ``--pickle``, its SHA-256 is checked), and
* ``ours``: the lab's MNIST-1D (``mnist1d`` 0.0.2's ``make_dataset``, which differs from the pickle),

both with the residual ``MLPBase`` and with a plain variant (the lab's layout, ``h = relu(W2 h)``).
The notebook ``mnist1d-classification.ipynb`` of that repository records its own run (6000 steps,
seed 42, the pickle): **65.1%**, not 68%.

    python benchmarks/mnist1d_reference_mlp.py --pickle mnist1d_data.pkl [--seeds 5] [--steps 8000]

Measured 2026-12-04 on the 2-vCPU VM (5 seeds, 8000 steps): pkl + residual 65.7% (the authors'
setting), pkl + plain 64.6%, ours + residual 64.6%, ours + plain 67.2%. Prints one line per setting
and a JSON object as the last line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import sys

import numpy as np
import torch
from torch import nn

#: SHA-256 of ``mnist1d_data.pkl`` in github.com/greydanus/mnist1d (the file its notebooks download).
PICKLE_SHA256 = "e95257676e9fb04568e46dda007da22cc8664ccba1451456afde55d7f6dd6aa5"


class ReferenceMLP(nn.Module):
    """``MLPBase`` of the MNIST-1D repository (restated): width 100, a residual second layer."""

    def __init__(self, residual: bool, width: int = 100) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(40, width), nn.Linear(width, width), nn.Linear(width, 10)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x).relu()
        h = h + self.l2(h).relu() if self.residual else self.l2(h).relu()
        return self.l3(h)


def train_reference(data, residual: bool, seed: int, steps: int) -> float:
    """``train_model`` of the repository (restated): the last step's test accuracy."""
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = ReferenceMLP(residual)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps + 1):
        b = (step * 100) % len(x)
        loss = loss_fn(model(x[b:b + 100]), y[b:b + 100])
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return (model(xt).argmax(-1) == yt).float().mean().item()


def load_pickle(path: str):
    raw = open(path, "rb").read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != PICKLE_SHA256:
        raise SystemExit(f"{path}: SHA-256 {digest} is not the MNIST-1D repository's mnist1d_data.pkl "
                         f"({PICKLE_SHA256}); download that file and pass it with --pickle")
    d = pickle.loads(raw)  # checked against the known file above before unpickling
    return (torch.tensor(np.asarray(d["x"]), dtype=torch.float32), torch.tensor(np.asarray(d["y"])).long(),
            torch.tensor(np.asarray(d["x_test"]), dtype=torch.float32), torch.tensor(np.asarray(d["y_test"])).long())


def load_ours():
    from batchnorm.lab.data import load_dataset

    d = load_dataset("mnist1d", val_fraction=0.0)
    return (torch.as_tensor(d.x_train).reshape(len(d.y_train), -1).float(), torch.as_tensor(d.y_train).long(),
            torch.as_tensor(d.x_test).reshape(len(d.y_test), -1).float(), torch.as_tensor(d.y_test).long())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pickle", required=True, help="mnist1d_data.pkl from github.com/greydanus/mnist1d")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sets = {"pkl": load_pickle(args.pickle), "ours": load_ours()}
    out = {}
    for name, data in sets.items():
        for residual in (True, False):
            accs = [train_reference(data, residual, s, args.steps) for s in range(args.seeds)]
            key = f"{name} {'residual' if residual else 'plain'}"
            out[key] = {"mean": float(np.mean(accs)), "accuracies": accs}
            print(f"{key:14s} {np.mean(accs):.3f}  {[round(a, 3) for a in accs]}", flush=True)
    print(json.dumps({"published": 0.68, "notebook_run": 0.651, "steps": args.steps, "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
