"""Print the largest error of each check of ``test_real_models`` per case, in eps units of its
scale, to re-derive the tolerances there: ``.venv/bin/python -m tests.models._measure [backend...]``.

Runs the same checks with the tolerances lifted (nothing fails on rounding); needs torchvision
and timm. Which backend ran is not recorded here (the tests check that).
"""

from __future__ import annotations

import copy
import sys

import batchnorm

from . import _thirdparty
from . import test_real_models as t


class _Ran(list):
    """Stands in for the tests' record of the backends that ran: always just the forced one."""

    def __init__(self, backend: str) -> None:
        super().__init__([backend])
        self.backend = backend

    def clear(self) -> None:
        self[:] = [self.backend]


def main(backends: list[str]) -> None:
    libs = {"torchvision": _thirdparty.import_torchvision(), "timm": _thirdparty.import_timm()}
    inf = 1e30  # no check fails on rounding (an infinite tolerance would turn into NaN)
    t.FORWARD_FACTOR = t.LAYER_FACTOR = t.F64_FACTOR = t.RATIO = inf

    def make(case):
        if str(case) not in t._models:
            t._models[str(case)] = t._build(case, libs[case.lib])
        return copy.deepcopy(t._models[str(case)])

    for backend in backends:
        for case in t.CASES:
            for mode in t.MODES:
                t.measured.clear()
                try:
                    with batchnorm.use_backend(backend):
                        t._check_model(case, make, (backend, _Ran(backend)), mode)
                except AssertionError as exc:
                    print(f"{backend} {case} {mode} FAILED: {str(exc)[:400]}")
                for k, v in sorted(t.measured.items()):
                    print(f"{backend:9s} {str(case):32s} {mode:5s} {k:64s} {v:12.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["reference"])
