"""Model zoo of the lab. Every model takes ``norm=`` and builds its normalization layers through
:func:`make_norm`, the single place that decides which class implements a norm name.

``norm`` is one of ``none | batchnorm | ghost | renorm | frozen | groupnorm | layernorm | noisy``, a layer
class (called as ``cls(num_features)``), or a ``"module:ClassName"`` string naming such a class.

Models expose two things the probes rely on:

* ``model.hidden_acts``: the activation modules of the hidden layers, in order; the input of an
  activation is the unit's pre-activation (after BN when BN is on), which Figure 1 tracks;
* :func:`layer_groups`: parameters grouped per weight layer (a Linear/Conv and the norm after it).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import nn as bnn

__all__ = [
    "MODELS",
    "NORMS",
    "ModelRecipe",
    "build_model",
    "layer_groups",
    "make_norm",
    "norm_name",
    "recipe",
    "resolve_norm",
]

NORMS = ("none", "batchnorm", "ghost", "renorm", "frozen", "groupnorm", "layernorm", "noisy")


def resolve_norm(norm) -> str | type | None:
    """Turn ``"pkg.mod:Class"`` into the class; leave names and classes alone."""
    if isinstance(norm, str) and ":" in norm:
        mod, _, qual = norm.partition(":")
        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj
    return norm


def norm_name(norm) -> str:
    """A stable, printable name for a norm (class -> ``module:qualname``)."""
    if norm is None:
        return "none"
    if isinstance(norm, type):
        return f"{norm.__module__}:{norm.__qualname__}"
    return str(norm)


def make_norm(norm, num_features: int, rank: int = 1, **kw) -> nn.Module:
    """Build one normalization layer for ``num_features`` channels of a ``rank``-D layout.

    rank 1: ``(N, C)`` or ``(N, C, L)``; rank 2: ``(N, C, H, W)``; rank 3: ``(N, C, D, H, W)``.
    ``kw`` is passed to the layer (e.g. ``virtual_batch_size`` for ghost, ``rmax`` for renorm).
    """
    norm = resolve_norm(norm)
    if norm is None or norm == "none":
        return nn.Identity()
    if isinstance(norm, type):
        return norm(num_features, **kw)
    if callable(norm) and not isinstance(norm, str):
        return norm(num_features, **kw)
    if norm == "batchnorm":
        return getattr(bnn, f"BatchNorm{rank}d")(num_features, **kw)
    if norm == "ghost":
        kw.setdefault("virtual_batch_size", 16)
        return getattr(bnn, f"BatchNorm{rank}d")(num_features, **kw)
    if norm == "renorm":
        return getattr(bnn, f"BatchRenorm{rank}d")(num_features, **kw)
    if norm == "frozen":
        # statistics frozen at their initial values (mean 0, var 1): the normalization is an identity
        # and only gamma/beta train -- the "BN without batch statistics" control.
        layer = getattr(bnn, f"BatchNorm{rank}d")(num_features, **kw)
        bnn.freeze(layer, stats=True, affine=False)
        return layer
    if norm == "groupnorm":
        # Wu & He (2018): 32 channels per group in their ResNets; here at most 8 groups (these layers have
        # 25-128 channels), the largest group count <= 8 that divides the channels
        groups = kw.pop("num_groups", None) or max(g for g in range(1, 9) if num_features % g == 0)
        return nn.GroupNorm(groups, num_features, **kw)
    if norm == "layernorm":
        # statistics per example over every channel and position: GroupNorm with one group is LayerNorm
        # for (N, C) and for conv/sequence layouts (N, C, *) alike, with a per-channel gamma and beta
        return nn.GroupNorm(1, num_features, **kw)
    if norm == "noisy":
        return NoisyBatchNorm(getattr(bnn, f"BatchNorm{rank}d")(num_features, **kw))
    raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)} or pass a layer class")


class NoisyBatchNorm(nn.Module):
    """Santurkar et al. (2018) "noisy BN": BN followed, in training, by a per-channel shift and scale drawn
    anew at every step (shift ~ U(-1, 1), scale ~ U(0.25, 2)), so the next layer's input distribution
    moves from step to step -- covariate shift injected on purpose. Evaluation is plain BN."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        y = self.bn(x)
        if not self.training:
            return y
        shape = (1, y.shape[1]) + (1,) * (y.dim() - 2)
        shift = torch.empty(shape, dtype=y.dtype).uniform_(-1.0, 1.0)
        scale = torch.empty(shape, dtype=y.dtype).uniform_(0.25, 2.0)
        return y * scale + shift


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[name]()


