"""Small convolutional networks, one per architectural pattern the dependency rules must handle.

Each builder returns a module with `example_inputs()`; widths are tiny so tests export and prune
them in well under a second each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Net(nn.Module):
    input_names = ("x",)
    input_shape: tuple[int, ...] = (3, 16, 16)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor]:
        return (torch.randn(batch, *self.input_shape),)


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class VGG(_Net):
    """Plain conv stacks, pooling, Flatten into a Linear (a channel becomes H*W features)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16), conv_bn(16, 16), nn.MaxPool2d(2), conv_bn(16, 32),
                                      nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, groups=groups),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class _Classifier(_Net):
    """stem -> blocks -> global average pool -> Linear."""

    def __init__(self, stem: nn.Module, blocks: nn.Module, width: int, classes: int = 10) -> None:
        super().__init__()
        self.stem, self.blocks = stem, blocks
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def resnet_basic() -> nn.Module:
    """Residual streams: every block writing into one stream couples its output channels."""
    return _Classifier(conv_bn(3, 16), nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2), BasicBlock(32, 32)), 32)


def resnet_bottleneck() -> nn.Module:
    return _Classifier(conv_bn(3, 16), nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 8, 32),
                                                     Bottleneck(32, 16, 48, 2)), 48)


def resnext() -> nn.Module:
    """Grouped 3x3 convolutions (group=4) inside bottlenecks."""
    return _Classifier(conv_bn(3, 16), nn.Sequential(Bottleneck(16, 16, 32, groups=4), Bottleneck(32, 16, 32, groups=4)),
                       32)


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand, depthwise 3x3, 1x1 project (linear), residual when shapes match."""

    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1) -> None:
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, stride, groups=mid),
                                  nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2() -> nn.Module:
    return _Classifier(conv_bn(3, 16, stride=2), nn.Sequential(InvertedResidual(16, 16), InvertedResidual(16, 24, stride=2),
                                                                InvertedResidual(24, 24)), 24)


class DenseLayer(nn.Module):
    """DenseNet: pre-activation BN (not folded), output concatenated onto the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 2 * growth, 1, bias=False),
                                  nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def densenet() -> nn.Module:
    return _Classifier(conv_bn(3, 16), nn.Sequential(DenseLayer(16, 8), DenseLayer(24, 8), DenseLayer(32, 8),
                                                     nn.BatchNorm2d(40), nn.ReLU()), 40)


class Inception(nn.Module):
    """Four branches (1x1, 1x1->3x3, 1x1->5x5, pool->1x1) concatenated."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 8, 1)
        self.b2 = nn.Sequential(conv_bn(cin, 8, 1), conv_bn(8, 12, 3))
        self.b3 = nn.Sequential(conv_bn(cin, 4, 1), conv_bn(4, 6, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


def inception() -> nn.Module:
    return _Classifier(conv_bn(3, 16), nn.Sequential(Inception(16), Inception(32)), 32)


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid -> channel-wise scale."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, reduced, 1), nn.ReLU(),
                                  nn.Conv2d(reduced, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def se_net() -> nn.Module:
    return _Classifier(conv_bn(3, 16), nn.Sequential(conv_bn(16, 32), SqueezeExcite(32, 8), conv_bn(32, 32),
                                                     SqueezeExcite(32, 8)), 32)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm and MLP (Transpose + MatMul), layer scale, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1, self.fc2 = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        self.scale = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(nn.functional.gelu(self.fc1(self.norm(h)))) * self.scale
        return x + h.permute(0, 3, 1, 2)


def convnext() -> nn.Module:
    return _Classifier(nn.Conv2d(3, 16, 4, 4), nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16)), 16)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def shufflenet() -> nn.Module:
    """Split + channel shuffle (Reshape/Transpose/Reshape): handled or frozen, never broken."""
    return _Classifier(conv_bn(3, 16), nn.Sequential(conv_bn(16, 16, groups=1), ChannelShuffle(4), conv_bn(16, 24)), 24)


def vgg() -> nn.Module:
    return VGG()


#: name -> factory; every factory returns a module with example_inputs()
CNN_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vgg": vgg,
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "resnext": resnext,
    "mobilenet_v2": mobilenet_v2,
    "densenet": densenet,
    "inception": inception,
    "se_net": se_net,
    "convnext": convnext,
    "shufflenet": shufflenet,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A builder's model in eval mode with seeded random weights (and non-trivial BN statistics)."""
    torch.manual_seed(seed)
    module = CNN_BUILDERS[name]().eval()
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
    return module
