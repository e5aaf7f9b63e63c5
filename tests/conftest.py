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


#: The ``STARTED`` dictionaries of test modules whose check was started at collection.
_STARTED_EARLY: list[dict] = []


def pytest_collection_finish(session):
    """Start the slowest compile of the suite (the plain-loop CPU kernels, in a subprocess) as soon as
    its test is collected, so that it runs beside the other tests instead of before the ones after it."""
    for item in session.items:
        if item.name == "test_plain_loops_match_the_reference":
            item.module.STARTED.setdefault("0", item.module.start_check("0"))
            _STARTED_EARLY.append(item.module.STARTED)


def pytest_sessionfinish(session):
    """A check started early whose test did not run (-x stopped first, interrupted): end it."""
    for started in _STARTED_EARLY:
        for proc in started.values():
            proc.kill()
            proc.communicate()
        started.clear()