def _flat_dim(input_shape) -> int:
    return int(math.prod(input_shape))


class _Net(nn.Module):
    """Sequential body + list of hidden activations."""

    def __init__(self, body: nn.Sequential, hidden_acts: list[nn.Module]):
        super().__init__()
        self.body = body
        self.hidden_acts = list(hidden_acts)

    def forward(self, x):
        return self.body(x)


def _scale_weights(model: nn.Module, scale: float) -> None:
    if scale != 1.0:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                    m.weight.mul_(scale)


def paper_mlp(input_shape, num_classes, norm="none", width=100, depth=3, init_std=None, act="sigmoid",
              norm_kw=None, **_):
    """Ioffe & Szegedy (2015) MNIST net: 3 hidden layers of 100 sigmoid units, small Gaussian init,
    BN before each nonlinearity. ``init_std`` defaults to ``1/sqrt(fan_in)`` ("small random Gaussian")."""
    layers: list[nn.Module] = [nn.Flatten()]
    acts = []
    d = _flat_dim(input_shape)
    for _ in range(depth):
        lin = nn.Linear(d, width)
        nn.init.normal_(lin.weight, 0.0, init_std if init_std is not None else 1.0 / math.sqrt(d))
        nn.init.zeros_(lin.bias)
        a = _act(act)
        layers += [lin, make_norm(norm, width, 1, **(norm_kw or {})), a]
        acts.append(a)
        d = width
    out = nn.Linear(d, num_classes)
    nn.init.normal_(out.weight, 0.0, init_std if init_std is not None else 1.0 / math.sqrt(d))
    nn.init.zeros_(out.bias)
    layers.append(out)
    return _Net(nn.Sequential(*layers), acts)


def logistic(input_shape, num_classes, norm="none", norm_kw=None, **_):
    """Logistic regression (MNIST-1D's linear baseline, 32% in Greydanus 2020); ``norm`` normalizes the
    inputs."""
    d = _flat_dim(input_shape)
    return _Net(nn.Sequential(nn.Flatten(), make_norm(norm, d, 1, **(norm_kw or {})), nn.Linear(d, num_classes)), [])


def seed_mlp(input_shape, num_classes, norm="batchnorm", norm_kw=None, **_):
    """The seeds' Keras example: Dense 128 relu, BN, Dense 64 relu, BN, Dense softmax."""
    a1, a2 = nn.ReLU(), nn.ReLU()
    body = nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_dim(input_shape), 128), a1, make_norm(norm, 128, 1, **(norm_kw or {})),
        nn.Linear(128, 64), a2, make_norm(norm, 64, 1, **(norm_kw or {})),
        nn.Linear(64, num_classes),
    )
    return _Net(body, [a1, a2])


def mlp(input_shape, num_classes, norm="none", width=100, depth=2, act="relu", norm_kw=None, placement="before",
        dropout=0.0, **_):
    """MNIST-1D MLP after Greydanus (2020): Linear(40,100) ReLU Linear(100,100) ReLU Linear(100,10), the
    width and depth of the authors' ``MLPBase`` without its residual second layer (a plain stack, as
    the seed articles' networks; both reach ~65-66% there: docs/lab.md, "Checked against the literature");
    BN between each Linear and its ReLU when enabled (``placement="before"`` the activation, as Ioffe &
    Szegedy; ``"after"`` it, as the seed articles' Keras example). ``dropout > 0`` adds dropout after each
    hidden activation, so that it feeds the next layer's norm (Li et al. 2019's variance shift)."""
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after' the activation, not {placement!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    acts = []
    d = _flat_dim(input_shape)
    for _ in range(depth):
        a = _act(act)
        norm_layer = make_norm(norm, width, 1, **(norm_kw or {}))
        layers += [nn.Linear(d, width)] + ([norm_layer, a] if placement == "before" else [a, norm_layer])
        if dropout:
            layers.append(nn.Dropout(dropout))
        acts.append(a)
        d = width
    layers.append(nn.Linear(d, num_classes))
    return _Net(nn.Sequential(*layers), acts)


def deep_mlp(input_shape, num_classes, norm="none", width=64, depth=20, act="relu", init="he", norm_kw=None,
             **_):
    """Plain deep MLP without skips (``depth`` hidden layers); He-normal init by default, as in
    Yang et al. (2019)'s mean-field analysis of BN-ReLU nets."""
    layers: list[nn.Module] = [nn.Flatten()]
    acts = []
    d = _flat_dim(input_shape)
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        a = _act(act)
        layers += [lin, make_norm(norm, width, 1, **(norm_kw or {})), a]
        acts.append(a)
        d = width
    layers.append(nn.Linear(d, num_classes))
    return _Net(nn.Sequential(*layers), acts)


