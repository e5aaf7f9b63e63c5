"""The lab: train with and without BN, test the claims, write the report (``batchnorm`` command).

``batchnorm.lab.compare(model_fn, data, ...)`` compares your own model with and without BN on your own data
(see :mod:`batchnorm.lab.api`)."""

from __future__ import annotations

__all__ = ["CompareResult", "compare"]


def __getattr__(name: str):  # the lab's modules import torch and matplotlib: only when asked for
    if name in ("compare", "CompareResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchnorm.lab' has no attribute {name!r}")
