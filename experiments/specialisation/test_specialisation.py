"""The specialisation study on a few hundred Fashion-MNIST images: every method reaches each
level of the MACs on the specialised network, the table's figures are the networks' own
(medians of their seeds, scratch at subset CAR's widths), and the targets are arithmetic on
the table."""

import dataclasses
import statistics

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from .fmnist import PRUNED, SCRATCH, Snapshots, subset_study
from .main import arguments, targets

pytestmark = pytest.mark.experiment


def test_snapshots_copy_the_first_network_at_or_under_each_level():
    shares = iter([0.9, 0.6, 0.45, 0.3, 0.05])
    snaps = Snapshots([0.1, 0.5, 0.25], lambda net: next(shares))
    nets = [nn.Linear(1, 1) for _ in range(5)]
    assert [snaps(net) for net in nets] == [0.9, 0.6, 0.45, 0.3, 0.05]
    assert {level: share for level, (_, share) in snaps.taken.items()} == \
        {0.5: 0.45, 0.25: 0.05, 0.1: 0.05}
    assert snaps.taken[0.5][0] is not nets[2]  # a copy: later pruning leaves it as it was
    assert snaps.taken[0.5][0].weight.item() == nets[2].weight.item()


def test_targets_are_the_margins_of_the_table():
    at = {PRUNED[0]: {"test_pruned": 0.80, "test_finetuned": 0.905},
          PRUNED[1]: {"test_pruned": 0.65}, PRUNED[2]: {"test_pruned": 0.70},
          PRUNED[3]: {"test_pruned": 0.71}}
    met = targets({"hard": {"unpruned_test": 0.91, "levels": {"0.25": at}}})
    assert met["margins_pruned"] == pytest.approx({PRUNED[1]: 0.15, PRUNED[2]: 0.10,
                                                   PRUNED[3]: 0.09})
    assert not met["margin_met"]  # Taylor is 9 points behind, not 10
    assert met["finetuned_gap"] == pytest.approx(0.005) and met["finetuned_met"]
    assert targets({"easy": {}}) is None


@pytest.mark.slow
def test_every_method_reaches_the_level_and_the_table_is_its_own():
    import carprune as cp

    args = arguments(["--subsets", "easy", "--levels", "0.5", "--seeds", "2",
                      "--score-samples", "300", "--all-samples", "200", "--train-samples",
                      "256", "--step", "8", "--no-imagenet", "--no-progress"])
    model, data = cp.load("convnet-fmnist"), cp.data.fashion_mnist()
    # val cut to the 300 images the CARs score on: Taylor's gradients then take the subset's
    # among them, not its first 512 val images
    data = dataclasses.replace(data, val=TensorDataset(*(t[:300] for t in data.val.tensors)))
    entry = subset_study(model, data, "easy", args)
    x, y = data.test.tensors
    mine = (y == 1) | (y == 7) | (y == 8)
    by_hand = TensorDataset(x[mine], torch.tensor([[1, 7, 8].index(int(v)) for v in y[mine]]))
    trimmed = cp.specialise(model, [8, 1, 7], x[:1])
    assert entry["unpruned_test"] == cp.evaluate(trimmed, by_hand).accuracy
    assert entry["classes"] == ["Trouser", "Sneaker", "Bag"] and entry["indices"] == [1, 7, 8]
    assert entry["test_images"] == 3000 and entry["train_images"] == 256
    at = entry["levels"]["0.5"]
    assert set(at) == {*PRUNED, SCRATCH}
    for r in at.values():
        assert r["macs"] <= 0.5
        assert len(r["test_finetuned_seeds"]) == 2
        assert r["test_finetuned"] == statistics.median(r["test_finetuned_seeds"])
    assert at[SCRATCH]["widths"] == at[PRUNED[0]]["widths"]
    assert at[SCRATCH]["test_pruned"] is None
