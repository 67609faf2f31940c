"""AlexNet-style network for small images: conv-BN-ReLU-maxpool blocks, then two FC layers.

Sized for two CPU cores (about 5.8 M MACs per 28x28 image) while keeping the paper's shape:
a wide early layer feeding the layers that do most of the work.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ._registry import register_model


def _block(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]


@register_model
def convnet(in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 64),
            hidden: int = 256, input_size: int = 28, dropout: float = 0.3) -> nn.Module:
    layers: list[tuple[str, nn.Module]] = []
    cin, size = in_channels, input_size
    for i, cout in enumerate(widths, start=1):
        conv, bn, relu, pool = _block(cin, cout, 3)
        layers += [(f"conv{i}", conv), (f"bn{i}", bn), (f"relu{i}", relu), (f"pool{i}", pool)]
        cin, size = cout, size // 2
    layers += [("flatten", nn.Flatten()), ("fc1", nn.Linear(cin * size * size, hidden)),
               ("relu_fc1", nn.ReLU(inplace=True)), ("dropout", nn.Dropout(dropout)),
               ("fc2", nn.Linear(hidden, num_classes))]
    return nn.Sequential(OrderedDict(layers))
