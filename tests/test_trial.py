"""Layers whose physical removal is not the network without the unit (trial.py): a network
that keeps a split's sizes or a slice's end in its own code. Torch-Pruning's removal, done
here by hand, fails or computes something else; carprune refuses those layers in one
sentence and keeps every other layer."""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune import groups
from carprune.groups import Surgery, is_depthwise
from carprune.trial import refusals

from .conftest import ConcatNet

X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class SplitNet(nn.Module):
    """A conv's output split by fixed sizes (timm's MixNet, SKNet)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        left, right = torch.split(torch.relu(self.a(x)), [4, 4], dim=1)
        y = torch.cat([self.left(left), self.right(right)], 1)
        return self.head(torch.relu(y).mean((2, 3)))


class SliceNet(nn.Module):
    """A concatenation cut to a fixed width (timm's GhostNet: `[:, :out_chs]`)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.b = nn.Conv2d(7, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.cat([y, self.cheap(y)], 1)[:, :7]
        return self.head(torch.relu(self.b(y)).mean((2, 3)))


def by_hand(net: nn.Module, unit: int = 1):
    """Torch-Pruning's removal of `a`'s channel `unit`, without carprune: its outputs, or the
    exception the pruned network raises."""
    pruned = SplitNet() if isinstance(net, SplitNet) else SliceNet()
    pruned.load_state_dict(net.state_dict())
    dg = tp.DependencyGraph().build_dependency(pruned, X[:1])
    dg.get_pruning_group(pruned.a, tp.prune_conv_out_channels, [unit]).prune()
    try:
        with torch.no_grad():
            return pruned.eval()(X)
    except RuntimeError as exc:
        return exc


def zeroed(net: nn.Module, unit: int = 1) -> torch.Tensor:
    """The network without `a`'s channel `unit`, by hand: what makes it set to zero."""
    copy = SliceNet()
    copy.load_state_dict(net.state_dict())
    with torch.no_grad():
        for m in (copy.a, copy.cheap):
            m.weight[unit], m.bias[unit] = 0, 0
        return copy.eval()(X)


def test_a_layer_whose_pruned_network_fails_is_refused():
    net = SplitNet().eval()
    assert isinstance(by_hand(net), RuntimeError)  # split_with_sizes: 7 channels, not [4, 4]
    surgery = Surgery(net, X[:1])
    assert surgery.prunable_layers() == ["left", "right"]
    assert "fails (RuntimeError: split_with_sizes" in surgery.why_not("a")
    with pytest.raises(cp.CarpruneError, match="layer 'a' cannot be removed cleanly") as exc:
        cp.car_prune(net, TensorDataset(X, net(X).argmax(1)), ["a"], keep=7, progress=False)
    assert "\n" not in str(exc.value) and "choose from: left, right" in str(exc.value)


def test_a_layer_whose_pruned_network_computes_otherwise_is_refused():
    net = SliceNet().eval()
    removed, without = by_hand(net), zeroed(net)
    assert (removed - without).abs().max() / without.abs().max() > 1e-3
    surgery = Surgery(net, X[:1])
    assert surgery.prunable_layers() == ["b"]
    assert "computes other outputs than the network without the unit" in surgery.why_not("a")


@pytest.mark.parametrize("name", ["convnet", "resnet20", "mobilenet", "inception"])
def test_the_zoos_layers_pass_their_trial(name):
    model = cp.create_model(name).eval()
    surgery = Surgery(model, torch.randn(1, 1, 28, 28))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                  and not is_depthwise(m) and m is not head]
    assert refusals(surgery, candidates) == {}
    assert set(surgery.prunable_layers()) == set(candidates)


def test_concatenated_branches_pass_their_trial():
    surgery = Surgery(ConcatNet().eval(), torch.randn(1, 1, 28, 28))
    assert surgery.prunable_layers() == ["stem", "left", "right", "mix"]


def test_a_networks_trials_are_decided_once(monkeypatch):
    net = SplitNet().eval()
    first = Surgery(net, X[:1]).why_not("a")
    monkeypatch.setattr(groups, "refusals",
                        lambda surgery, layers: pytest.fail("tried again") if layers else {})
    assert Surgery(net, X[:1]).why_not("a") == first
    assert Surgery(copy.deepcopy(net), X[:1]).why_not("a") == first
