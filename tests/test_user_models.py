"""Networks as users write them (issue 33): a memory layout is an optimisation, never a
requirement. `ViewNet` flattens with `x.view(x.size(0), -1)` after its convs, as countless
MNIST models do, which fails in channels_last: carprune keeps its contiguous layout, says so
once, and prunes, explains and reloads it with the naive engine's picks. A network that runs
in both layouts gets the same picks in each.

The factories below are imported by the CLI as `tests.test_user_models:NAME`."""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_pruning as tp
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune.layout import ATTRIBUTE, layout_for

from .conftest import subset

ME = "tests.test_user_models"
LAYERS = ["conv_layers.0", "conv_layers.3", "conv_layers.6"]


class ViewNet(nn.Module):
    """Three convs and two linears, flattened with .view, as in countless MNIST tutorials."""

    def __init__(self):
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(16 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv_layers(x)
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


def view_net() -> nn.Module:
    """The CLI's factory: the architecture (the weights come with --weights)."""
    return ViewNet()


def data():
    """The CLI's data factory: a few hundred Fashion-MNIST images per split, at 28 px."""
    fmnist = cp.data.fashion_mnist()
    return subset(fmnist.train, 300), subset(fmnist.val, 300), subset(fmnist.test, 300)


class BadView(nn.Module):
    """A forward that fails in any layout: its own bug, not Torch-Pruning's nor carprune's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        return x.view(x.size(0), 99)


class StrideReader(nn.Module):
    """Runs in channels_last but computes something else there: its outputs read the layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        x = self.conv(x)
        return x.flatten(1) * (1.0 if x.is_contiguous() else 2.0)


@pytest.fixture(scope="module")
def view(fmnist) -> tuple[nn.Module, TensorDataset]:
    """A ViewNet with random (Kaiming, zero-bias) weights, and 300 images labelled by it:
    its predictions spread over several classes."""
    torch.manual_seed(1)
    net = ViewNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                m.bias.zero_()
    net.eval().carprune_spec = {"arch": {"name": f"{ME}:view_net", "kwargs": {}},
                                "input_shape": [1, 28, 28]}
    x = fmnist.val.tensors[0][:300]
    with torch.no_grad():
        y = net(x).argmax(1)
    assert int((torch.bincount(y) > 0).sum()) >= 3
    return net, TensorDataset(x, y)


def fresh(net: nn.Module) -> nn.Module:
    """A copy of the network with no layout decided yet."""
    out = copy.deepcopy(net)
    out.__dict__.pop(ATTRIBUTE, None)
    return out


def test_the_layout_is_decided_once_with_one_warning_and_copies_keep_it(view, baseline):
    net, ds = fresh(view[0]), view[1]
    weights = net.conv_layers[0].weight.detach().clone()
    tf32 = torch.backends.cudnn.allow_tf32  # off while the layouts are compared, then restored
    with pytest.warns(UserWarning, match=r"does not run in channels_last layout \(RuntimeError: "
                      r"view size is not compatible .*\); carprune keeps its contiguous layout"):
        assert layout_for(net, ds.tensors[0][:1]) == torch.contiguous_format
    assert net.conv_layers[0].weight.is_contiguous()  # decided on a copy: the network is as it was
    assert torch.equal(net.conv_layers[0].weight, weights)
    assert torch.backends.cudnn.allow_tf32 == tf32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layout_for(net, ds.tensors[0][:1]) == torch.contiguous_format
        assert layout_for(copy.deepcopy(net), ds.tensors[0][:1]) == torch.contiguous_format
    # the shipped network runs in channels_last, within rounding: it stays there
    assert getattr(baseline, ATTRIBUTE) == torch.channels_last
    assert baseline.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match=r"\(its outputs change, beyond rounding\)"):
        assert layout_for(StrideReader(), ds.tensors[0][:1]) == torch.contiguous_format


def test_the_view_network_prunes_per_layer_and_globally_as_the_naive_engine_does(view):
    net, ds = view
    picks, accuracy = {}, {}
    for engine in ("fast", "naive"):
        with pytest.warns(UserWarning, match="does not run in channels_last"):
            result = cp.car_prune(fresh(net), ds, LAYERS, keep=0.5, progress=False,
                                  engine=cp.EngineOptions(engine=engine))
        picks[engine] = {name: r.removed for name, r in result.layers.items()}
        accuracy[engine] = cp.evaluate(result.model, ds).correct
        assert [result.layers[n].filters_after for n in LAYERS] == [4, 8, 8]
    assert picks["fast"] == picks["naive"]
    assert accuracy["fast"] == accuracy["naive"]
    steps = {}
    for engine in ("fast", "naive"):
        result, steps[engine] = cp.global_car_prune(net, ds, 0.7, progress=False,
                                                    engine=cp.EngineOptions(engine=engine))
        assert result.model(ds.tensors[0][:2]).shape == (2, 10)
    assert [(s.layer, s.removed) for s in steps["fast"]] == \
        [(s.layer, s.removed) for s in steps["naive"]]
    assert len(steps["fast"]) >= 3


