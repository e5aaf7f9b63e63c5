"""Batch renormalization (Ioffe 2017): BN whose training output does not depend on the batch
more than the clipping limits allow, for small or non-i.i.d. mini-batches."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import functional as F
from .modules import _NormBase


class _BatchRenormBase(_NormBase):
    r"""Batch renormalization: ``y = gamma * (r * xhat + d) + beta`` in training.

    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    against the running statistics ``mu``, ``sigma``, with ``r`` and ``d`` held constant in the
    backward. The limits follow the paper's schedule (:func:`batchnorm.functional.renorm_limits`):
    plain BN (``r_max = 1, d_max = 0``) for ``warmup_steps`` updates, then relaxed linearly to
    ``rmax`` at ``rmax_steps`` and ``dmax`` at ``dmax_steps``; set all three step counts to 0 to
    use ``rmax``/``dmax`` from the start. The step is ``num_batches_tracked``.
    Inference is Algorithm 2, as in BN. ``momentum`` defaults to 0.01 (the paper's rate), since
    the running statistics take part in training here.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, rmax: float = 3.0, dmax: float = 5.0, warmup_steps: int = 5000,
                 rmax_steps: int = 40000, dmax_steps: int = 25000, **kwargs: Any) -> None:
        if not track_running_stats:
            raise ValueError("batch renormalization needs track_running_stats=True (r and d use them)")
        if not isinstance(rmax, (int, float)) or rmax < 1:
            raise ValueError(f"rmax must be >= 1, got {rmax!r}")
        if not isinstance(dmax, (int, float)) or dmax < 0:
            raise ValueError(f"dmax must be >= 0, got {dmax!r}")
        for name, steps in (("warmup_steps", warmup_steps), ("rmax_steps", rmax_steps),
                            ("dmax_steps", dmax_steps)):
            if not isinstance(steps, int) or steps < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {steps!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.rmax_steps, self.dmax_steps = warmup_steps, rmax_steps, dmax_steps

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, "
                f"rmax_steps={self.rmax_steps}, dmax_steps={self.dmax_steps}")

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` in force at the current step (``num_batches_tracked``)."""
        assert self.num_batches_tracked is not None
        return F.renorm_limits(self.num_batches_tracked, self.rmax, self.dmax, self.warmup_steps,
                               self.rmax_steps, self.dmax_steps)

    def _normalize(self, x: Tensor, mask: Tensor | None, normalize_with_batch: bool,
                   update: bool, **path: Any) -> tuple[Tensor, Tensor | bool | None]:
        if not normalize_with_batch:
            return super()._normalize(x, mask, normalize_with_batch, update, **path)
        weight, bias = self._affine()
        rmax, dmax = self.current_limits()
        return F.batch_renorm(
            x, self.running_mean, self.running_var, weight, bias,  # type: ignore[arg-type]
            rmax=rmax, dmax=dmax, training=True, update=update,
            momentum=self._momentum_factor() if update else 0.0, eps=self.eps, mask=mask,
            virtual_batch_size=self.virtual_batch_size, nonfinite=self.nonfinite,
        )


class BatchRenorm1d(_BatchRenormBase):
    """Batch renormalization over 2D ``(N, C)`` or 3D ``(N, C, L)`` input."""

    _valid_dims = (2, 3)


class BatchRenorm2d(_BatchRenormBase):
    """Batch renormalization over 4D ``(N, C, H, W)`` input."""

    _valid_dims = (4,)


class BatchRenorm3d(_BatchRenormBase):
    """Batch renormalization over 5D ``(N, C, D, H, W)`` input."""

    _valid_dims = (5,)
