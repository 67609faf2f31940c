"""The fast engine must give the naive engine's tallies and therefore its picks."""


import pytest
import torch

from carprune.car import EngineOptions, car_prune
from carprune.groups import Surgery, Unit
from carprune.scoring import FastEngine, NaiveEngine, ScoringSet, compensation
from carprune.scoring.consumer import ConsumerPlan, plan_layer
from carprune.scoring.masked import MaskPlan

from .conftest import quick_trained, subset


def assert_same_tallies(model, layers, scoring, every=1, compensate=False, **fast_kwargs):
    surgery = Surgery(model, scoring.example())
    for layer in layers:
        units = [Unit(layer, c) for c in range(0, surgery.size(layer), every)]
        nb, naive = NaiveEngine(EngineOptions(compensate=compensate)).score(surgery, units,
                                                                            scoring)
        fb, fast = FastEngine(EngineOptions(compensate=compensate, **fast_kwargs)).score(
            surgery, units, scoring)
        assert torch.equal(nb.correct, fb.correct)
        assert torch.equal(naive.correct, fast.correct), layer
        assert torch.equal(naive.class_correct, fast.class_correct), layer
        assert torch.allclose(naive.loss, fast.loss, rtol=1e-4), layer
    return surgery


@pytest.fixture(scope="module")
def scoring(fmnist):
    return ScoringSet.from_any(subset(fmnist.val, 400), 10)


def test_convnet_every_layer(baseline, scoring):
    surgery = assert_same_tallies(baseline, ["conv1", "conv2", "conv3"], scoring)
    assert all(plan_layer(surgery, name) is not None for name in ("conv1", "conv2", "conv3"))


def test_resnet_plain_and_residual_units(small_resnet, scoring):
    surgery = assert_same_tallies(small_resnet, ["layer1.0.conv1", "layer3.2.conv1",
                                                 "layer2.0.conv2", "conv1"], scoring)
    assert plan_layer(surgery, "layer3.2.conv1") is not None
    assert plan_layer(surgery, "layer2.0.conv2") is None  # residual: the masked tail
    assert isinstance(FastEngine().plan(surgery, "layer2.0.conv2"), MaskPlan)


@pytest.fixture(scope="module")
def zoo(fmnist, small_resnet, concat_net):
    return {"resnet20": small_resnet, "concat": concat_net,
            "mobilenet": quick_trained("mobilenet", fmnist, width=8),
            "inception": quick_trained("inception", fmnist, width=8)}


KINDS = {"resnet20": {"plain", "residual"}, "concat": {"plain", "branch", "concat"},
         "mobilenet": {"plain", "depthwise"}, "inception": {"plain", "branch", "concat"}}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_unit_kind_scores_fast_and_exactly(zoo, scoring, name):
    """Every layer of four zoo networks: the fast engine's tallies are the naive engine's, no
    layer falls back to naive, and the depthwise chains score at their linear consumer."""
    few = scoring.subset(150)
    surgery = Surgery(zoo[name], few.example())
    layers = surgery.conv_layers()
    assert {surgery.kind(n) for n in layers} == KINDS[name]
    assert_same_tallies(zoo[name], layers, few, every=3)
    engine = FastEngine()
    plans = {n: engine.plan(surgery, n) for n in layers}
    assert all(isinstance(p, ConsumerPlan | MaskPlan) for p in plans.values())
    assert all(isinstance(plans[n], ConsumerPlan) for n in layers
               if surgery.kind(n) == "depthwise")


def test_concatenation_network(concat_net, scoring):
    surgery = assert_same_tallies(concat_net, ["left", "right", "mix", "stem"], scoring)
    assert plan_layer(surgery, "right") is not None  # feeds mix at offset 6 of the concat
    assert plan_layer(surgery, "stem") is None       # read by both branches


def test_compensated_tallies_on_four_networks(baseline, small_resnet, concat_net, zoo, scoring):
    few = scoring.subset(200)
    surgery = assert_same_tallies(baseline, ["conv1", "conv2", "conv3"], few, every=3,
                                  compensate=True)
    # the tallies are those of the network after compensation.remove, and not the plain ones
    units = [Unit("conv1", c) for c in range(4)]
    _, refit = NaiveEngine(EngineOptions(compensate=True)).score(surgery, units, few)
    _, plain = NaiveEngine().score(surgery, units, few)
    assert not torch.equal(refit.correct, plain.correct)
    for i, unit in enumerate(units):
        removed = Surgery(baseline, few.example())
        compensation.remove(removed, unit.layer, [unit.channel], few.batches)
        assert int(NaiveEngine().score(removed, [], few)[0].correct[0]) == int(refit.correct[i])
    assert_same_tallies(small_resnet, ["layer3.2.conv1", "layer1.0.conv1"], few,
                        compensate=True)
    assert_same_tallies(concat_net, ["left", "right"], few, compensate=True, memory_budget=1)
    # depthwise units into 1x1 consumers: the refit's update is of rank one
    assert_same_tallies(zoo["mobilenet"], ["stem.conv", "block2.pw.conv"], few, every=2,
                        compensate=True)


