"""Small models the tool tests run on: Sequential, fx-traceable custom modules, shared modules."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import nn

import batchnorm as B


def bn2d(c: int, torch_bn: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if torch_bn else B.BatchNorm2d(c)


def small_cnn(torch_bn: bool = False) -> nn.Sequential:
    """Conv-BN-ReLU twice, pooled, a linear head: the Sequential every tool must handle."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), bn2d(8, torch_bn), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), bn2d(6, torch_bn), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )


class Block(nn.Module):
    """A residual block (fx-traceable, not Sequential)."""

    def __init__(self, c: int, torch_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = bn2d(c, torch_bn)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.bn2 = bn2d(c, torch_bn)

    def forward(self, x):
        y = TF.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class CustomNet(nn.Module):
    """fx-traceable: stem, residual block, transposed conv + BN, BN before a linear head."""

    def __init__(self, torch_bn: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bn2d(4, torch_bn)
        self.block = Block(4, torch_bn)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
        self.up_bn = bn2d(6, torch_bn)
        self.head_bn = nn.BatchNorm1d(6) if torch_bn else B.BatchNorm1d(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = TF.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = self.up_bn(self.up(x))
        x = x.mean((2, 3))
        return self.head(self.head_bn(x))


class SharedNet(nn.Module):
    """One conv used twice: once followed by a BN, once not; one BN used twice."""

    def __init__(self, torch_bn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = bn2d(3, torch_bn)
        self.shared_bn = bn2d(3, torch_bn)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        a = self.bn(self.conv(x))
        b = self.conv(a)  # the conv again, without a BN
        c = self.shared_bn(self.conv2(b)) + self.shared_bn(b)
        return self.fc(c.mean((2, 3)))


def trained(model: nn.Module, steps: int = 4, shape=(8, 3, 8, 8)) -> nn.Module:
    """Run a few training-mode batches so the running statistics and affine are non-trivial."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "weight", None) is not None and B.is_batchnorm(m):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
        model.train()
        for _ in range(steps):
            model(torch.randn(*shape, generator=g) * 2 + 0.5)
    return model.eval()
