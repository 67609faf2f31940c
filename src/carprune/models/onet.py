"""MTCNN's ONet (Zhang et al. 2016, the output network of the face detector) as a face/non-face
classifier: 3 x 48 x 48 RGB in, two logits out (index 1 is "face").

The layers keep the original names. Only the face/non-face head (`dense6_1`) is built; the
original's box regression and landmark heads are not. conv4's output is flattened in the usual
(channel, height, width) order, so the network is a plain conv stack that Torch-Pruning's
dependency graph understands. MTCNN's pretrained weights, which ship in facenet-pytorch's wheel,
are loaded into it by experiments/rgb/onet.py (`make rgb`).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ._registry import register_model


@register_model
def onet(in_channels: int = 3, num_classes: int = 2) -> nn.Module:
    """ONet's layers under the original names, ending in the face/non-face logits (48 x 48
    inputs; the pretrained weights are for the defaults)."""
    layers = [
        ("conv1", nn.Conv2d(in_channels, 32, 3)), ("prelu1", nn.PReLU(32)),
        ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("conv2", nn.Conv2d(32, 64, 3)), ("prelu2", nn.PReLU(64)),
        ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ("conv3", nn.Conv2d(64, 64, 3)), ("prelu3", nn.PReLU(64)),
        ("pool3", nn.MaxPool2d(2, 2, ceil_mode=True)),
        ("conv4", nn.Conv2d(64, 128, 2)), ("prelu4", nn.PReLU(128)),
        ("flatten", nn.Flatten()),
        ("dense5", nn.Linear(128 * 3 * 3, 256)), ("prelu5", nn.PReLU(256)),
        ("dense6_1", nn.Linear(256, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))

