"""Units of several channels and of nn.Linear layers (docs/engine.md, "Units"): their numbering
across removals, their costs and criteria by hand, Torch-Pruning's own pruner with CAR, the
real networks that have them (ConvNeXt, ResNeXt, RegNet, MNASNet, a GroupNorm ResNet): every
TP-prunable layer a unit, scoring equal to removal, fast = naive picks, pruned networks that
reload with identical outputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune.criteria import importance
from carprune.dependency import replay_history
from carprune.groups import Surgery, Unit
from carprune.measure import unit_costs
from carprune.scoring import EngineOptions, FastEngine, NaiveEngine, ScoringSet
from carprune.scoring.first_order import first_order
from carprune.scoring.removal import removal_gap

from .test_norms import IMAGES, ChannelsLast, Grouped, randomised

LABELS = torch.arange(len(IMAGES)) % 10


def test_grouped_units_keep_their_original_numbering_across_removals():
    surgery = Surgery(randomised(Grouped()), IMAGES[:1])
    assert surgery.remove("c1", [1]) == [1]
    assert surgery.alive["c1"] == [0, 2, 3] and surgery.size("c1") == 3
    assert surgery.channels("c1", 1) == [1 + 3 * g for g in range(8)]  # original unit 2
    assert surgery.remove("c1", [1]) == [2]
    c1, gn, g = (surgery.modules[n] for n in ("c1", "gn", "g"))
    assert (c1.out_channels, gn.num_channels, gn.num_groups) == (16, 16, 8)
    assert (g.in_channels, g.groups, tuple(g.weight.shape)) == (16, 4, (32, 4, 3, 3))
    assert surgery.remove("g", [0, 5]) == [0, 5]
    assert surgery.alive["g"] == [1, 2, 3, 4, 6, 7] and surgery.original["g"][:7] == \
        [1, 2, 3, 4, 6, 7, 9]  # g's second group starts at channel 8
    with torch.inference_mode():
        assert surgery.model(IMAGES).shape == (3, 10)
    replayed = Grouped()
    replay_history(replayed, (3, 16, 16), surgery.history())
    assert replayed.g.weight.shape == surgery.model.g.weight.shape


def test_grouped_units_score_alike_in_both_engines_after_removals():
    surgery = Surgery(randomised(Grouped()), IMAGES[:1])
    scoring = ScoringSet.from_any(TensorDataset(IMAGES, LABELS), 10)
    surgery.remove("c1", [2])
    for layer in ("c1", "g"):
        units = [Unit(layer, u) for u in range(surgery.size(layer))]
        nb, naive = NaiveEngine().score(surgery, units, scoring)
        fb, fast = FastEngine().score(surgery, units, scoring)
        assert torch.equal(naive.correct, fast.correct)
        assert torch.allclose(naive.loss, fast.loss, rtol=1e-5)


def test_costs_and_magnitudes_of_a_unit_of_eight_channels_by_hand():
    net = randomised(Grouped())
    surgery = Surgery(net, IMAGES[:1])
    macs = unit_costs(surgery, ["c1"])["c1"]
    # 8 of c1's 32 outputs (16 inputs, 16 x 16 positions), and 8 of g's 32 inputs: g makes
    # 32 outputs of 8 inputs each over 3 x 3 taps at 16 x 16 positions
    assert macs == [8 / 32 * 32 * 16 * 256 + 8 / 32 * 32 * 8 * 9 * 256] * 4
    params = unit_costs(surgery, ["c1"], "params")["c1"]
    assert params == [8 * 16 + 8 + 2 * 8 + 8 / 32 * 32 * 8 * 9] * 4  # rows, biases, GN, g
    rows = net.c1.weight.detach().abs().flatten(1).sum(1)
    scoring = ScoringSet.from_any(TensorDataset(IMAGES, LABELS), 10)
    l1 = importance("l1", surgery, "c1", scoring)
    assert torch.allclose(l1, rows.view(8, 4).mean(0).double())


def test_car_inside_torch_prunings_pruner_removes_whole_units():
    net = randomised(Grouped())
    data = TensorDataset(IMAGES, LABELS)
    group = tp.DependencyGraph().build_dependency(net, IMAGES[:1]).get_pruning_group(
        net.c1, tp.prune_conv_out_channels, list(range(32)))
    scores = cp.CARImportance(data, num_classes=10)(group)
    assert torch.equal(scores.view(8, 4), scores[:4].expand(8, 4))  # one score per unit
    pruner = tp.pruner.BasePruner(net, IMAGES[:1], importance=cp.CARImportance(data, 10),
                                  pruning_ratio=0.25, ignored_layers=[net.fc])
    pruner.step()
    assert (net.c1.out_channels, net.gn.num_channels, net.g.in_channels) == (24, 24, 24)
    with torch.inference_mode():
        assert net(IMAGES).shape == (3, 10)


def test_first_order_estimates_of_a_channels_last_linear_by_finite_differences():
    """fc1 of ChannelsLast runs on every position of an NHWC tensor: its units' estimate is the
    summed absolute derivative of each image's loss along a scale of the unit's feature
    (central differences in double precision)."""
    net = randomised(ChannelsLast())
    scoring = ScoringSet.from_any(TensorDataset(IMAGES, LABELS), 10)
    got = first_order(Surgery(net, IMAGES[:1]), ["fc1"], scoring)
    exact, x, eps = copy.deepcopy(net).double(), IMAGES.double(), 1e-6

    def losses(unit, scale):
        scales = torch.ones(48, dtype=torch.float64)
        scales[unit] = scale
        hook = exact.fc1.register_forward_hook(lambda m, a, out: out * scales)
        with torch.no_grad():
            out = F.cross_entropy(exact(x), LABELS, reduction="none")
        hook.remove()
        return out

    for unit in (0, 7, 30):
        by_hand = ((losses(unit, 1 + eps) - losses(unit, 1 - eps)) / (2 * eps)).abs().sum()
        assert got[Unit("fc1", unit)] == pytest.approx(float(by_hand), rel=1e-4)


def test_a_pruned_groupnorm_network_reloads_with_identical_outputs(tmp_path):
    net = randomised(Grouped())
    net.carprune_spec = {"arch": {"name": "tests.test_norms:Grouped", "kwargs": {}},
                         "input_shape": [3, 16, 16]}
    result = cp.criterion_prune(net, TensorDataset(IMAGES, LABELS), ["c1", "g"], "l1",
                                keep=0.5)
    cp.save(result.model, tmp_path / "m")
    again = cp.load(tmp_path / "m")
    assert (again.gn.num_channels, again.g.out_channels) == (16, 16)
    with torch.inference_mode():
        assert torch.equal(again(IMAGES), result.model(IMAGES))


# -- torchvision's networks at 64 px, random weights ------------------------------------------

REAL = {"convnext_tiny": ["features.0.0", "features.1.0.block.3"],
        "resnext50_32x4d": ["layer1.0.conv1", "layer1.0.conv2"],
        "regnet_y_400mf": ["trunk_output.block1.block1-0.f.se.fc1",
                           "trunk_output.block2.block2-0.f.a.0"],
        "mnasnet0_5": ["layers.0", "layers.8.0.layers.6"],
        "groupnorm_resnet18": ["conv1", "layer2.0.conv1"]}
# group roots as Torch-Pruning 1.6.1 counts them
ROOTS = {"convnext_tiny": 22, "resnext50_32x4d": 37, "regnet_y_400mf": 53}


def groupnorm_resnet18() -> nn.Module:
    return torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(32, c))


def real_network(name: str, size: int = 64) -> nn.Module:
    torch.manual_seed(0)
    factory = f"tests.test_units:{name}" if name == "groupnorm_resnet18" \
        else f"torchvision.models:{name}"
    model = cp.create_model(factory).eval()
    model.carprune_spec = {"arch": {"name": factory, "kwargs": {}},
                           "input_shape": [3, size, size]}
    return model


def self_labelled(model: nn.Module, n: int, size: int = 64) -> TensorDataset:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        return TensorDataset(x, model(x).argmax(1))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the scoring set holds a single class")
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_networks_every_root_a_unit_scored_as_removed_and_reloaded(name, tmp_path):
    model = real_network(name)
    x = self_labelled(model, 2).tensors[0]
    surgery = Surgery(model, x[:1])
    layers = surgery.prunable_layers()
    if name in ROOTS:  # every layer that roots a Torch-Pruning group is a unit's
        classifier = [m for m in surgery.model.modules() if isinstance(m, nn.Linear)][-1]
        roots = [surgery.names[g[0].dep.target.module] for g in surgery.dg.get_all_groups(
            ignored_layers=[classifier])]
        assert len(roots) == ROOTS[name] and set(roots) <= set(layers)
    for layer in REAL[name]:
        gap = removal_gap(model, layer, 1, x)
        assert gap.logits < 1e-5 and gap.loss < 1e-5 and gap.correct, (layer, gap)
    pruned = cp.criterion_prune(model, self_labelled(model, 2), REAL[name], "l1", keep=0.75)
    cp.save(pruned.model, tmp_path / "m")
    again = cp.load(tmp_path / "m")
    with torch.inference_mode():
        assert torch.equal(again(x), pruned.model(x))


# (network, layer, greedy steps, px): the stem's norm-mixed units, a block's Linear (384
# units, one step), grouped units, a squeeze-excitation's hidden layer; ConvNeXt at 32 px
# (its last stage at 1x1), where the naive engine's 384 tails cost a quarter of 64 px's
PICKS = [("convnext_tiny", "features.0.0", 2, 32), ("convnext_tiny", "features.1.1.block.3", 1, 32),
         ("resnext50_32x4d", "layer1.0.conv1", 2, 64),
         ("regnet_y_400mf", "trunk_output.block2.block2-0.f.se.fc1", 3, 64)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the scoring set holds a single class")
@pytest.mark.parametrize("name, layer, steps, size", PICKS)
def test_fast_picks_what_naive_picks_on_new_unit_kinds(name, layer, steps, size):
    model = real_network(name, size)
    data = self_labelled(model, 4, size)
    size = Surgery(model, data.tensors[0][:1]).size(layer)
    naive, fast = (cp.car_prune(model, data, [layer], keep=size - steps, progress=False,
                                engine=EngineOptions(engine)) for engine in ("naive", "fast"))
    assert naive.layers[layer].removed == fast.layers[layer].removed
    assert len(fast.layers[layer].removed) == steps