def test_class_importance_of_the_view_network_is_the_naive_engines(view):
    net, ds = view
    fast = cp.class_importance(net, ds, "conv_layers.3", progress=False)
    naive = cp.class_importance(net, ds, "conv_layers.3", engine="naive", progress=False)
    np.testing.assert_array_equal(fast.matrix, naive.matrix)
    assert np.nanmax(fast.matrix) > 0  # some filter costs some class images


def test_the_pruned_view_network_reloads_with_identical_outputs(view, tmp_path):
    net, ds = view
    pruned = cp.car_prune(net, ds, LAYERS[:2], keep=0.5, progress=False).model
    cp.save(pruned, tmp_path / "ck")
    with pytest.warns(UserWarning, match="does not run in channels_last"):
        loaded = cp.load(tmp_path / "ck")
    x = ds.tensors[0][:64]
    assert loaded.conv_layers[3].out_channels == 8
    assert torch.equal(loaded(x), pruned(x))


def test_a_network_that_runs_in_both_layouts_gets_the_same_picks_in_each(baseline, fmnist):
    ds = subset(fmnist.val, 150)
    contiguous = copy.deepcopy(baseline).to(memory_format=torch.contiguous_format)
    setattr(contiguous, ATTRIBUTE, torch.contiguous_format)  # forced
    results = {name: cp.car_prune(model, ds, ["conv1", "conv2"], keep=0.75, progress=False)
               for name, model in (("channels_last", baseline), ("contiguous", contiguous))}
    assert results["contiguous"].model.conv2.weight.is_contiguous()
    assert results["channels_last"].model.conv2.weight.is_contiguous(
        memory_format=torch.channels_last)
    picks = {name: {n: r.removed for n, r in res.layers.items()} for name, res in results.items()}
    assert picks["contiguous"] == picks["channels_last"]
    assert [len(p) for p in picks["contiguous"].values()] == [8, 16]


def test_the_networks_own_error_names_its_line_and_only_then_torch_pruning(monkeypatch):
    source, first = inspect.getsourcelines(BadView.forward)
    line = first + next(i for i, text in enumerate(source) if ".view(" in text)
    with pytest.raises(cp.CarpruneError) as info:
        cp.Surgery(BadView(), torch.zeros(1, 1, 28, 28))
    message = str(info.value)
    assert message.startswith("the network's own forward fails on a 1x1x28x28 example "
                              "(RuntimeError: shape '[1, 99]' is invalid")
    assert f"{Path(__file__).name}:{line}; " in message and "Torch-Pruning" not in message

    def refuse(*args, **kwargs):
        raise ValueError("an odd graph")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", refuse)
    with pytest.raises(cp.CarpruneError, match=r"^Torch-Pruning cannot build the dependency "
                       r"graph of this network, whose own forward runs \(ValueError: an odd "
                       r"graph\)"):
        cp.Surgery(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.zeros(1, 1, 28, 28))


@pytest.mark.slow
def test_the_cli_prunes_the_view_network_from_its_factory(view, tmp_path, carprune_cli):
    save_file({k: v.contiguous() for k, v in view[0].state_dict().items()}, tmp_path / "w.st")
    proc = carprune_cli("prune", "--model", f"{ME}:view_net", "--weights", tmp_path / "w.st",
                        "--data", f"{ME}:data", "--layers", "conv_layers.0", "conv_layers.3",
                        "--keep", "0.5", "--finetune-epochs", "0", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    warned = [w for w in proc.stderr.splitlines() if "channels_last" in w]
    assert len(warned) == 1 and warned[0].startswith(
        "carprune: warning: this network does not run in channels_last layout (RuntimeError: ")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["layers"]["conv_layers.0"]["filters_after"] == 4
    assert result["layers"]["conv_layers.3"]["filters_after"] == 8
    reloaded = cp.load(tmp_path / "run")
    assert reloaded.conv_layers[3].out_channels == 8
