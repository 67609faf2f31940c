"""Scoring equals removal for every normalisation and every unit kind: the network as the fast
and the naive engine score it without a unit gives the physically pruned network's per-image
loss and correctness, and the naive engine's ablated logits are the pruned network's
(docs/engine.md, "Scoring equals removal")."""

import pytest
import torch
import torchvision.models.convnext as tv_convnext
from timm.layers import GroupNorm1, GroupNormAct, LayerNormAct2d, StdConv2d
from timm.layers import LayerNorm2d as TimmLayerNorm2d
from torch import nn

from carprune import CarpruneError
from carprune.groups import Surgery, Unit
from carprune.norms import without
from carprune.scoring import FastEngine
from carprune.scoring.consumer import ConsumerPlan
from carprune.scoring.masked import MaskPlan
from carprune.scoring.removal import removal_gap

TOLERANCE = 1e-5  # relative: float rounding, orders of magnitude below a zeroed channel's 1e-2


class Kinds(nn.Module):
    """Every unit kind behind one normalisation: a residual stem, an expand-depthwise-project
    block, a layer read by two branches, which are concatenated, a squeeze-excitation with a
    Linear hidden layer on 2-D tensors, and a hidden Linear in the head."""

    def __init__(self, norm):
        super().__init__()
        self.stem, self.n0 = nn.Conv2d(3, 16, 3, padding=1), norm(16)
        self.expand, self.n1 = nn.Conv2d(16, 32, 1), norm(32)
        self.dw, self.n2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), norm(32)
        self.project, self.n3 = nn.Conv2d(32, 16, 1), norm(16)
        self.fork = nn.Conv2d(16, 16, 1)
        self.left, self.right = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.se1, self.se2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.fc1, self.fc2 = nn.Linear(64, 24), nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.n0(self.stem(x)))
        x = x + self.n3(self.project(torch.relu(self.n2(self.dw(torch.relu(
            self.n1(self.expand(x))))))))
        x = torch.relu(self.fork(x))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], dim=1)
        x = torch.relu(self.mix(x))
        s = torch.sigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3))))))
        x = nn.functional.adaptive_avg_pool2d(x * s[:, :, None, None], 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class ChannelsLast(nn.Module):
    """A ConvNeXt block: LayerNorm2d after the stem, a depthwise conv, then channels-last: a
    LayerNorm over the last dimension, a Linear MLP on every position, a layer scale, and the
    residual sum back in NCHW."""

    def __init__(self):
        super().__init__()
        self.stem, self.ln0 = nn.Conv2d(3, 16, 2, stride=2), tv_convnext.LayerNorm2d(16)
        self.dw, self.ln = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)
        self.gamma = nn.Parameter(torch.rand(16) + 0.5)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.ln0(self.stem(x))
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(nn.functional.gelu(self.fc1(y))) * self.gamma
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