class _ResBlock(nn.Module):
    def __init__(self, width, norm, skipinit, norm_kw):
        super().__init__()
        self.norm = make_norm(norm, width, 1, **(norm_kw or {}))
        self.act = nn.ReLU()
        self.lin = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.lin.weight, nonlinearity="relu")
        nn.init.zeros_(self.lin.bias)
        # SkipInit (De & Smith 2020): a scalar multiplier on the residual branch, initialised to zero
        self.alpha = nn.Parameter(torch.zeros(())) if skipinit else None

    def forward(self, x):
        h = self.lin(self.act(self.norm(x)))
        return x + (self.alpha * h if self.alpha is not None else h)


class ResMLP(nn.Module):
    def __init__(self, input_shape, num_classes, norm="none", width=64, depth=20, skipinit=False, norm_kw=None,
                 **_):
        super().__init__()
        self.flatten = nn.Flatten()
        self.inp = nn.Linear(_flat_dim(input_shape), width)
        self.blocks = nn.Sequential(*[_ResBlock(width, norm, skipinit, norm_kw) for _ in range(depth)])
        self.final_norm = make_norm(norm, width, 1, **(norm_kw or {}))
        self.final_act = nn.ReLU()
        self.out = nn.Linear(width, num_classes)
        self.hidden_acts = [b.act for b in self.blocks] + [self.final_act]

    def forward(self, x):
        h = self.blocks(self.inp(self.flatten(x)))
        return self.out(self.final_act(self.final_norm(h)))


def resnet_mlp(input_shape, num_classes, **kw):
    """Pre-activation residual MLP: x + f(x), f = Linear(ReLU(norm(x))); ``skipinit=True`` adds SkipInit."""
    return ResMLP(input_shape, num_classes, **kw)


class _ConvBlock(nn.Module):
    """Basic residual block (He et al. 2016): conv3x3-norm-ReLU-conv3x3-norm plus the shortcut (a strided
    1x1 conv where the shape changes), then ReLU. ``skipinit``: no norm, the residual branch scaled by a
    scalar initialised to 0 (De & Smith 2020)."""

    def __init__(self, rank, cin, cout, stride, norm, skipinit, norm_kw):
        super().__init__()
        conv = _conv_cls(rank)
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.n1 = make_norm(norm, cout, rank, **(norm_kw or {}))
        self.act1 = nn.ReLU()
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.n2 = make_norm(norm, cout, rank, **(norm_kw or {}))
        self.short = (conv(cin, cout, 1, stride=stride, bias=False) if (stride != 1 or cin != cout)
                      else nn.Identity())
        self.alpha = nn.Parameter(torch.zeros(())) if skipinit else None
        self.act2 = nn.ReLU()

    def forward(self, x):
        h = self.n2(self.conv2(self.act1(self.n1(self.conv1(x)))))
        if self.alpha is not None:
            h = self.alpha * h
        return self.act2(self.short(x) + h)


class ResNet(nn.Module):
    """A small ResNet for 28x28 images (or 1-D sequences): a 3x3 stem, three stages of ``blocks`` basic
    blocks with ``width``, 2x, 4x channels (stride 2 between stages), global average pooling, linear."""

    def __init__(self, input_shape, num_classes, norm="none", width=16, blocks=1, skipinit=False, norm_kw=None,
                 **_):
        super().__init__()
        rank = len(input_shape) - 1
        conv = _conv_cls(rank)
        self.stem = nn.Sequential(conv(input_shape[0], width, 3, padding=1, bias=False),
                                  make_norm(norm, width, rank, **(norm_kw or {})), nn.ReLU())
        layers, cin = [], width
        for i, c in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(_ConvBlock(rank, cin, c, 2 if (i > 0 and j == 0) else 1, norm, skipinit, norm_kw))
                cin = c
        self.blocks = nn.Sequential(*layers)
        pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[rank]
        self.head = nn.Sequential(pool(1), nn.Flatten(), nn.Linear(cin, num_classes))
        self.hidden_acts = [b.act2 for b in layers]
        for m in self.modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def resnet(input_shape, num_classes, **kw):
    return ResNet(input_shape, num_classes, **kw)


def _conv_cls(rank: int):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]


