import csv
import dataclasses
import io

import pytest
import torch

from carprune import compare
from carprune.car import car_prune
from carprune.criteria import CRITERIA, criterion_prune, ranking
from carprune.groups import Surgery
from carprune.scoring import ScoringSet

from .conftest import hand_made_data, hand_made_net, subset


@pytest.fixture()
def net_with_dead_filter():
    net = hand_made_net(readout=(2.0, 1.0, 0.7, 0.5))
    with torch.no_grad():
        net.conv1.weight[2] = 0
    return net


@pytest.mark.parametrize("criterion", ["car-oneshot", "l1", "l2", "mean-activation", "apoz",
                                       "taylor"])
def test_a_filter_of_zeros_ranks_last(net_with_dead_filter, criterion):
    scoring = ScoringSet.from_any(hand_made_data(), 2)
    surgery = Surgery(net_with_dead_filter, scoring.example())
    assert ranking(criterion, surgery, "conv1", scoring)[0] == 2


def test_greedy_car_removes_the_dead_filter_first(net_with_dead_filter):
    result = car_prune(net_with_dead_filter, hand_made_data(), ["conv1"], keep=3, progress=False)
    assert result.layers["conv1"].removed == [2]


def test_random_is_reproducible_by_seed(baseline, fmnist):
    scoring = ScoringSet.from_any(subset(fmnist.val, 64), 10)
    surgery = Surgery(baseline, scoring.example())
    first = ranking("random", surgery, "conv2", scoring, seed=3)
    assert first == ranking("random", surgery, "conv2", scoring, seed=3)
    assert first != ranking("random", surgery, "conv2", scoring, seed=4)
    assert sorted(first) == list(range(64))


def test_every_criterion_prunes_through_the_same_path(baseline, fmnist):
    scoring = subset(fmnist.val, 100)
    for criterion in CRITERIA[1:]:
        result = criterion_prune(baseline, scoring, ["conv1"], criterion, keep=0.75)
        assert result.model.conv1.out_channels == 24
        assert len(set(result.layers["conv1"].removed)) == 8
        assert result.model(fmnist.test.tensors[0][:2]).shape == (2, 10)


@pytest.mark.slow
def test_compare_rows_and_car_curve(baseline, fmnist):
    data = dataclasses.replace(fmnist, val=subset(fmnist.val, 150),
                               test=subset(fmnist.test, 500))
    grid = [1.0, 0.5, 0.25]
    points = compare.compare(baseline, data, ["conv1"], CRITERIA, grid, seeds=2,
                             progress=False)
    rows = list(csv.DictReader(io.StringIO(compare.to_csv(points))))
    assert {(r["criterion"], int(r["kept"])) for r in rows} == \
        {(c, k) for c in CRITERIA for k in (32, 16, 8)}
    full = {r["criterion"]: float(r["test_accuracy"]) for r in rows if r["kept"] == "32"}
    assert len(set(full.values())) == 1  # nothing removed: every criterion agrees
    greedy = car_prune(baseline, data.val, ["conv1"], keep=8, progress=False)
    steps = greedy.layers["conv1"].steps
    car = {p.kept: p.val_accuracy for p in points if p.criterion == "car"}
    assert car[16] == steps[15].val_accuracy and car[8] == steps[23].val_accuracy
    oneshot = {p.kept: p.val_accuracy for p in points if p.criterion == "car-oneshot"}
    assert all(car[k] >= oneshot[k] for k in (16, 8))  # re-scoring earns its cost on val


def test_margins_and_oneshot_gaps_by_hand():
    def point(criterion, kept, test, retrained=False, low=None, high=None):
        return compare.Point("conv1", criterion, kept, retrained, float("nan"), test,
                             test if low is None else low, test if high is None else high, 1)

    points = [point("car", 16, 0.80), point("car-oneshot", 16, 0.75), point("l1", 16, 0.60),
              point("taylor", 16, 0.70), point("car", 24, 0.90), point("car-oneshot", 24, 0.91),
              point("car", 16, 0.85, True, 0.84, 0.86), point("l1", 16, 0.86, True, 0.85, 0.87)]
    m = compare.margins(points, 0.5, {"conv1": 32})["conv1"]
    assert m["kept"] == 16 and m["best_other"] == "taylor"
    assert m["margin"] == pytest.approx(0.10)
    r = compare.margins(points, 0.5, {"conv1": 32}, retrained=True)["conv1"]
    assert r["best_other"] == "l1" and r["margin"] == pytest.approx(-0.01)
    assert r["spread"]["car"] == [0.84, 0.86]
    gaps = compare.oneshot_gaps(points)["conv1"]
    assert gaps == {16: pytest.approx(0.05), 24: pytest.approx(-0.01)}
