import os

import pytest
import torch
from hypothesis import settings

# Reproducible property tests: the same examples on every run and in CI.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci")

# Keep test runs deterministic and light on the shared 2-core machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