def cnn(input_shape, num_classes, norm="none", channels=25, norm_kw=None, **_):
    """MNIST-1D reference CNN: three convolutions of 25 channels, kernels 5/3/3, stride 2, padding 1, ReLU,
    then a linear readout. Works on 1-D (C, L) and 2-D (C, H, W) inputs."""
    rank = len(input_shape) - 1
    conv = _conv_cls(rank)
    layers: list[nn.Module] = []
    acts = []
    c = input_shape[0]
    for k in (5, 3, 3):
        a = nn.ReLU()
        layers += [conv(c, channels, k, stride=2, padding=1), make_norm(norm, channels, rank, **(norm_kw or {})), a]
        acts.append(a)
        c = channels
    layers.append(nn.Flatten())
    with torch.no_grad():
        n_flat = nn.Sequential(*layers)(torch.zeros(2, *input_shape)).shape[1] if norm in (None, "none") else None
    if n_flat is None:
        size = list(input_shape[1:])
        for k in (5, 3, 3):
            size = [(s + 2 - k) // 2 + 1 for s in size]
        n_flat = channels * int(math.prod(size))
    layers.append(nn.Linear(n_flat, num_classes))
    return _Net(nn.Sequential(*layers), acts)


def cnn2d(input_shape, num_classes, norm="none", width=32, norm_kw=None, **_):
    """Small CNN for image data: 3x(conv3x3 - norm - ReLU), max-pooling after the first two, global
    average pooling, linear readout (Fashion-MNIST's '3 conv + BN' baseline scale)."""
    rank = len(input_shape) - 1
    conv = _conv_cls(rank)
    pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[rank]
    gap = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[rank]
    chans = [input_shape[0], width, 2 * width, 2 * width]
    layers: list[nn.Module] = []
    acts = []
    for i in range(3):
        a = nn.ReLU()
        layers += [conv(chans[i], chans[i + 1], 3, padding=1),
                   make_norm(norm, chans[i + 1], rank, **(norm_kw or {})), a]
        acts.append(a)
        if i < 2:
            layers.append(pool(2))
    layers += [gap(1), nn.Flatten(), nn.Linear(chans[-1], num_classes)]
    return _Net(nn.Sequential(*layers), acts)


class _StepNorms(nn.Module):
    """One norm layer per time step (BN-LSTM's per-timestep statistics); steps past the last reuse it."""

    def __init__(self, norm, num_features, steps, gamma, norm_kw, beta=True):
        super().__init__()
        self.layers = nn.ModuleList([make_norm(norm, num_features, 1, **(norm_kw or {})) for _ in range(steps)])
        with torch.no_grad():
            for layer in self.layers:
                w = getattr(layer, "weight", None)
                if isinstance(w, torch.Tensor) and w is not None:
                    w.fill_(gamma)
                b = getattr(layer, "bias", None)
                if not beta and isinstance(b, nn.Parameter):
                    b.requires_grad_(False)

    def forward(self, x, t):
        return self.layers[min(t, len(self.layers) - 1)](x)


class LSTMClassifier(nn.Module):
    """LSTM over the sequence dimension of the input (MNIST-1D: 40 steps of 1 value; images: rows).

    With a norm (BN-LSTM, Cooijmans et al. 2017): gates = BN_t(W_h h) + BN_t(W_x x) + b, and
    h = o * tanh(BN_t(c)), with separate statistics for every time step and gamma initialised to 0.1.
    """

    def __init__(self, input_shape, num_classes, norm="none", hidden=64, gamma=0.1, norm_kw=None, **_):
        super().__init__()
        if len(input_shape) == 2:  # (C, L): L steps of C features
            self.steps, feat = input_shape[1], input_shape[0]
        else:  # (C, H, W): H steps of C*W features
            self.steps, feat = input_shape[1], input_shape[0] * int(math.prod(input_shape[2:]))
        self.hidden = hidden
        self.use_norm = norm not in (None, "none")
        self.wx = nn.Linear(feat, 4 * hidden, bias=not self.use_norm)
        self.wh = nn.Linear(hidden, 4 * hidden, bias=False)
        nn.init.orthogonal_(self.wh.weight)
        if self.use_norm:
            self.bias = nn.Parameter(torch.zeros(4 * hidden))
            self.bn_x = _StepNorms(norm, 4 * hidden, self.steps, gamma, norm_kw, beta=False)
            self.bn_h = _StepNorms(norm, 4 * hidden, self.steps, gamma, norm_kw, beta=False)
            self.bn_c = _StepNorms(norm, hidden, self.steps, gamma, norm_kw)
        with torch.no_grad():  # forget-gate bias 1
            b = self.bias if self.use_norm else self.wx.bias
            b[hidden : 2 * hidden].fill_(1.0)
        self.cell_act = nn.Tanh()
        self.out = nn.Linear(hidden, num_classes)
        self.hidden_acts = [self.cell_act]

    def forward(self, x):
        n = x.shape[0]
        if x.dim() == 3:
            seq = x.transpose(1, 2)  # (N, L, C)
        else:
            seq = x.flatten(3).permute(0, 2, 1, 3).flatten(2) if x.dim() == 4 else x.flatten(2)
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        # one matmul for all steps, split once: indexing xs[:, t] at every step would make autograd
        # build a zero (N, T, 4H) gradient per step and add them all (O(T^2) memory traffic, 60-70%
        # of a BN-LSTM step at T = 40); unbind's backward stacks the T gradients once
        xs = self.wx(seq).unbind(1)
        for t in range(seq.shape[1]):
            if self.use_norm:
                gates = self.bn_x(xs[t], t) + self.bn_h(self.wh(h), t) + self.bias
            else:
                gates = xs[t] + self.wh(h)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            cc = self.bn_c(c, t) if self.use_norm else c
            h = torch.sigmoid(o) * self.cell_act(cc)
        return self.out(h)


def lstm(input_shape, num_classes, **kw):
    return LSTMClassifier(input_shape, num_classes, **kw)


@dataclass(frozen=True)
class ModelRecipe:
    """Default training recipe of a model (used when the command line gives none)."""

    optimizer: str
    lr: float
    batch_size: int
    steps: int
    note: str = ""


MODELS: dict[str, tuple[Callable[..., nn.Module], ModelRecipe]] = {
    "logistic": (logistic, ModelRecipe("adam", 1e-2, 100, 8000, "MNIST-1D reference: Adam lr 1e-2, batch 100")),
    "paper-mlp": (paper_mlp, ModelRecipe("sgd", 0.5, 60, 4000, "Ioffe & Szegedy Fig. 1: SGD, batch 60")),
    "seed-mlp": (seed_mlp, ModelRecipe("adam", 1e-3, 32, 3000, "the seeds' Keras example: Adam, batch 32")),
    "mlp": (mlp, ModelRecipe("adam", 1e-2, 100, 8000, "MNIST-1D reference: Adam lr 1e-2, batch 100, 8000 steps")),
    "cnn": (cnn, ModelRecipe("adam", 1e-2, 100, 8000, "MNIST-1D reference: Adam lr 1e-2, batch 100, 8000 steps")),
    "cnn2d": (cnn2d, ModelRecipe("adam", 1e-3, 100, 3000, "small image CNN")),
    "deep-mlp": (deep_mlp, ModelRecipe("sgd", 0.05, 100, 2000, "plain deep MLP, SGD")),
    "resnet-mlp": (resnet_mlp, ModelRecipe("sgd", 0.05, 100, 2000, "pre-activation residual MLP, SGD")),
    "resnet": (resnet, ModelRecipe("momentum", 0.1, 128, 3000, "small ResNet: SGD momentum 0.9, lr 0.1, batch 128")),
    "lstm": (lstm, ModelRecipe("adam", 1e-2, 100, 2000, "LSTM / BN-LSTM over time steps")),
}


#: The recipe of a user's model (``module:function``) when the command line gives none.
USER_RECIPE = ModelRecipe("adam", 1e-3, 64, 1000, "your model: Adam lr 1e-3, batch 64, 1000 steps")


def recipe(model: str) -> ModelRecipe:
    if ":" in model and model not in MODELS:
        return USER_RECIPE
    return MODELS[model][1]


def build_model(name: str, input_shape, num_classes: int, norm="none", weight_scale: float = 1.0,
                **kw) -> nn.Module:
    """Build a zoo model; ``weight_scale`` multiplies every Linear/Conv weight after initialization."""
    if ":" in name and name not in MODELS:  # a user's factory, module:function
        from .byo import build_user_model

        model = build_user_model(name, input_shape, num_classes, norm=norm_name(norm), norm_kw=kw.get("norm_kw"))
        _scale_weights(model, weight_scale)
        return model
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = MODELS[name][0](tuple(input_shape), num_classes, norm=resolve_norm(norm), **kw)
    _scale_weights(model, weight_scale)
    return model


_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Parameter names grouped per weight layer: a Linear/Conv starts a group; parameters of the modules
    that follow it (its norm, a SkipInit scalar) join it. Returns ``[(layer_name, [param names])]``."""
    groups: list[tuple[str, list[str]]] = []
    for mname, module in model.named_modules():
        own = [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
        if isinstance(module, _WEIGHT_TYPES):
            groups.append((mname, own))
        elif own:
            if groups:
                groups[-1][1].extend(own)
            else:
                groups.append((mname, own))
    return groups
