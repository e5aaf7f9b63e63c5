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


def pytest_collection_finish(session):
    """Start the slowest compile of the suite (the plain-loop CPU kernels, in a subprocess) as soon as
    its test is collected, so that it runs beside the other tests instead of before the ones after it."""
    for item in session.items:
        if item.name == "test_plain_loops_match_the_reference":
            item.module.STARTED.setdefault("0", item.module.start_check("0"))


def pytest_sessionfinish(session):
    """A check started early whose test did not run (deselected, -x stopped first): end it."""
    for item in session.items:
        started = getattr(item.module, "STARTED", None) if item.name == "test_plain_loops_match_the_reference" else None
        for proc in (started or {}).values():
            proc.kill()
            proc.communicate()
        if started:
            started.clear()