def test_memory_budget_chunking_gives_the_same_answer(baseline, scoring):
    surgery = Surgery(baseline, scoring.example())
    units = [Unit("conv2", c) for c in range(64)]
    _, big = FastEngine().score(surgery, units, scoring)
    _, tiny = FastEngine(EngineOptions(memory_budget=1)).score(surgery, units,
                                                                scoring)  # one candidate a pass
    assert torch.equal(big.correct, tiny.correct)
    assert torch.allclose(big.loss, tiny.loss, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("layers, keep, compensate", [(["conv3", "conv1"], 0.875, False),
                                                      (["conv2"], 60, True)])
def test_identical_pick_sequences_convnet(baseline, scoring, layers, keep, compensate):
    few = scoring.subset(200)
    naive, fast = (car_prune(baseline, few, layers, keep=keep,
                             engine=EngineOptions(engine, compensate=compensate), progress=False)
                   for engine in ("naive", "fast"))
    for name in layers:
        assert naive.layers[name].removed == fast.layers[name].removed
        assert naive.layers[name].steps[-1].val_accuracy == fast.layers[name].steps[-1].val_accuracy


@pytest.mark.slow
def test_identical_pick_sequences_resnet(small_resnet, scoring):
    layers = ["layer3.1.conv1", "layer1.2.conv1", "layer1.0.conv2"]
    few = scoring.subset(200)
    naive = car_prune(small_resnet, few, layers, keep=0.75, engine=EngineOptions("naive"),
                      progress=False)
    fast = car_prune(small_resnet, few, layers, keep=0.75, engine=EngineOptions("fast"),
                     progress=False)
    for name in layers:
        assert naive.layers[name].removed == fast.layers[name].removed


@pytest.mark.slow
@pytest.mark.parametrize("name, layers", [("resnet20", ["conv1", "layer3.0.conv2"]),
                                          ("mobilenet", ["block2.pw.conv", "stem.conv"]),
                                          ("inception", ["mixed1.branch3.conv", "stem.conv"])])
def test_identical_pick_sequences_every_kind(zoo, scoring, name, layers):
    few = scoring.subset(100)
    naive, fast = (car_prune(zoo[name], few, layers, keep=0.75, engine=EngineOptions(engine),
                             progress=False)
                   for engine in ("naive", "fast"))
    for layer in layers:
        assert naive.layers[layer].removed == fast.layers[layer].removed


def test_folding_batchnorms_keeps_the_function():
    """`inference` folds each eval BatchNorm (plain, and timm's BatchNormAct2d with its
    activation kept) into the conv that alone feeds it; a conv called twice keeps its norm."""
    from timm.layers import BatchNormAct2d
    from torch import nn

    from carprune.scoring.graph import folded, inference, trace

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.b, self.bn_b = nn.Conv2d(8, 8, 3, bias=False), BatchNormAct2d(8)
            self.shared, self.bn_s = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.bn_b(self.b(torch.relu(self.bn_a(self.a(x)))))
            x = self.bn_s(self.shared(x)) + self.shared(x)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    for bn in (net.bn_a, net.bn_b, net.bn_s):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    x = torch.randn(4, 3, 12, 12)
    module = folded(trace(net))
    left = {n.target: type(module.get_submodule(n.target)) for n in module.graph.nodes
            if n.op == "call_module" and n.target.startswith("bn")}
    assert left == {"bn_b": nn.Sequential, "bn_s": nn.BatchNorm2d}  # its ReLU; a shared conv
    with torch.inference_mode():
        assert torch.allclose(inference(net)(x), net(x), atol=1e-5)


def test_pools_of_concatenations_run_per_branch(zoo, scoring):
    """Inception's pools after each concatenation become one pool per branch: the same
    numbers up to rounding (an average may sum in another order), and a mixed1 unit's head
    then hands its tail the other branches already pooled."""
    from carprune.scoring.graph import pools_into_concats, trace

    model = zoo["inception"]
    x = scoring.batches[0][0]
    rewritten = pools_into_concats(trace(model))
    pools = [n.target for n in rewritten.graph.nodes
             if n.op == "call_module" and n.target in ("pool2", "pool")]
    assert pools == ["pool2"] * 3 + ["pool"] * 3
    with torch.inference_mode():
        assert torch.allclose(rewritten(x), model(x), rtol=0, atol=1e-6)
    plan = FastEngine().plan(Surgery(model, x[:1]), "mixed1.branch5.0.conv")
    with torch.inference_mode():
        _, *sides = plan.head(x)
    assert [tuple(t.shape[1:]) for t in sides] == [(8, 7, 7), (16, 7, 7)]  # 14 x 14 before
