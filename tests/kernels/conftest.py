import pytest


@pytest.fixture(params=["cached", "streamed"])
def cpu_backend(request, monkeypatch):
    """The numba backend with the size threshold off, so small shapes run its kernels; once with
    the outputs written through the cache and once with every output streamed (non-temporal
    vector stores), which large tensors get."""
    cpu = pytest.importorskip("batchnorm.kernels.cpu")
    monkeypatch.setattr(cpu, "MIN_NUMEL", 0)
    if request.param == "streamed":
        monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 0)
        monkeypatch.setattr(cpu, "STREAM_MIN_BYTES_BACKWARD", 0)
    return cpu
