"""Probes a training run can switch on.

* ``percentiles``: 15th/50th/85th percentile, over the test examples, of one unit's pre-activation
  (the input of a hidden layer's nonlinearity, after BN when BN is on) -- Ioffe & Szegedy Figure 1(b,c).
* ``grad_norms``: per weight layer, the norm of the loss gradient of its parameters.
* ``ics``: Santurkar et al. (2018)'s internal covariate shift: for layer i, G = gradient of layer i's
  weight at the current parameters, G' = the same gradient, same batch, after the *earlier* layers took
  this step's optimizer update; reports ||G - G'|| (and relative to ||G||) and cos(G, G').
* ``smoothness``: the loss and gradient along the step the optimizer took (Santurkar Fig. 4 moves along
  the gradient; measured along the actual update d, the measure does not depend on how the
  optimizer rescales the gradient): for multiples eta of the step, L(theta + eta d); ``loss_range`` =
  max - min of those losses, ``beta`` = max over eta of ||grad L(theta + eta d) - g|| / ||eta d||.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .models import layer_groups

__all__ = ["PreactivationProbe", "grad_norms", "ics_measure", "residual_variance", "smoothness"]

PROBES = ("percentiles", "grad_norms", "ics", "smoothness", "inference", "recalibrate")


class PreactivationProbe:
    """Records the input of ``model.hidden_acts[layer]`` for one unit."""

    def __init__(self, model: nn.Module, layer: int = -1, unit: int = 0):
        acts = getattr(model, "hidden_acts", [])
        if not acts:
            raise ValueError("this model exposes no hidden activations to probe")
        self.unit = unit
        self._chunks: list[torch.Tensor] = []
        self._handle = acts[layer].register_forward_pre_hook(self._hook)
        self.active = False

    def _hook(self, module, args):
        if self.active:
            x = args[0].detach()
            x = x[:, self.unit] if x.dim() >= 2 else x
            self._chunks.append(x.reshape(-1).float().cpu())

    def collect(self, fn):
        """Run ``fn()`` (a forward pass over the probe set); return its result and the percentiles."""
        self._chunks = []
        self.active = True
        try:
            result = fn()
        finally:
            self.active = False
        v = torch.cat(self._chunks).numpy() if self._chunks else np.empty(0)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return result, {"p15": float("nan"), "p50": float("nan"), "p85": float("nan")}
        p = np.percentile(v, [15, 50, 85])
        return result, {"p15": float(p[0]), "p50": float(p[1]), "p85": float(p[2])}

    def remove(self):
        self._handle.remove()


def grad_norms(model: nn.Module) -> list[float]:
    """Norm of the current ``.grad`` of each layer group's parameters (nan when absent)."""
    params = dict(model.named_parameters())
    out = []
    for _, names in layer_groups(model):
        sq = 0.0
        seen = False
        for n in names:
            g = params[n].grad
            if g is not None:
                sq += float(g.detach().double().pow(2).sum())
                seen = True
        out.append(math.sqrt(sq) if seen else float("nan"))
    return out


def _loss_fn(model, params, buffers, x, y):
    out = functional_call(model, {**params, **buffers}, (x,))
    return nn.functional.cross_entropy(out, y)


def _cloned_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def ics_measure(model: nn.Module, before: dict[str, torch.Tensor], x, y) -> dict[str, list[float]]:
    """Santurkar's ICS for every weight layer. ``before`` holds the parameters before this step's update;
    the model currently holds the parameters after it. Same batch, model in its current mode."""
    after = {n: p.detach() for n, p in model.named_parameters()}
    groups = layer_groups(model)
    first_weight = [names[0] for _, names in groups]
    diff, rel, cos = [], [], []
    for i in range(len(groups)):
        earlier = {n for _, ns in groups[:i] for n in ns}
        wname = first_weight[i]
        res = []
        for mix in (False, True):
            params = {}
            for n, p in before.items():
                src = after[n] if (mix and n in earlier) else p
                params[n] = src.detach().clone().requires_grad_(n == wname)
            loss = _loss_fn(model, params, _cloned_buffers(model), x, y)
            (g,) = torch.autograd.grad(loss, [params[wname]])
            res.append(g.detach().double().flatten())
        g0, g1 = res
        d = float((g0 - g1).norm())
        n0 = float(g0.norm())
        diff.append(d)
        rel.append(d / n0 if n0 > 0 else float("nan"))
        denom = n0 * float(g1.norm())
        cos.append(float(g0 @ g1) / denom if denom > 0 else float("nan"))
    return {"ics_diff": diff, "ics_rel": rel, "ics_cos": cos}


def smoothness(model: nn.Module, x, y, base: dict[str, torch.Tensor] | None = None,
               direction: dict[str, torch.Tensor] | None = None, etas=(0.5, 1.0, 2.0, 4.0)) -> dict[str, float]:
    """Loss and gradient variation along the step the optimizer actually took.

    ``base``: the parameters before the step (default: the model's current ones); ``direction``: the
    update the optimizer applied (``after - before``; default: minus the gradient, Santurkar's
    direction). For multiples ``eta`` of that step, ``loss_range`` = max - min of L(base + eta d) and
    ``beta`` = max over eta of ||grad L(base + eta d) - grad L(base)|| / ||eta d|| (effective
    beta-smoothness along the update)."""
    src = base if base is not None else {n: p.detach() for n, p in model.named_parameters()}
    params = {n: src[n].detach().clone().requires_grad_(True) for n in src}
    names = list(params)
    loss0 = _loss_fn(model, params, _cloned_buffers(model), x, y)
    grads0 = torch.autograd.grad(loss0, [params[n] for n in names], allow_unused=True)
    g = [torch.zeros_like(params[n]) if gi is None else gi.detach() for n, gi in zip(names, grads0)]
    d = [(-gi if direction is None else direction[n].detach()) for n, gi in zip(names, g)]
    dnorm = math.sqrt(sum(float(di.double().pow(2).sum()) for di in d))
    losses = [float(loss0.detach())]
    betas = []
    for eta in etas:
        moved = {n: (params[n].detach() + eta * di).requires_grad_(True) for n, di in zip(names, d)}
        loss = _loss_fn(model, moved, _cloned_buffers(model), x, y)
        g2 = torch.autograd.grad(loss, [moved[n] for n in names], allow_unused=True)
        dg = math.sqrt(
            sum(float((gi - (torch.zeros_like(gi) if g2i is None else g2i)).double().pow(2).sum())
                for gi, g2i in zip(g, g2))
        )
        losses.append(float(loss.detach()))
        if dnorm > 0:
            betas.append(dg / (eta * dnorm))
    finite = [v for v in losses if math.isfinite(v)]
    return {
        "loss_range": (max(finite) - min(finite)) if len(finite) == len(losses) else float("inf"),
        "beta": max(betas) if betas and all(math.isfinite(b) for b in betas) else float("inf"),
        "step_norm": dnorm,
    }


def residual_variance(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Variance of the residual stream after each residual block at the current parameters (De & Smith
    2020, Fig. 2): for ``model.blocks`` (an ``nn.Sequential`` of residual blocks), the mean over
    channels of the per-channel variance over the batch of the block's output."""
    out: list[float] = []
    blocks = model.blocks
    if not isinstance(blocks, nn.Module):
        raise TypeError(f"model.blocks is a {type(blocks).__name__}, not an nn.Sequential of residual blocks")
    hooks = [b.register_forward_hook(lambda m, a, o: out.append(float(o.detach().double().var(0).mean())))
             for b in blocks.children()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out
