"""Shared helpers for the ported PyTorch tests (restated, not imported, from PyTorch's test utilities).

PyTorch's ``torch.testing._internal.common_utils`` is not imported on purpose: importing it changes
global torch state (backend flags, default dtype handling) for every other test in the session.
"""

from __future__ import annotations

import torch

# torch/testing/_internal/common_utils.py: PyTorch's internal ``gradcheck``/``gradgradcheck`` wrappers
# turn on ``check_batched_grad`` and ``fast_mode`` unless a test says otherwise; the ported
# gradient checks keep those defaults.
_GRADCHECK_DEFAULTS = {"check_batched_grad": True, "fast_mode": True}


def gradcheck(fn, inputs, **kwargs) -> bool:
    for key, value in _GRADCHECK_DEFAULTS.items():
        if kwargs.get(key) is None:
            kwargs[key] = value
    return torch.autograd.gradcheck(fn, inputs, **kwargs)


def gradgradcheck(fn, inputs, grad_outputs=None, **kwargs) -> bool:
    for key, value in _GRADCHECK_DEFAULTS.items():
        if kwargs.get(key) is None:
            kwargs[key] = value
    return torch.autograd.gradgradcheck(fn, inputs, grad_outputs, **kwargs)


def assert_grad_and_gradgrad(fn, inputs, **kwargs) -> None:
    """``_assertGradAndGradgradChecks`` of common_utils: gradcheck, then gradgradcheck."""
    assert gradcheck(fn, inputs, **kwargs)
    assert gradgradcheck(fn, inputs, **kwargs)


def assert_equal(actual, expected, **kwargs) -> None:
    """``TestCase.assertEqual`` on tensors (or ``None``): dtype-based default tolerances, NaN == NaN."""
    if actual is None or expected is None:
        assert actual is expected, f"{actual!r} is not {expected!r}"
        return
    kwargs.setdefault("equal_nan", True)
    torch.testing.assert_close(actual, expected, **kwargs)


def copy_state(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """``dst.load_state_dict(src.state_dict())`` (both torch's and our layers use the same keys)."""
    dst.load_state_dict(src.state_dict())
