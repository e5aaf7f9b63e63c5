"""Every backend module satisfies the typed contract of :mod:`batchnorm.kernels.protocol`:
statically (mypy checks the assignments below: run by ``test_mypy_sees_the_backends_conform``)
and at run time (each function the protocols list exists, with the protocol's parameter names
in the protocol's order)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm.kernels import aten, reference, reference_act
from batchnorm.kernels.protocol import Backend, FusedBackend, FusedOps, LeanBackend, PreparedBackend

_reference: Backend = reference
_aten: Backend = aten
_reference_act: FusedOps = reference_act

if importlib.util.find_spec("numba") is not None:
    from batchnorm.kernels import cpu

    _cpu_fused: FusedBackend = cpu
    _cpu_lean: LeanBackend = cpu
    _cpu_prepared: PreparedBackend = cpu

if importlib.util.find_spec("triton") is not None and "batchnorm.kernels.triton_gpu" in sys.modules:
    from batchnorm.kernels import triton_gpu

    _triton: FusedBackend = triton_gpu

EXPECTED = [("reference", (Backend,)), ("aten", (Backend,)), ("reference_act", (FusedOps,)),
            ("cpu", (FusedBackend, LeanBackend, PreparedBackend)), ("triton_gpu", (FusedBackend,))]


def _members(protocol: type) -> dict[str, inspect.Signature]:
    out = {}
    for klass in reversed(protocol.__mro__):
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and not name.startswith("_"):
                out[name] = inspect.signature(value)
    return out


@pytest.mark.parametrize(("module_name", "protocols"), EXPECTED, ids=[m for m, _ in EXPECTED])
def test_the_backend_has_every_function_of_its_protocols(module_name, protocols):
    full = f"batchnorm.kernels.{module_name}"
    if module_name == "triton_gpu" and full not in sys.modules:
        pytest.skip("the triton backend is not registered here (no CUDA device)")
    if module_name == "cpu":
        pytest.importorskip("numba")
    module = importlib.import_module(full)
    for protocol in protocols:
        if Backend in protocol.__mro__:
            assert isinstance(getattr(module, "name", None), str), f"{module_name} has no name"
        for fname, signature in _members(protocol).items():
            assert hasattr(module, fname), f"{module_name} lacks {fname} ({protocol.__name__})"
            wanted = [p for p in signature.parameters if p != "self"]
            got = list(inspect.signature(getattr(module, fname)).parameters)
            assert got == wanted, f"{module_name}.{fname}{tuple(got)}: the protocol says {tuple(wanted)}"


def test_mypy_sees_the_backends_conform():
    pytest.importorskip("mypy")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MYPYPATH": str(root / "src")}  # the package itself, not an installed copy
    result = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-warn-unused-ignores",
                             str(Path(__file__).relative_to(root))], cwd=root, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