class Grouped(nn.Module):
    """c1 feeds a GroupNorm of 8 groups and a conv of 4 groups (units of 4 channels: the least
    common multiple is 8); g's units are one output channel of each of its 4 groups."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.gn = nn.Conv2d(16, 32, 1), nn.GroupNorm(8, 32)
        self.g, self.bn_g = nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32)
        self.c3, self.fc = nn.Conv2d(32, 16, 1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bn_g(self.g(torch.relu(self.gn(self.c1(x))))))
        return self.fc(self.c3(x).mean((2, 3)))


NORMS = {"batchnorm": nn.BatchNorm2d, "groupnorm": lambda c: nn.GroupNorm(4, c),
         "timm-groupnorm1": GroupNorm1, "timm-groupnormact": lambda c: GroupNormAct(c, 4),
         "torchvision-layernorm2d": tv_convnext.LayerNorm2d,
         "timm-layernorm2d": TimmLayerNorm2d, "timm-layernormact2d": LayerNormAct2d,
         "instancenorm": lambda c: nn.InstanceNorm2d(c, affine=True)}
PER_CHANNEL = {"batchnorm", "instancenorm"}


def randomised(net: nn.Module) -> nn.Module:
    """The net in eval mode, its norms' affine maps and running statistics away from 1 and 0
    (so that a norm's shift would show in a removed channel)."""
    torch.manual_seed(0)
    for m in net.modules():
        if getattr(m, "weight", None) is not None and m.weight.ndim == 1:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
        if getattr(m, "running_var", None) is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return net.eval()


IMAGES = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def assert_scoring_is_removal(net: nn.Module, layers, engines=("fast", "naive")) -> None:
    """Both engines, or the fast one alone (the naive engine runs the ablated network, whose
    logits `removal_gap` compares with the pruned network's either way)."""
    for layer in layers:
        for engine in engines:
            gap = removal_gap(net, layer, 1, IMAGES, engine)
            assert gap.logits < TOLERANCE and gap.loss < TOLERANCE and gap.correct, \
                (layer, engine, gap)


@pytest.mark.slow
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_unit_kind_behind_every_norm_is_scored_as_removed(norm):
    torch.manual_seed(0)
    net = randomised(Kinds(NORMS[norm]))
    surgery = Surgery(net, IMAGES[:1])
    layers = surgery.prunable_layers()
    kinds = {n: surgery.kind(n) for n in layers}
    alone = norm in PER_CHANNEL  # else a norm mixes the stem's and the expansion's channels
    assert kinds == {"stem": "residual" if alone else "norm-mixed",
                     "expand": "depthwise" if alone else "norm-mixed",
                     "project": "residual" if alone else "norm-mixed", "fork": "branch",
                     "left": "concat", "right": "concat", "mix": "residual",
                     "se1": "linear", "se2": "residual", "fc1": "linear"}
    assert_scoring_is_removal(net, layers, engines=("fast",))


def test_channels_last_layernorm_and_linear_mlp():
    net = randomised(ChannelsLast())
    surgery = Surgery(net, IMAGES[:1])
    assert surgery.prunable_layers() == ["stem", "fc1", "fc2"]
    assert [surgery.kind(n) for n in ("stem", "fc1", "fc2")] == ["norm-mixed", "linear",
                                                                  "norm-mixed"]
    engine = FastEngine()
    assert isinstance(engine.plan(surgery, "fc1"), ConsumerPlan)  # Linear on NHWC positions
    assert isinstance(engine.plan(surgery, "stem"), MaskPlan)
    assert surgery.mixing("fc2", 3) == {"ln0": [3], "ln": [3]}
    assert_scoring_is_removal(net, surgery.prunable_layers())


def test_grouped_convolutions_and_groupnorm_take_one_channel_of_each_group():
    net = randomised(Grouped())
    surgery = Surgery(net, IMAGES[:1])
    assert surgery.prunable_layers() == ["stem", "c1", "g", "c3"]
    assert (surgery.channel_groups("c1"), surgery.size("c1")) == (8, 4)
    assert surgery.channels("c1", 1) == [1, 5, 9, 13, 17, 21, 25, 29]
    assert (surgery.channel_groups("g"), surgery.size("g")) == (4, 8)
    assert [surgery.kind(n) for n in surgery.prunable_layers()] == ["plain", "norm-mixed",
                                                                    "grouped", "plain"]
    assert isinstance(FastEngine().plan(surgery, "g"), ConsumerPlan)
    assert_scoring_is_removal(net, surgery.prunable_layers())


def test_zeroing_alone_is_not_removal_where_a_norm_mixes_channels():
    """What the masked statistics are for: zeroing the stem's unit leaves it in the
    GroupNorm's and LayerNorm2d's statistics, visibly off the pruned network."""
    for norm in ("groupnorm", "torchvision-layernorm2d"):
        net = randomised(Kinds(NORMS[norm]))
        surgery = Surgery(net, IMAGES[:1])
        pruned = Surgery(net, IMAGES[:1])
        pruned.remove("stem", [1])
        with torch.no_grad():
            for param, idxs in surgery.producers("stem", 1):
                param[idxs] = 0
            zeroed, removed = surgery.model(IMAGES), pruned.model(IMAGES)
        assert (zeroed - removed).abs().max() > 1e-3 * removed.abs().max()
        assert removal_gap(net, "stem", 1, IMAGES, "naive").logits < TOLERANCE


def test_masked_statistics_per_candidate_by_hand():
    """`without` on two candidates stacked: each candidate's GroupNorm is the one of a
    GroupNorm with its channels physically gone, and zero at them."""
    torch.manual_seed(0)
    norm = randomised(nn.GroupNorm(2, 6))
    x = torch.randn(3, 6, 4, 4)
    rows, cols = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 4, 2, 5])
    out = without(norm, torch.cat([x, x]), (2, rows, cols)).view(2, 3, 6, 4, 4)
    for k, gone in enumerate(([1, 4], [2, 5])):
        keep = [c for c in range(6) if c not in gone]
        pruned = nn.GroupNorm(2, 4)
        pruned.weight.data, pruned.bias.data = norm.weight.data[keep], norm.bias.data[keep]
        assert torch.allclose(out[k][:, keep], pruned(x[:, keep]), atol=1e-6)
        assert not out[k][:, gone].any()


