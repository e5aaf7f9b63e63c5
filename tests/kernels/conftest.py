import pytest


@pytest.fixture
def cpu_backend(monkeypatch):
    """The numba backend with the size threshold off, so small shapes run its kernels."""
    cpu = pytest.importorskip("batchnorm.kernels.cpu")
    monkeypatch.setattr(cpu, "MIN_NUMEL", 0)
    return cpu
