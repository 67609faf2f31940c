"""A small Inception-style network (Szegedy et al. 2015): parallel 1x1, 3x3 and 1x1->3x3
branches concatenated along channels, so units of one branch are a slice of the next layer's
input (the dependency graph maps the offsets)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._registry import register_model


def _conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        bn=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True)))


class Mixed(nn.Module):
    def __init__(self, cin: int, b1: int, b3: int, reduce: int, b5: int):
        super().__init__()
        self.branch1 = _conv_bn(cin, b1, 1)
        self.branch3 = _conv_bn(cin, b3, 3)
        self.branch5 = nn.Sequential(_conv_bn(cin, reduce, 1), _conv_bn(reduce, b5, 3))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x)], dim=1)


@register_model
def inception(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    w = width
    return nn.Sequential(OrderedDict(
        stem=_conv_bn(in_channels, 2 * w, 3), pool1=nn.MaxPool2d(2),
        mixed1=Mixed(2 * w, w, 2 * w, w, w), pool2=nn.MaxPool2d(2),
        mixed2=Mixed(4 * w, 2 * w, 3 * w, w, w), pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(), fc=nn.Linear(6 * w, num_classes)))