class Concat(nn.Module):
    """Two layers concatenated into a conv of 4 groups: each feeds two of the groups only."""

    def __init__(self, norm=nn.BatchNorm2d):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.g, self.n = nn.Conv2d(16, 16, 3, groups=4), norm(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.n(self.g(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3)))


class OddNorm(nn.GroupNorm):
    """A GroupNorm whose forward carprune does not know."""


def test_layers_that_are_not_units_get_one_sentence():
    surgery = Surgery(randomised(Concat()), IMAGES[:1])
    with pytest.raises(CarpruneError, match=r"'a' feeds g \(4 channel groups\) unevenly"):
        surgery.check_layer("a")
    kinds = Surgery(randomised(Kinds(nn.BatchNorm2d)), IMAGES[:1])
    with pytest.raises(CarpruneError, match="'dw' is a depthwise conv.*name that layer"):
        kinds.check_layer("dw")
    with pytest.raises(CarpruneError, match="'fc2' makes the network's outputs"):
        kinds.check_layer("fc2")
    with pytest.raises(CarpruneError, match="'fc1' is a Linear, not a prunable conv layer"):
        kinds.check_layer("fc1", convs=True)
    odd = Surgery(randomised(Kinds(lambda c: OddNorm(4, c))), IMAGES[:1])
    with pytest.raises(CarpruneError, match="'stem' reaches a OddNorm .* at n0; choose from"):
        odd.check_layer("stem")
    assert "stem" not in odd.prunable_layers() and "left" in odd.prunable_layers()
    grouped = Surgery(randomised(Grouped()), IMAGES[:1])
    with pytest.raises(CarpruneError, match="removing 4 of 4 units would empty layer 'c1' "
                       r"\(a unit is one channel of each of its 8 channel groups\)"):
        grouped.remove("c1", range(4))


def test_channels_read_by_a_weight_standardising_conv_are_refused():
    # StdConv2d standardises each filter over its input channels: without one, the others'
    # weights change, so zeroing is not removal; the conv's own filters are units as usual
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), StdConv2d(8, 8, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    surgery = Surgery(randomised(net), IMAGES[:1])
    with pytest.raises(CarpruneError, match="'0' is read by a StdConv2d, which standardises "
                       "its weights over its input channels.* at 2; choose from: 2"):
        surgery.check_layer("0")
    assert surgery.prunable_layers() == ["2"]


def test_naive_ablation_restores_the_network():
    net = randomised(ChannelsLast())
    surgery = Surgery(net, IMAGES[:1])
    with torch.no_grad():
        before = surgery.model(IMAGES)
        with surgery.ablated([Unit("stem", 2), Unit("fc1", 5)]):
            during = surgery.model(IMAGES)
        after = surgery.model(IMAGES)
    assert torch.equal(before, after) and not torch.allclose(before, during)
