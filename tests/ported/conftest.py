"""Every ported test runs once per CPU backend of :mod:`batchnorm.kernels`.

``"cpu"`` is the numba backend (compiled on first use, then served from numba's disk cache);
``"reference"`` is the pure-torch one. The backend is forced with
:func:`batchnorm.kernels.use_backend` around each test. The numba backend's size threshold
(``MIN_NUMEL``) is 1, so the small shapes of these tests do run its kernels; inputs it cannot
run (masks, half precision, ...) fall back to the reference backend by design.
"""

from __future__ import annotations

import pytest

import batchnorm as B

BACKENDS = ("cpu", "reference")


@pytest.fixture(params=BACKENDS, autouse=True)
def backend(request):
    name = request.param
    if name not in B.available_backends():
        pytest.skip(f"batch-norm backend {name!r} is not available (numba missing?)")
    with B.use_backend(name):
        yield name
