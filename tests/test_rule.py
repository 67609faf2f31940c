"""The ranking rule is written once (scoring/rule.py) and every path that ranks by CAR orders
exact ties alike: greedy CAR's first step, global CAR's ranking, a raced shortlist's finalists,
one-shot CAR among the criteria, and CARImportance inside Torch-Pruning."""

import pytest
import torch
import torch_pruning as tp
from torch.utils.data import TensorDataset

import carprune as cp
from carprune.car import Approximation, Budget, EngineOptions, car_prune, global_car_prune
from carprune.car.ranking import Ranking
from carprune.car.rounds import Mode, _finalists
from carprune.car.run import start
from carprune.criteria import ranking
from carprune.groups import Surgery, Unit
from carprune.scoring import ScoringSet, make_engine
from carprune.scoring.rule import efficiency, importance, key, outcomes, rank

from .conftest import hand_made_net

pytestmark = pytest.mark.filterwarnings("ignore:the scoring set holds a single class")

# logit1 = sum a_i relu(x) over the filters kept, logit0 = 1.5; every image is labelled 1
READOUT = (2.0, 1.0, 1.0, 0.05, 0.05, 0.3, 0.7, 0.0, -0.1)
DEAD = 6  # its conv row and bias are zero: relu(0) = 0 whatever its readout
XS = (0.4, 0.6, 1.2, 2.0)
# With all nine, logit1 = 4.3 x > 1.5 for every image. Without filter 0: 2.3 x, wrong for 0.4
# and 0.6 (2 images lost); without 1 or 2 (duplicates): 3.3 x, wrong for 0.4 (1 lost); without
# 3, 4 (duplicates) or 5: 4.25 x or 4.0 x, none lost, the loss up by a little, more for 5;
# without 6 (dead) or 7 (readout 0): the same logits exactly; without 8: 4.4 x, a gain in loss.
LOST = [2, 1, 1, 0, 0, 0, 0, 0, 0]
ORDER = [8, 6, 7, 3, 4, 5, 1, 2, 0]  # lost, then loss gained, then the lower index


def net():
    model = hand_made_net(readout=READOUT, threshold=1.5)
    with torch.no_grad():
        model.conv1.weight[DEAD] = 0
    return model


def data() -> TensorDataset:
    x = torch.tensor(XS).view(-1, 1, 1, 1)
    return TensorDataset(x, torch.ones(len(XS), dtype=torch.int64))


@pytest.fixture(scope="module")
def tallies():
    scoring = ScoringSet.from_any(data(), 2)
    surgery = Surgery(net(), scoring.example())
    units = [Unit("conv1", c) for c in range(len(READOUT))]
    return scoring, surgery, units, make_engine(EngineOptions("naive")).score(surgery, units,
                                                                              scoring)


def test_the_outcomes_are_the_arithmetic(tallies):
    *_, (base, scores) = tallies
    found = outcomes(base, scores)
    assert [lost for lost, _ in found] == LOST
    gained = [g for _, g in found]
    assert gained[1] == gained[2] and gained[3] == gained[4] and gained[6] == gained[7] == 0
    assert gained[8] < 0 < gained[3] < gained[5]
    assert rank(base, scores, range(len(READOUT))) == ORDER


def test_key_and_efficiency_weigh_by_saving():
    assert key(3, 7) == (3, 7)  # saving 1: the outcome itself
    assert key(2, 5, saved=4.0) == (0.5, 1.25)
    assert efficiency(-2, 3.0) == -6.0  # a gain: gain times saving, any gain before any loss
    assert efficiency(0, 3.0) == 0 and efficiency(6, 3.0) == 2.0


def test_every_path_orders_the_ties_alike(tallies):
    scoring, surgery, units, (base, scores) = tallies
    n = len(READOUT)
    assert rank(base, scores, range(n)) == ORDER
    for engine in ("naive", "fast"):  # greedy: the first step's k removals are rank's first k
        firsts = [car_prune(net(), data(), ["conv1"], keep=n - k, approx=Approximation(step=k),
                            engine=EngineOptions(engine), progress=False)
                  .layers["conv1"].steps[0].removed for k in range(1, n)]
        greedy = [next(iter(set(now) - set(before)))
                  for before, now in zip([[], *firsts[:-1]], firsts, strict=True)]
        assert greedy == ORDER[:-1]
    # global: equal savings (every filter of a 1x1 conv saves the same MACs)
    ranked = Ranking(surgery, ["conv1"], {"conv1": 1}, 1)
    ranked.learn(units, base, scores)
    cuts = ranked.cuts(["conv1"], {u: 3.0 for u in units})
    assert [c.units[0][0] for c in sorted(cuts, key=lambda c: c.key)] == ORDER[:-1]
    _, steps = global_car_prune(net(), data(), 0.95, budget=Budget(min_keep=0.0),
                                progress=False)
    assert steps[0].removed == [ORDER[0]]
    # the finalists of a race run on all the images, every unit a finalist
    run = start(surgery, scoring, EngineOptions(), 0.0)
    mode = Mode(Approximation(step=n, shortlist=n, race=1), False, scoring)
    finalists = _finalists(run, ranked, units, {u: 3.0 for u in units}, mode)
    assert [u.channel for u in finalists] == ORDER
    # one-shot CAR among the criteria, and inside Torch-Pruning
    assert ranking("car-oneshot", surgery, "conv1", scoring) == ORDER
    model = net()
    dg = tp.DependencyGraph().build_dependency(model, scoring.example())
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(n)))
    scored = cp.CARImportance(data())(group)
    assert sorted(range(n), key=lambda i: (float(scored[i]), i)) == ORDER
    assert torch.equal(scored, importance(base, scores, range(n)))
    assert scored.floor().tolist() == LOST  # images lost, the rule's place below one
