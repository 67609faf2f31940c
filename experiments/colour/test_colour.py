"""The colour study's counts on a hand-made RGB network whose colour-selective filters are
known: the counts against the layer's weights, sorted by hand."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .main import SEEDS, counts

pytestmark = pytest.mark.experiment


class Tinted(nn.Module):
    """conv1: filters 0-3 read red alone (colour-selective, large weights), filters 4-7 read
    R, G and B equally (grey, small weights); class 0 when the red filters respond more."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[:4, 0] = torch.tensor([8.0, 7.0, 6.0, 5.0]).view(4, 1, 1)
            self.conv1.weight[4:] = torch.tensor([0.4, 0.3, 0.2, 0.1]).view(4, 1, 1, 1)
            self.conv1.bias.zero_()
            self.fc.weight.zero_()
            self.fc.weight[0, :4] = 1.0   # class 0: more red than grey
            self.fc.weight[1, 4:] = 14.0  # class 1: about half of the images below
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.relu(self.conv1(x)).mean((2, 3)))


def test_counts_against_the_layers_own_colour_and_magnitude():
    model = Tinted().eval()
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        data = TensorDataset(x, model(x).argmax(1))
    assert set(data.tensors[1].tolist()) == {0, 1}
    got = counts(model, data, first=4)
    assert got["filters"] == 8 and got["colour_filters"] == 4 and got["expected_at_share"] == 2
    # l1 removes the four small grey filters first: no colour filter, none of the upper half
    assert got["l1"] == 0 and got["upper_half"]["l1"] == 0
    assert got["car"] == len({0, 1, 2, 3} & set(got["car_order"])) and len(got["car_order"]) == 4
    assert got["upper_half"]["car"] == got["car"]  # the colour half is the upper half here
    assert 0 <= got["random_min"] <= got["random_mean"] <= got["random_max"] <= 4
    assert got["upper_half"]["random_mean"] == got["random_mean"]
    assert got["colour_index"][:4] == pytest.approx([got["colour_index"][0]] * 4)
    assert max(got["colour_index"][4:]) < got["threshold"] < min(got["colour_index"][:4])
    assert SEEDS == 20
