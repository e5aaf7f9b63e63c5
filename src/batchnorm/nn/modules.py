"""Batch-normalization layers: drop-in for ``torch.nn.BatchNorm*``, plus what torch lacks.

All layers share :class:`_NormBase`: the state (parameters and buffers with torch's names,
shapes and ``state_dict`` keys), argument checking, the three freezing knobs and the forward,
which calls :mod:`batchnorm.functional`. The rank-specific classes only say which input ranks
they accept; :class:`BatchNorm` takes the features on any axis.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from .. import _lean
from .. import functional as F


def _check_momentum(momentum: float | None) -> None:
    if momentum is None:
        return
    if not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}; "
            "PyTorch convention: running = (1 - momentum) * running + momentum * batch"
        )
    if momentum > 0.5:
        warnings.warn(
            f"momentum={momentum} in PyTorch convention moves the running statistics "
            f"{momentum:.0%} of the way to each batch; this looks like a Keras/Flax momentum "
            f"(moving = m * moving + (1 - m) * batch). If so use momentum={1 - momentum:.3g} or "
            "BatchNorm*.from_keras(...).",
            UserWarning,
            stacklevel=4,
        )


class _NormBase(_TorchBatchNorm):
    """State, checks, freezing knobs and forward shared by every batch-norm layer.

    A subclass of torch's ``torch.nn.modules.batchnorm._BatchNorm``, so that code that recognises
    batch-norm layers by that class (``torch.func.replace_all_batch_norm_modules_``, DDP's
    ``convert_sync_batchnorm``, model surgery in other libraries) treats ours as it treats
    torch's; none of torch's implementation runs (``__init__`` and ``forward`` are ours).

    Freezing is three independent knobs that ``model.train()`` never touches:

    * ``use_running_stats``: in training mode, normalize with the running statistics instead of
      the batch's (eval-style normalization while training);
    * ``update_running_stats``: in training mode, update the running statistics;
    * ``train_affine``: whether gamma/beta receive gradients.
    """

    _version = 2
    _valid_dims: tuple[int, ...] = ()  # accepted input ranks; () = any rank >= 2
    _axis: int = 1  # the features axis

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        weight: bool = True,
        virtual_batch_size: int | None = None,
        nonfinite: str = "skip",
    ) -> None:
        nn.Module.__init__(self)  # not torch's _BatchNorm.__init__: the state below is ours
        if not (isinstance(num_features, int) and num_features >= 1) and not isinstance(self, LazyModuleMixin):
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r} (1e-5 is PyTorch's default, 1e-3 Keras')")
        _check_momentum(momentum)
        if virtual_batch_size is not None and (not isinstance(virtual_batch_size, int) or virtual_batch_size < 1):
            raise ValueError(f"virtual_batch_size must be a positive integer or None, got {virtual_batch_size!r}")
        F.check_nonfinite_mode(nonfinite)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.virtual_batch_size = virtual_batch_size
        self.nonfinite = nonfinite
        self.use_running_stats = False
        self.update_running_stats = True
        self._train_affine = True
        if affine and weight:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            self.running_mean: Tensor | None
            self.running_var: Tensor | None
            self.num_batches_tracked: Tensor | None
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # -- torch.nn compatibility -------------------------------------------------------------

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def extra_repr(self) -> str:
        parts = [
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        ]
        if self.affine and self.bias is None:
            parts.append("bias=False")
        if self.affine and self.weight is None:
            parts.append("weight=False")
        if self._axis != 1:
            parts.append(f"axis={self._axis}")
        if self.virtual_batch_size:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
        if self.use_running_stats:
            parts.append("use_running_stats=True")
        if not self.update_running_stats:
            parts.append("update_running_stats=False")
        if not self._train_affine:
            parts.append("train_affine=False")
        return ", ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = (
                self.num_batches_tracked
                if self.num_batches_tracked is not None and self.num_batches_tracked.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- conventions --------------------------------------------------------------------------

    @classmethod
    def from_keras(cls, num_features: int, momentum: float = 0.99, epsilon: float = 1e-3,
                   center: bool = True, scale: bool = True, **kwargs: Any) -> _NormBase:
        """Build the layer from Keras/Flax arguments.

        Keras' ``moving = momentum * moving + (1 - momentum) * batch`` becomes PyTorch's
        ``momentum = 1 - momentum``; ``epsilon`` is ``eps``; ``center``/``scale`` are ``bias``/``weight``.
        """
        return cls(num_features, eps=epsilon, momentum=F.keras_to_torch_momentum(momentum),
                   affine=center or scale, bias=center, weight=scale, **kwargs)

    # -- freezing knobs -----------------------------------------------------------------------

    @property
    def train_affine(self) -> bool:
        """Whether gamma/beta are trained (False detaches them in forward, whatever requires_grad says)."""
        return self._train_affine

    @train_affine.setter
    def train_affine(self, value: bool) -> None:
        self._train_affine = bool(value)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(self._train_affine)

    # -- forward ------------------------------------------------------------------------------

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(input).__name__}")
        if self._valid_dims and input.dim() not in self._valid_dims:
            wanted = " or ".join(f"{d}D" for d in self._valid_dims)
            raise F.InputError(
                f"expected {wanted} input (got {input.dim()}D input) in {type(self).__name__}; "
                "shape (N, C, *): use the BatchNorm class of the input's rank, or batchnorm.BatchNorm(axis=...)"
            )
        if input.dim() < 2:
            raise F.InputError(f"expected at least 2D input (got {input.dim()}D input)")
        if not -input.dim() <= self._axis < input.dim():
            raise F.InputError(
                f"the features axis {self._axis} does not exist in a {input.dim()}D input of shape "
                f"{tuple(input.shape)}; axis must be in [{-input.dim()}, {input.dim() - 1}]"
            )
        axis = self._axis % input.dim()
        if axis == 0:
            raise F.InputError(f"the features axis {self._axis} is the batch axis of a {input.dim()}D input")
        if input.shape[axis] != self.num_features and not isinstance(self.weight, UninitializedParameter):
            raise F.InputError(
                f"expected input with {self.num_features} features on axis {self._axis}, got "
                f"{input.shape[axis]} (input shape {tuple(input.shape)}); check num_features or the layout"
            )

    def _momentum_factor(self) -> float | Tensor:
        """``f`` in ``running += f * (batch - running)``: momentum, or 1/t for the t-th update."""
        if self.momentum is not None:
            return self.momentum
        assert self.num_batches_tracked is not None
        return (self.num_batches_tracked + 1).double().reciprocal()

    def _count_batch(self, accepted: Tensor | bool | None) -> None:
        """Add an applied running-statistics update (a 0-d bool tensor, or ``True``) to
        ``num_batches_tracked``."""
        if accepted is None:
            return
        nbt = self.num_batches_tracked
        if nbt is None:
            return
        if isinstance(accepted, bool):
            nbt.add_(int(accepted))
        else:
            nbt.add_(accepted if accepted.device == nbt.device else accepted.to(nbt.device))

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        if self._train_affine:
            return self.weight, self.bias
        return (None if self.weight is None else self.weight.detach(),
                None if self.bias is None else self.bias.detach())

    def _normalize(self, x: Tensor, mask: Tensor | None, normalize_with_batch: bool,
                   update: bool, **path: Any) -> tuple[Tensor, Tensor | bool | None]:
        """The math on channel-first input: :func:`batchnorm.functional.batch_norm_with_update`,
        given ``path``'s options by the variants (a fused activation, a collective); renormalization
        replaces it."""
        weight, bias = self._affine()
        return F.batch_norm_with_update(
            x, self.running_mean, self.running_var, weight, bias,
            normalize_with_batch=normalize_with_batch, update=update,
            momentum=self._momentum_factor() if update else 0.0, eps=self.eps, mask=mask,
            virtual_batch_size=self.virtual_batch_size if normalize_with_batch else None,
            nonfinite=self.nonfinite, accepted_tensor=False, **path,
        )

    def _modes(self) -> tuple[bool, bool]:
        """``(normalize_with_batch, update)`` for this call, with torch's meaning of the flags
        (``track_running_stats`` may be changed after construction): in training the running
        statistics are used and updated only while ``track_running_stats`` is True; in eval they
        are used whenever they exist. The freezing knobs refine that."""
        buffers = self.running_mean is not None and self.running_var is not None
        if not self.training:
            return not buffers, False
        tracked = buffers and self.track_running_stats
        return not (tracked and self.use_running_stats), tracked and self.update_running_stats

    def __prepare_scriptable__(self) -> nn.Module:
        raise TypeError(
            f"torch.jit.script cannot compile {type(self).__name__}: its forward is Python code around "
            "custom operators. Use torch.compile or torch.export (both supported), torch.jit.trace, "
            "or batchnorm.convert(model, 'torch') for a TorchScript model with torch's layers."
        )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (optional) marks the valid positions, shape as ``input``
        without its features axis (e.g. ``(N, L)`` for ``(N, C, L)``)."""
        if mask is None and self._axis == 1 and type(self)._normalize is _NormBase._normalize:
            # small CPU inputs: ATen's kernel, with the fewest Python steps (see _lean.layer_call_aten)
            y = _lean.layer_call_aten(self, input)
            if y is not None:
                return y
        self._check_input_dim(input)
        axis = self._axis % input.dim()
        x = input if axis == 1 else input.movedim(axis, 1)
        normalize_with_batch, update = self._modes()
        lean = None
        if (mask is None and type(self)._normalize is _NormBase._normalize
                and not (normalize_with_batch and self.virtual_batch_size)):
            weight, bias = self._affine()
            lean = _lean.layer_call_lean(x, self.running_mean, self.running_var, weight, bias,
                                     normalize_with_batch=normalize_with_batch, update=update,
                                     momentum=self._momentum_factor() if update else 0.0, eps=self.eps,
                                     nonfinite=self.nonfinite)
        y, accepted = lean if lean is not None else self._normalize(x, mask, normalize_with_batch, update)
        self._count_batch(accepted)
        return y if axis == 1 else y.movedim(1, axis)


