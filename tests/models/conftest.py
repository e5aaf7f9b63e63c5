"""Fixtures for the real-model tests: torchvision and timm, imported through :mod:`._thirdparty`.

Without them the tests skip with the reason and the install command; with
``BATCHNORM_REQUIRE_MODELS=1`` (set by ``.ci/run``) they fail instead, so CI cannot go green
by silently not running them.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from . import _thirdparty


def _load(importer, what: str) -> ModuleType:
    try:
        return importer()
    except Exception as exc:  # ImportError when not installed, RuntimeError from a broken install
        msg = (f"{what} cannot be imported ({type(exc).__name__}: {exc}); the real-model tests need it: "
               f"{_thirdparty.install_command()}")
        if _thirdparty.required():
            pytest.fail(f"{msg} [{_thirdparty.REQUIRE_ENV} is set, so this fails instead of skipping]",
                        pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def torchvision() -> ModuleType:
    return _load(_thirdparty.import_torchvision, "torchvision")


@pytest.fixture(scope="session")
def timm() -> ModuleType:
    return _load(_thirdparty.import_timm, "timm")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these inputs are small (a 2x3x64x64 batch), where a second thread
    gains little, and on a shared 2-core machine two OpenMP threads that wait for each other made
    a MobileNetV2 forward 100x slower (2-5 s instead of 20 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
