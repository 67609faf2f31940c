from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp


@pytest.fixture(scope="session")
def fmnist() -> cp.data.Data:
    return cp.data.fashion_mnist()


@pytest.fixture(scope="session")
def baseline() -> nn.Module:
    return cp.load("convnet-fmnist")


def subset(ds: TensorDataset, n: int, start: int = 0) -> TensorDataset:
    return TensorDataset(*[t[start:start + n] for t in ds.tensors])


def quick_trained(name: str, data: cp.data.Data, n: int = 3000, **kwargs) -> nn.Module:
    """A zoo model trained for one short epoch: far from good, but its filters differ."""
    model = cp.create_model(name, **kwargs)
    cp.fit(model, subset(data.train, n), epochs=1, lr=0.05, progress=False)
    model.carprune_spec = {"arch": {"name": name, "kwargs": kwargs}, "input_shape": [1, 28, 28]}
    return model.eval()


@pytest.fixture(scope="session")
def small_resnet(fmnist) -> nn.Module:
    return quick_trained("resnet20", fmnist, width=8)


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv and a classifier: exercises index mapping."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.left = nn.Conv2d(8, 6, 3, padding=1)
        self.right = nn.Conv2d(8, 10, 1)
        self.mix = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        x = self.pool(torch.relu(self.mix(x)))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="session")
def concat_net(fmnist) -> nn.Module:
    torch.manual_seed(1)
    model = ConcatNet()
    cp.fit(model, subset(fmnist.train, 3000), epochs=1, lr=0.05, progress=False)
    return model.eval()


def hand_made_net(readout=(2.0, 1.0, 0.1), threshold=1.0) -> nn.Module:
    """1x1 'images' x; conv1 has filters h_i = relu(x); logit1 = sum_i a_i h_i, logit0 = c.

    With every label 1, an image is right iff sum of the kept a_i times x exceeds c, so the CAR
    index of every filter is a matter of arithmetic (see test_prune.py).
    """
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, len(readout), 1)), ("relu", nn.ReLU()),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(len(readout), 2))]))
    with torch.no_grad():
        net.conv1.weight.fill_(1.0)
        net.conv1.bias.zero_()
        net.fc.weight.zero_()
        net.fc.weight[1] = torch.tensor(readout)
        net.fc.bias.copy_(torch.tensor([threshold, 0.0]))
    return net.eval()


def hand_made_data(xs=(0.4, 0.6, 1.2)) -> TensorDataset:
    x = torch.tensor(xs).view(-1, 1, 1, 1)
    return TensorDataset(x, torch.ones(len(xs), dtype=torch.int64))
