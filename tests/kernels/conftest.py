import pytest


def configure_cpu(cpu, monkeypatch, variant: str) -> None:
    """Set the numba backend up for a test variant: the size threshold off (small shapes run its
    kernels); ``"streamed"`` in the name: every output written with non-temporal vector stores,
    as large tensors are; ``"planes"``: contiguous input always on the planes kernels, which
    otherwise take only planes of at least ``ROWS_MAX_PLANE`` values (the small test shapes would
    all run as rows)."""
    monkeypatch.setattr(cpu, "MIN_NUMEL", 0)
    monkeypatch.setattr(cpu, "_PLANS", {})  # the lean calls' cached per-shape decisions follow the settings below
    if "streamed" in variant:
        monkeypatch.setattr(cpu, "STREAM_MIN_BYTES", 0)
        monkeypatch.setattr(cpu, "STREAM_MIN_BYTES_BACKWARD", 0)
        monkeypatch.setattr(cpu, "STREAM_MIN_PLANE_BYTES", 0)
    if "planes" in variant:
        monkeypatch.setattr(cpu, "ROWS_MAX_PLANE", 0)


@pytest.fixture(params=["cached", "streamed", "planes"])
def cpu_backend(request, monkeypatch):
    """The numba backend in each :func:`configure_cpu` variant (streamed stores on planes are
    covered by the test shapes whose planes hold at least ``ROWS_MAX_PLANE`` values)."""
    cpu = pytest.importorskip("batchnorm.kernels.cpu")
    configure_cpu(cpu, monkeypatch, request.param)
    return cpu
