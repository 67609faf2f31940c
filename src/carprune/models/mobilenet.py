"""Depthwise-separable network (MobileNet v1 style, Howard et al. 2017) for small images.

Each block is a 3x3 depthwise conv then a 1x1 pointwise conv, both with BatchNorm and ReLU. A
pointwise conv's filters are the prunable units; the next depthwise conv's channels go with them
(Torch-Pruning couples them), so each unit is a small group.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ._registry import register_model


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True)))


class Separable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = _conv_bn(cin, cin, 3, stride, groups=cin)
        self.pw = _conv_bn(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


@register_model
def mobilenet(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    plan = [(2 * width, 1), (4 * width, 2), (4 * width, 1), (8 * width, 2), (8 * width, 1)]
    layers, cin = [("stem", _conv_bn(in_channels, width, 3))], width
    for i, (cout, stride) in enumerate(plan, start=1):
        layers.append((f"block{i}", Separable(cin, cout, stride)))
        cin = cout
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
               ("fc", nn.Linear(cin, num_classes))]
    return nn.Sequential(OrderedDict(layers))
