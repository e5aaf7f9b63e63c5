"""Import torchvision and timm beside a CPU-only torch build, for the real-model tests.

Why this is needed: PyPI's Linux torchvision wheels are built against PyPI's CUDA torch. Beside
the CPU build of the same torch release (``torch==2.13.0+cpu`` here), torchvision's compiled
extension (``torchvision/_C.so``) does not load: it links ``libc10_cuda.so``/``libtorch_cuda.so``.
torchvision swallows that error, but then ``torchvision/_meta_registrations.py`` registers fake
kernels for the operators ``torchvision::nms`` and ``torchvision::qnms`` with
``torch.library.register_fake``, which needs the operators' schemas (normally defined by the
extension), and ``import torchvision`` dies with ``RuntimeError: operator torchvision::nms does
not exist``.

The fix here: try the plain import first (a torchvision whose extension loads needs nothing);
if it fails with that error, forget the half-imported modules, define the two schemas with
``torch.library.define`` (exactly as torchvision's C++ declares them: ``csrc/ops/nms.cpp`` and
the ``qnms`` declaration next to its quantized kernel) and import again. No kernel is registered:
the models (convolutions, pooling, BN, linear layers) never call those operators, while
``torchvision.ops.nms`` would fail with a missing-kernel error instead of silently computing
something. Only the schemas of operators that do not exist yet are defined, so a torchvision
whose extension does load is never touched.

Install (what ``.ci/run`` does; ``--no-deps`` keeps pip from replacing the CPU torch by the
CUDA one that these wheels pin, and timm's own requirements, huggingface_hub, safetensors and
pyyaml, are needed only to download or save weights, which these tests never do)::

    .venv/bin/pip install --no-deps "torchvision==0.28.*" timm==1.0.31   # with torch 2.13

Missing packages: the tests skip with the reason and this command, unless the environment
variable ``BATCHNORM_REQUIRE_MODELS=1`` is set (``.ci/run`` sets it), where they fail.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import torch

REQUIRE_ENV = "BATCHNORM_REQUIRE_MODELS"
TIMM_VERSION = "1.0.31"

# torchvision's operators whose fake (meta) kernels torchvision registers in Python at import.
_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# Whether this process had to define the schemas (torchvision's compiled extension is missing).
defined_schemas: list[str] = []


def matching_torchvision() -> str:
    """The torchvision release series built for the installed torch (2.N pairs with 0.(N+15))."""
    major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return f"0.{minor + 15}.*" if major == 2 else "<the release matching your torch>"


def install_command() -> str:
    return f'.venv/bin/pip install --no-deps "torchvision=={matching_torchvision()}" timm=={TIMM_VERSION}'


def required() -> bool:
    """Whether a missing torchvision/timm must fail the tests (CI) rather than skip them."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _forget(package: str) -> None:
    for key in [k for k in sys.modules if k == package or k.startswith(package + ".")]:
        del sys.modules[key]


def import_torchvision() -> ModuleType:
    """``import torchvision``, defining the missing operator schemas first when it needs them."""
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        _forget("torchvision")
        for name, schema in _SCHEMAS.items():
            if not _op_exists(name):
                torch.library.define(f"torchvision::{name}", schema)
                defined_schemas.append(name)
        import torchvision
    return torchvision


def import_timm() -> ModuleType:
    """``import timm`` (it imports torchvision, so that goes first)."""
    import_torchvision()
    import timm

    return timm
