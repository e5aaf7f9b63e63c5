"""The contract of a backend, typed: what :func:`batchnorm.kernels.select` may hand a caller.

A backend is a module; :class:`Backend` lists the functions every one has, the other protocols
the optional ones (the dispatcher and the operators test for them with ``hasattr``).
:class:`Running` is the record a training forward moves the running statistics through.

Conventions (the exact semantics are :mod:`batchnorm.kernels.reference`'s, the ground truth):
``x`` is ``(N, C, *S)``; ``mask`` ``None`` or bool ``(N, 1, *S)``; ``vbs`` the ghost batch size
(``0``: one group); training statistics are ``(G, C)`` mean and *biased* variance and a ``(G,)``
count; given statistics (``forward_apply``) are ``(C,)``. Every op gets the variance and ``eps``,
never ``1 / sqrt(var + eps)``. Gradients come back as ``(dx, dweight, dbias)`` (``dx`` ``None``
when not ``need_input_grad``), the parameter gradients in the statistics' dtype.

Argument order: the arguments the functions share come in one order,
``dy, x, residual, mean, var, eps, weight, bias, mask, count, vbs, act, slope`` (:data:`ARGUMENT_ORDER`), then the
flags (``need_input_grad``, ``need_residual_grad``) and ``running``, each function taking the
ones it needs. The same order holds for the operators of :mod:`batchnorm.ops` (their schemas and
eager entry points) and for the lean calls of :class:`LeanBackend`, whose own argument
(``stats``, the backend's statistics object) comes where the statistics would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

#: the order of the arguments the entry points share (the flags and ``running`` come after them)
ARGUMENT_ORDER = ("dy", "x", "residual", "mean", "var", "eps", "weight", "bias", "mask", "count", "vbs", "act",
                  "slope")

#: the ops a backend's ``supports``/``prepared`` are asked about
OPS = ("forward_train", "forward_apply", "backward_train", "backward_apply",
       "forward_train_act", "forward_apply_act", "backward_train_act", "backward_apply_act")


@dataclass
class Running:
    """Running statistics a training forward moves in place (``running += momentum * (batch -
    running)``, the variance unbiased): what ``forward_train(..., running=...)`` receives.

    With ``skip_nonfinite`` a batch whose mean or variance is not finite leaves the buffers as
    they were (the layers' default, ``nonfinite="skip"``); the backend then sets ``accepted`` to
    ``False``."""

    mean: Tensor
    var: Tensor
    momentum: float
    skip_nonfinite: bool = False
    accepted: bool = True


Grads = tuple[Tensor | None, Tensor, Tensor]
TrainOut = tuple[Tensor, Tensor, Tensor, Tensor]  # y, mean, var, count


class Backend(Protocol):
    """Every backend: the plain ops and ``supports``."""

    name: str

    def forward_train(self, x: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None,
                      mask: Tensor | None, vbs: int, running: Running | None = None) -> TrainOut:
        """Normalize with the batch's statistics (per group); with ``running`` (one group, no mask,
        eager mode) also move the running statistics."""
        ...

    def forward_apply(self, x: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None,
                      bias: Tensor | None) -> Tensor:
        """Normalize with given ``(C,)`` statistics."""
        ...

    def backward_train(self, dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float,
                       weight: Tensor | None, mask: Tensor | None, count: Tensor, vbs: int,
                       need_input_grad: bool = True) -> Grads:
        """Gradients of :meth:`forward_train` from its statistics."""
        ...

    def backward_apply(self, dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, eps: float,
                       weight: Tensor | None, need_input_grad: bool = True) -> Grads:
        """Gradients of :meth:`forward_apply`, the statistics constant."""
        ...

    def supports(self, op: str, x: Tensor, mask: Tensor | None = None, vbs: int = 0) -> bool:
        """Whether it can run ``op`` (one of :data:`OPS`) on this input."""
        ...


class FusedOps(Protocol):
    """Batch norm fused with an activation and a residual add (``y = act(bn(x) + residual)``):
    ``reference_act`` has them all, a backend may (:class:`FusedBackend`); for a backend without
    them the operators use ``reference_act``."""

    def forward_train_act(self, x: Tensor, residual: Tensor | None, eps: float, weight: Tensor | None,
                          bias: Tensor | None, mask: Tensor | None, vbs: int, act: str, slope: float,
                          running: Running | None = None) -> TrainOut: ...

    def forward_apply_act(self, x: Tensor, residual: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                          weight: Tensor | None, bias: Tensor | None, act: str, slope: float) -> Tensor: ...

    def backward_train_act(self, dy: Tensor, x: Tensor, residual: Tensor | None, mean: Tensor, var: Tensor,
                           eps: float, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None,
                           count: Tensor, vbs: int, act: str, slope: float, need_input_grad: bool = True,
                           need_residual_grad: bool = False
                           ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]: ...

    def backward_apply_act(self, dy: Tensor, x: Tensor, residual: Tensor | None, mean: Tensor, var: Tensor,
                           eps: float, weight: Tensor | None, bias: Tensor | None, act: str, slope: float,
                           need_input_grad: bool = True, need_residual_grad: bool = False
                           ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]: ...


class FusedBackend(Backend, FusedOps, Protocol):
    """A backend with the fused ops."""


class LeanBackend(Backend, Protocol):
    """A backend with the layers' lean training route (one group, no mask, eager mode): the
    statistics stay in the backend's own object between forward and backward."""

    def train_lean(self, x: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None,
                   running: Running | None) -> tuple[Tensor, Any]:
        """``(y, stats)``: the training forward, ``running`` moved by the same call."""
        ...

    def lean_stats(self, stats: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, var, count)`` as :meth:`Backend.forward_train` returns them."""
        ...

    def backward_lean(self, dy: Tensor, x: Tensor, stats: Any, eps: float, weight: Tensor | None,
                      need_input_grad: bool) -> Grads: ...


class PreparedBackend(Backend, Protocol):
    """A backend whose code gets ready at run time (compiled kernels): the dispatcher passes to the
    next backend until ``prepared`` says yes, or, with ``wait`` (a forced backend), waits."""

    def prepared(self, op: str, x: Tensor, wait: bool = False) -> bool: ...


__all__ = ["ARGUMENT_ORDER", "OPS", "Backend", "FusedBackend", "FusedOps", "Grads", "LeanBackend", "PreparedBackend",
           "Running", "TrainOut"]
