"""MobileNet-V1 (BN, eps 1e-3) and BN-folded MobileNet-V2, as converted from TensorFlow releases.

Both use TF "SAME" padding and ReLU6; module names follow the state-dict layouts documented in
``shared/assets/README.md`` so the converted weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from autodfp.models.layers import Conv2dSame


class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int = 1, eps: float = 1e-3) -> None:
        super().__init__()
        self.conv = Conv2dSame(cin, cout, k, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.act = nn.ReLU6(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MobileNetV1(nn.Module):
    # (output channels of the pointwise conv, stride of the preceding depthwise conv), at width 1.0
    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, width: float = 0.75, num_classes: int = 1000) -> None:
        super().__init__()
        c = int(32 * width)
        layers: list[nn.Module] = [ConvBNAct(3, c, 3, 2)]
        for cout, s in self.CFG:
            cout = int(cout * width)
            layers.append(ConvBNAct(c, c, 3, s, groups=c))
            layers.append(ConvBNAct(c, cout, 1, 1))
            c = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(c, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x))).flatten(1)


class ConvAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.conv = Conv2dSame(cin, cout, k, stride, bias=True)
        self.act = nn.ReLU6(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class InvertedResidualFolded(nn.Module):
    """expand (1x1, ReLU6) → dw (3x3, ReLU6) → project (1x1, linear), BN already folded into biases."""

    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = cin * t
        self.use_res = stride == 1 and cin == cout
        self.expand = Conv2dSame(cin, hidden, 1, 1, bias=True) if t != 1 else None
        self.act1 = nn.ReLU6(inplace=False) if t != 1 else None
        self.dw = Conv2dSame(hidden, hidden, 3, stride, groups=hidden, bias=True)
        self.act2 = nn.ReLU6(inplace=False)
        self.project = Conv2dSame(hidden, cout, 1, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand is not None:
            assert self.act1 is not None  # built together with expand (t != 1)
            out = self.act1(self.expand(out))
        out = self.project(self.act2(self.dw(out)))
        return x + out if self.use_res else out


class MobileNetV2Folded(nn.Module):
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1001) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvAct(3, 32, 3, 2)]
        c = 32
        for t, cout, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidualFolded(c, cout, s if i == 0 else 1, t))
                c = cout
        layers.append(ConvAct(c, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(1280, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x))).flatten(1)


def mobilenet_v1_075(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(0.75, num_classes)


def mobilenet_v2_100_folded(num_classes: int = 1001) -> MobileNetV2Folded:
    return MobileNetV2Folded(num_classes)
