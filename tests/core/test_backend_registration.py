"""Registering the optional backends: only a missing optional package is tolerated."""

from __future__ import annotations

import importlib.abc
import sys

import pytest

from batchnorm import kernels


class _FailingImport(importlib.abc.MetaPathFinder):
    """Makes ``import <target>`` raise ``error``."""

    def __init__(self, target: str, error: BaseException) -> None:
        self.target, self.error = target, error

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname == self.target:
            raise self.error
        return None


def _plant(monkeypatch: pytest.MonkeyPatch, module: str, error: BaseException) -> None:
    """The next ``import batchnorm.kernels.<module>`` raises ``error`` (the triton backend is then
    tried as on a machine with a GPU)."""
    if module == "triton_gpu":
        monkeypatch.setattr(kernels, "_gpu_or_interpreter", lambda: True)
    monkeypatch.delitem(sys.modules, f"batchnorm.kernels.{module}", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingImport(f"batchnorm.kernels.{module}", error), *sys.meta_path])


@pytest.mark.parametrize(("module", "package"), [("cpu", "numba"), ("cpu", "numba.core.errors"),
                                                 ("triton_gpu", "triton"), ("triton_gpu", "triton.language")])
def test_a_missing_optional_package_leaves_its_backend_out(monkeypatch, module, package):
    _plant(monkeypatch, module, ModuleNotFoundError(f"No module named {package!r}", name=package))
    kernels._register_optional()  # no error


@pytest.mark.parametrize(("module", "error"), [
    ("cpu", ModuleNotFoundError("No module named 'scipy'", name="scipy")),
    ("cpu", ModuleNotFoundError("No module named 'triton'", name="triton")),  # not the cpu backend's package
    ("cpu", ImportError("cannot import name 'planes' from 'batchnorm.kernels'")),
    ("triton_gpu", ModuleNotFoundError("No module named 'numba'", name="numba")),
    ("triton_gpu", ImportError("cannot import name 'jit' from 'triton'", name="triton")),
    ("aten", ModuleNotFoundError("No module named 'numba'", name="numba")),
    ("cpu", SyntaxError("invalid syntax")),
])
def test_any_other_failed_import_raises(monkeypatch, module, error):
    _plant(monkeypatch, module, error)
    with pytest.raises(type(error)):
        kernels._register_optional()


def test_without_a_gpu_the_triton_backend_is_not_imported(monkeypatch):
    _plant(monkeypatch, "triton_gpu", AssertionError("imported"))
    monkeypatch.setattr(kernels, "_gpu_or_interpreter", lambda: False)
    kernels._register_optional()