class _BatchNorm(_NormBase):
    """Base of the rank-specific batch-norm layers (``BatchNorm1d/2d/3d``)."""


class BatchNorm1d(_BatchNorm):
    """Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input; drop-in for ``torch.nn.BatchNorm1d``.

    Extra keyword-only options (all off by default): ``weight=False`` (no gamma),
    ``virtual_batch_size`` (ghost batches), ``nonfinite`` (``"skip"``: a NaN/inf batch does not
    touch the running statistics), ``forward(x, mask=...)`` for padded positions, and the
    freezing knobs ``use_running_stats``, ``update_running_stats``, ``train_affine``.
    """

    _valid_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over a 4D ``(N, C, H, W)`` input; drop-in for ``torch.nn.BatchNorm2d``.

    See :class:`BatchNorm1d` for the options torch does not have.
    """

    _valid_dims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch normalization over a 5D ``(N, C, D, H, W)`` input; drop-in for ``torch.nn.BatchNorm3d``.

    See :class:`BatchNorm1d` for the options torch does not have.
    """

    _valid_dims = (5,)


class BatchNorm(_NormBase):
    """Batch normalization with the features on any axis (default ``-1``: ``(N, ..., C)``).

    ``BatchNorm(64, axis=-1)`` normalizes ``(N, L, 64)`` sequences without transposes; any rank
    >= 2 is accepted. Everything else is as :class:`BatchNorm1d`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, axis: int = -1, **kwargs: Any) -> None:
        if not isinstance(axis, int) or axis == 0:
            raise ValueError(f"axis must be a non-zero int (axis 0 is the batch), got {axis!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self._axis = axis

    @property
    def axis(self) -> int:
        return self._axis


# ----------------------------------------------------------------------------- lazy layers


class _LazyNormBase(LazyModuleMixin, _NormBase):
    """``num_features`` inferred from the first input, like ``torch.nn.LazyBatchNorm*``."""

    weight: UninitializedParameter  # type: ignore[assignment]
    bias: UninitializedParameter  # type: ignore[assignment]

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *,
                 bias: bool = True, weight: bool = True, **kwargs: Any) -> None:
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__(0, eps, momentum, False, False, **factory, **kwargs)  # type: ignore[misc]
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine and weight:
            self.weight = UninitializedParameter(**factory)
        if affine and bias:
            self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor, mask: Tensor | None = None) -> None:  # type: ignore[override]
        # without parameters or buffers to materialize (affine=False, track_running_stats=False)
        # the first input still sets num_features
        if self.has_uninitialized_params() or self.num_features == 0:
            self.num_features = input.shape[self._axis]
            for t in (self.weight, self.bias, self.running_mean, self.running_var):
                if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
                    t.materialize((self.num_features,))
            self.reset_parameters()


class LazyBatchNorm1d(_LazyNormBase, _BatchNorm):
    """:class:`BatchNorm1d` with ``num_features`` inferred from the first input."""

    _valid_dims = (2, 3)
    cls_to_become = BatchNorm1d  # type: ignore[assignment]


class LazyBatchNorm2d(_LazyNormBase, _BatchNorm):
    """:class:`BatchNorm2d` with ``num_features`` inferred from the first input."""

    _valid_dims = (4,)
    cls_to_become = BatchNorm2d  # type: ignore[assignment]


class LazyBatchNorm3d(_LazyNormBase, _BatchNorm):
    """:class:`BatchNorm3d` with ``num_features`` inferred from the first input."""

    _valid_dims = (5,)
    cls_to_become = BatchNorm3d  # type: ignore[assignment]
