import pytest
import torch


@pytest.fixture(autouse=True)
def _lab_env(tmp_path_factory, monkeypatch):
    """Each lab test gets a private cache (no network, no shared state) and one thread."""
    from batchnorm.lab import data as D

    cache = tmp_path_factory.getbasetemp() / "bn-cache"  # shared by the session: mnist1d is generated once
    monkeypatch.setenv("BATCHNORM_CACHE", str(cache))
    # datasets are memoized per process by name and directory: start every test from the files
    monkeypatch.setattr(D, "_RAW_MEMO", {})
    monkeypatch.setattr(D, "_MEMO", {})
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
