"""Every backend module satisfies the typed contract of :mod:`batchnorm.kernels.protocol`:
statically (mypy checks the assignments below: run by ``test_mypy_sees_the_backends_conform``)
and at run time (each function the protocols list exists, with the protocol's parameter names
in the protocol's order; the triton backend's read from its source, which imports only with a GPU
or Triton's interpreter). The protocols themselves, the registered operators and the eager entry
points follow the one argument order the protocol states (:data:`ARGUMENT_ORDER`)."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm.kernels import aten, reference, reference_act
from batchnorm.kernels.protocol import ARGUMENT_ORDER, Backend, FusedBackend, FusedOps, LeanBackend, PreparedBackend

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
SRC = Path(__file__).resolve().parents[2] / "src" / "batchnorm"
PROTOCOLS = (Backend, FusedOps, LeanBackend, PreparedBackend)
#: what may follow the shared arguments (in this order), and the arguments one function has alone
TRAILING = ("need_input_grad", "need_residual_grad", "running")
OWN = {"stats", "op", "wait", "y", "collective", "backend"}


def _members(protocol: type) -> dict[str, list[str]]:
    """The protocol's functions and their parameter names (without ``self``)."""
    out = {}
    for klass in reversed(protocol.__mro__):
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and not name.startswith("_"):
                out[name] = [p for p in inspect.signature(value).parameters if p != "self"]
    return out


def _source_signatures(path: Path) -> dict[str, list[str]]:
    """The top-level functions of a module file and their parameter names, read without importing it
    (the triton backend imports only with a GPU or Triton's interpreter)."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            out[node.name] = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return out


def _module_signatures(module_name: str) -> dict[str, list[str]] | None:
    """Each function of a backend module: its parameter names (``None``: it cannot be read here)."""
    if module_name == "triton_gpu":
        return _source_signatures(SRC / "kernels" / "triton_gpu.py")
    if module_name == "cpu" and importlib.util.find_spec("numba") is None:
        return None
    module = importlib.import_module(f"batchnorm.kernels.{module_name}")
    return {n: list(inspect.signature(f).parameters) for n, f in vars(module).items() if inspect.isfunction(f)}


def mismatches(signatures: dict[str, list[str]], protocols: tuple[type, ...]) -> list[str]:
    """Where a module's functions differ from its protocols: a missing function, or parameter names
    not the protocol's, in the protocol's order."""
    out = []
    for protocol in protocols:
        for fname, wanted in _members(protocol).items():
            got = signatures.get(fname)
            if got is None:
                out.append(f"{fname} missing ({protocol.__name__})")
            elif got != wanted:
                out.append(f"{fname}{tuple(got)}: the protocol says {tuple(wanted)}")
    return out


def out_of_order(params: list[str]) -> str | None:
    """Why ``params`` do not follow :data:`ARGUMENT_ORDER` (then :data:`TRAILING`), or ``None``."""
    shared = [p for p in params if p in ARGUMENT_ORDER]
    if shared != sorted(shared, key=ARGUMENT_ORDER.index):
        return f"{shared} not in the order {ARGUMENT_ORDER}"
    trailing = [p for p in params if p in TRAILING]
    if trailing != sorted(trailing, key=TRAILING.index):
        return f"{trailing} not in the order {TRAILING}"
    last_shared = max((i for i, p in enumerate(params) if p in ARGUMENT_ORDER), default=-1)
    if any(params.index(p) < last_shared for p in trailing):
        return f"{trailing} before a shared argument"
    unknown = [p for p in params if p not in ARGUMENT_ORDER and p not in TRAILING and p not in OWN]
    return f"{unknown}: not in the stated order" if unknown else None


@pytest.mark.parametrize(("module_name", "protocols"), EXPECTED, ids=[m for m, _ in EXPECTED])
def test_the_backend_has_every_function_of_its_protocols(module_name, protocols):
    signatures = _module_signatures(module_name)
    if signatures is None:
        pytest.skip("numba is not installed")
    module = None if module_name == "triton_gpu" else importlib.import_module(f"batchnorm.kernels.{module_name}")
    if module is not None and Backend in protocols[0].__mro__:
        assert isinstance(getattr(module, "name", None), str), f"{module_name} has no name"
    assert mismatches(signatures, protocols) == [], module_name


def test_a_planted_mismatch_is_caught():
    signatures = _module_signatures("reference")
    assert mismatches(signatures, (Backend,)) == []
    for fname in ("forward_train", "backward_train", "forward_apply"):
        swapped = list(signatures[fname])
        swapped[1], swapped[2] = swapped[2], swapped[1]
        assert mismatches({**signatures, fname: swapped}, (Backend,)), fname
    acts = _module_signatures("reference_act")
    old = ["x", "weight", "bias", "residual", "mask", "eps", "vbs", "act", "slope", "running"]
    assert mismatches({**acts, "forward_train_act": old}, (FusedOps,))
    assert mismatches({k: v for k, v in signatures.items() if k != "backward_apply"}, (Backend,))
    assert out_of_order(old) and out_of_order(["dy", "x", "mean", "var", "count", "eps"])
    assert out_of_order(["x", "running", "eps"]) and out_of_order(["x", "gamma"])


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=[p.__name__ for p in PROTOCOLS])
def test_the_protocols_follow_the_stated_order(protocol):
    for fname, params in _members(protocol).items():
        assert out_of_order(params) is None, (protocol.__name__, fname, params)


def test_the_operators_follow_the_stated_order():
    """The registered ops' schemas and the eager entry points of :mod:`batchnorm.ops` too."""
    import torch

    from batchnorm import ops

    names = ["train_forward", "train_backward", "apply_forward", "apply_backward", "act_train_forward",
             "act_train_backward", "act_apply_forward", "act_apply_backward", "act_inplace_train_forward",
             "act_inplace_train_backward"]
    for name in names:
        params = [a.name for a in getattr(torch.ops.batchnorm, name).default._schema.arguments]
        assert out_of_order(params) is None, (name, params)
    for fn in (ops.train_lean, ops.collective_train):
        params = list(inspect.signature(fn).parameters)
        assert out_of_order(params) is None, (fn.__name__, params)
    # an eager entry point takes the op's arguments by name as well
    x, mean, var = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(ops.apply(x, bias=None, weight=None, eps=1e-5, var=var, mean=mean),
                               ops.apply(x, mean, var, 1e-5, None, None))
    with pytest.raises(TypeError, match="missing"):
        ops.apply(x, mean=mean, var=var, eps=1e-5)
    with pytest.raises(TypeError, match="twice"):
        ops.apply(x, mean, var, 1e-5, None, None, x=x)


def test_mypy_sees_the_backends_conform():
    pytest.importorskip("mypy")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MYPYPATH": str(root / "src")}  # the package itself, not an installed copy
    result = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-warn-unused-ignores",
                             str(Path(__file__).relative_to(root))], cwd=root, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
