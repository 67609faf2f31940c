"""Block candidates and global CAR's block mode: a block's tallies are those of the network with
all its units ablated (and, compensating, refit), both engines pick the same blocks, and the
first block to go is the rule's choice on hand-counted tallies."""

import copy

import pytest
import torch
import torch.nn.functional as F

from carprune import measure
from carprune.car import Approximation, Budget, EngineOptions, Resume, global_car_prune
from carprune.groups import Surgery
from carprune.scoring import FastEngine, NaiveEngine, ScoringSet, compensation
from carprune.scoring.first_order import first_order
from carprune.scoring.rule import key
from carprune.units import Block, Unit

from .conftest import subset

CANDIDATES = [Block("conv2", (1, 5, 9)), Unit("conv2", 4), Block("conv3", (0, 2)),
              Block("conv1", (3,)), Block("conv1", (0, 7, 30))]


@pytest.fixture(scope="module")
def scoring(fmnist):
    return ScoringSet.from_any(subset(fmnist.val, 300), 10)


def ablated_by_hand(model, layer, channels, x, y):
    """(correct, summed loss) of the shipped convnet with the filters' conv rows and BatchNorm
    scale and shift zeroed."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name in (f"{layer}.weight", f"bn{layer[-1]}.weight", f"bn{layer[-1]}.bias"):
            model.get_parameter(name)[list(channels)] = 0
        logits = model(x)
    return int((logits.argmax(1) == y).sum()), float(F.cross_entropy(logits, y, reduction="sum"))


def test_block_tallies_are_the_ablated_network(baseline, scoring):
    surgery = Surgery(baseline, scoring.example())
    x, y = (torch.cat(t) for t in zip(*scoring.batches, strict=True))
    base, naive = NaiveEngine().score(surgery, CANDIDATES, scoring)
    _, fast = FastEngine().score(surgery, CANDIDATES, scoring)
    assert int(base.correct[0]) == int((baseline(x).argmax(1) == y).sum())
    for i, candidate in enumerate(CANDIDATES):
        correct, loss = ablated_by_hand(baseline, candidate.layer,
                                        [u.channel for u in candidate.units], x, y)
        assert int(naive.correct[i]) == int(fast.correct[i]) == correct, candidate
        assert float(naive.loss[i]) == pytest.approx(loss, rel=1e-5)
    assert torch.equal(naive.class_correct, fast.class_correct)
    assert torch.allclose(naive.loss, fast.loss, rtol=1e-4)


def test_compensated_block_tallies_are_the_refit_network(baseline, scoring):
    """Refit on the first half, judged on the rest: each block's tallies are those of the
    network refit by compensation.remove on the first half (the least-squares refit, checked
    against lstsq in test_prune.py), evaluated on the rest; fitted on the images scored, the
    fast engine's tallies are the naive engine's."""
    fit, judge = scoring.halves()
    assert (fit.total, judge.total) == (150, 150)
    surgery = Surgery(baseline, scoring.example())
    options = EngineOptions(compensate=True, ridge=1e-2)
    _, held_out = FastEngine(options).score(surgery, CANDIDATES, judge, fit=fit)
    x, y = (torch.cat(t) for t in zip(*judge.batches, strict=True))
    for i, candidate in enumerate(CANDIDATES):
        refit = Surgery(baseline, scoring.example())
        compensation.remove(refit, candidate.layer, [u.channel for u in candidate.units],
                            fit.batches, ridge=1e-2)
        with torch.no_grad():
            logits = refit.model(x)
        assert int(held_out.correct[i]) == int((logits.argmax(1) == y).sum()), candidate
        assert float(held_out.loss[i]) == pytest.approx(
            float(F.cross_entropy(logits, y, reduction="sum")), rel=1e-4)
    _, naive = NaiveEngine(options).score(surgery, CANDIDATES, scoring)
    _, fast = FastEngine(options).score(surgery, CANDIDATES, scoring)
    assert torch.equal(naive.correct, fast.correct)
    assert torch.allclose(naive.loss, fast.loss, rtol=1e-4)


def test_blocks_through_the_masked_tail(small_resnet, scoring):
    few = scoring.subset(100)
    surgery = Surgery(small_resnet, few.example())
    blocks = [Block("layer2.0.conv2", (0, 3, 7)), Unit("layer2.0.conv2", 5),
              Block("layer1.0.conv1", (1, 2))]
    _, naive = NaiveEngine().score(surgery, blocks, few)
    _, fast = FastEngine().score(surgery, blocks, few)
    assert torch.equal(naive.correct, fast.correct)
    assert torch.equal(naive.class_correct, fast.class_correct)


def test_block_mode_first_round_by_hand(baseline, scoring):
    """Each layer's block is its quarter the first-order estimate ranks least needed; the
    block that loses least per MAC saved (by ablating it by hand) goes first."""
    surgery = Surgery(baseline, scoring.example())
    layers = ["conv1", "conv2", "conv3"]
    estimate = first_order(surgery, layers, scoring)
    saving = measure.unit_costs(surgery, layers, "macs")
    x, y = (torch.cat(t) for t in zip(*scoring.batches, strict=True))
    correct, loss = ablated_by_hand(baseline, "conv1", [], x, y)
    keys = []
    for order, layer in enumerate(layers):
        size = surgery.size(layer)
        block = sorted(sorted(range(size), key=lambda c, n=layer: (estimate[Unit(n, c)], c))
                       [:size // 4])
        left, loss_left = ablated_by_hand(baseline, layer, block, x, y)
        saved = sum(saving[layer][c] for c in block)
        keys.append((*key(correct - left, loss_left - loss, saved), order, layer, block))
    first = min(keys)
    _, steps = global_car_prune(baseline, scoring, 0.9, approx=Approximation(blocks=0.25),
                                progress=False)
    assert (steps[0].layer, steps[0].removed) == (first[-2], first[-1])


@pytest.mark.parametrize("compensate", [False, True])
def test_block_mode_picks_alike_with_either_engine(baseline, scoring, compensate):
    rounds, runs = [], []

    def on_step(progress, model):
        rounds.append((len(progress.rounds), measure.macs_params(model, (1, 28, 28))[0]))

    for engine in ("naive", "fast"):
        runs.append(global_car_prune(
            baseline, scoring, 0.5, budget=Budget(min_keep=0.2),
            approx=Approximation(blocks=0.25, step=2),
            engine=EngineOptions(engine, compensate=compensate), progress=False,
            resume=Resume(on_step=on_step))[1])
    naive, fast = runs
    assert len(naive) >= 3 and len(naive[0].removed) in (8, 16)
    assert [(s.layer, s.removed) for s in naive] == [(s.layer, s.removed) for s in fast]
    assert [s.val_accuracy for s in naive] == [s.val_accuracy for s in fast]
    # the callback sees the network after every round: its MACs are the round's last step's
    original = measure.macs_params(baseline, (1, 28, 28))[0]
    ends = [s.remaining for s in naive]
    assert [n for n, _ in rounds] == list(range(1, len(rounds) // 2 + 1)) * 2
    assert {macs / original for _, macs in rounds} <= set(ends)


def test_block_mode_resumes_identically(baseline, scoring):
    """Killed after its first round, a compensated block-mode run replays that round's removals
    (refits included) and goes on to the same steps and weights as an uninterrupted run."""
    kwargs = {"approx": Approximation(blocks=0.25, step=1),
              "engine": EngineOptions(compensate=True, ridge=1e-2), "progress": False}
    whole, steps = global_car_prune(baseline, scoring, 0.6, **kwargs)
    saved = []

    def die_after_one(progress, model):
        saved.append(copy.deepcopy(progress))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        global_car_prune(baseline, scoring, 0.6, **kwargs, resume=Resume(on_step=die_after_one))
    assert len(saved[0].rounds) == 1 < len(steps)
    resumed, resumed_steps = global_car_prune(baseline, scoring, 0.6, **kwargs,
                                              resume=Resume(saved[0]))
    assert [(s.layer, s.removed, s.val_accuracy) for s in resumed_steps] == \
        [(s.layer, s.removed, s.val_accuracy) for s in steps]
    theirs = resumed.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in whole.model.state_dict().items())
