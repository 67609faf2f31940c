import json

import pytest
import torch
import torch.nn.functional as F

import carprune as cp
from carprune.car import Approximation, EngineOptions, car_prune, resolve_keep
from carprune.groups import Surgery
from carprune.scoring import compensation

from .conftest import hand_made_data, hand_made_net, subset


def test_hand_made_car_indices_and_picks():
    # readout a = (2, 1, 0.1), threshold 1, images x = 0.4, 0.6, 1.2, all labelled 1.
    # Full net: 3.1x > 1 for all three: 3/3. Without filter 0: 1.1x -> only x=1.2 right (1/3);
    # without 1: 2.1x -> 0.6, 1.2 right (2/3); without 2: 3.0x -> all right (3/3).
    # CAR = (2/3, 1/3, 0): remove 2. Then without 0: 1.0x -> 1.2 right (1/3); without 1:
    # 2.0x -> 0.6, 1.2 (2/3): remove 1.
    for engine in ("naive", "fast"):
        result = car_prune(hand_made_net(), hand_made_data(), ["conv1"], keep=1,
                           engine=EngineOptions(engine), progress=False)
        rec = result.layers["conv1"]
        assert rec.removed == [2, 1]
        assert rec.steps[0].car == pytest.approx([2 / 3, 1 / 3, 0.0])
        assert rec.steps[1].candidates == [0, 1]
        assert rec.steps[1].car == pytest.approx([2 / 3, 1 / 3])
        assert [s.val_accuracy for s in rec.steps] == pytest.approx([1.0, 2 / 3])
        assert result.model.conv1.out_channels == 1


def test_hand_made_compensated_car():
    # The three filters are the same relu(x), so once the readout is refit on the filters left
    # (least squares), any of them carries the others' share: logit1 stays 3.1x, no image
    # changes (CAR 0 everywhere), and the last filter's readout weight is about 3.1.
    for engine in ("naive", "fast"):
        result = car_prune(hand_made_net(), hand_made_data(), ["conv1"], keep=1,
                           engine=EngineOptions(engine, compensate=True), progress=False)
        rec = result.layers["conv1"]
        assert rec.steps[0].car == [0.0, 0.0, 0.0] and rec.steps[1].car == [0.0, 0.0]
        assert result.val_after == 1.0
        assert float(result.model.fc.weight[1, 0]) == pytest.approx(3.1, rel=1e-3)


def test_compensation_is_the_least_squares_refit(concat_net, fmnist):
    # Remove channels 1 and 4 of `left` (inputs 1 and 4 of `mix`, after the concatenation):
    # mix's new weight must reproduce its old output from the inputs left as well as
    # torch.linalg.lstsq does, and far better than dropping the columns.
    x = subset(fmnist.val, 300).tensors[0]
    surgery = Surgery(concat_net, x[:1])
    seen = []
    hook = surgery.model.mix.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        surgery.model(x)
    hook.remove()
    cols = F.unfold(seen[0], 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 16 * 9)
    w = concat_net.mix.weight.reshape(12, -1)
    kept = [c for c in range(16 * 9) if c // 9 not in (1, 4)]
    target = cols @ w.T
    best = torch.linalg.lstsq(cols[:, kept].double(), target.double()).solution.float()
    compensation.remove(surgery, "left", [1, 4], [(x, None)])
    ours = surgery.model.mix.weight.reshape(12, -1)
    residual = {name: float((cols[:, kept] @ m - target).norm())
                for name, m in (("ours", ours.T), ("lstsq", best), ("dropped", w[:, kept].T))}
    assert residual["ours"] == pytest.approx(residual["lstsq"], rel=1e-3)
    assert residual["ours"] < 0.5 * residual["dropped"]


def test_ties_go_to_lower_loss_then_lower_index():
    # filters 2 and 3 are identical and harmless: equal counts and equal loss -> lower index
    # first; filter 1 costs no accuracy either but more loss than 2 and 3.
    net = hand_made_net(readout=(2.0, 0.5, 0.05, 0.05), threshold=0.5)
    result = car_prune(net, hand_made_data((0.4, 0.6, 1.2)), ["conv1"], keep=1, progress=False)
    assert result.layers["conv1"].removed[:2] == [2, 3]


def brute_force_picks(model, x, y, picks_wanted):
    """Ablate by hand (conv rows, BN scale and shift), evaluate, take the best, repeat."""
    gone = []
    names = ("conv1.weight", "bn1.weight", "bn1.bias")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(picks_wanted):
        best = None
        for i in range(model.conv1.out_channels):
            if i in gone:
                continue
            with torch.no_grad():
                for n in names:
                    p = model.get_parameter(n)
                    p.copy_(state[n])
                    p[gone + [i]] = 0
                logits = model(x)
            key = (-int((logits.argmax(1) == y).sum()),
                   float(F.cross_entropy(logits, y, reduction="sum")), i)
            best = min(best, key) if best else key
        gone.append(best[2])
    model.load_state_dict(state)
    return gone


def test_first_picks_equal_brute_force_on_convnet(baseline, fmnist):
    scoring = subset(fmnist.val, 500)
    x, y = scoring.tensors
    expected = brute_force_picks(baseline, x, y, 3)
    for engine in ("naive", "fast"):
        result = car_prune(baseline, scoring, ["conv1"], keep=29, engine=EngineOptions(engine),
                           progress=False)
        assert result.layers["conv1"].removed == expected


@pytest.mark.parametrize("keep, n, expected", [(0.5, 32, 16), (0.25, 10, 3), (16, 32, 16),
                                               (1, 5, 1), (0.9, 3, 3)])
def test_resolve_keep(keep, n, expected):
    assert resolve_keep(keep, n, "conv1") == expected


@pytest.mark.parametrize("keep, words", [(0, "fraction"), (-1, "fraction"), (32, "not below"),
                                         (40, "not below"), (0.01, "leaves no filter"),
                                         (2.5, "whole count")])
def test_impossible_keep(keep, words):
    with pytest.raises(cp.CarpruneError, match=words):
        resolve_keep(keep, 32, "conv1")


def test_step_k_and_history_reload(baseline, fmnist, tmp_path):
    scoring = subset(fmnist.val, 300)
    result = car_prune(baseline, scoring, ["conv2", "conv1"], keep=0.75,
                       approx=Approximation(step=4), progress=False)
    assert [len(s.removed) for s in result.layers["conv2"].steps] == [4, 4, 4, 4]
    assert result.model.conv2.out_channels == 48 and result.model.conv1.out_channels == 24
    assert baseline.conv2.out_channels == 64  # the input model is untouched
    cp.save(result.model, tmp_path / "p")
    loaded = cp.load(tmp_path / "p")
    x = fmnist.test.tensors[0][:64]
    assert torch.equal(loaded(x), result.model(x))
    history = json.loads((tmp_path / "p" / "model.json").read_text())["pruning_history"]
    assert [h[0] for h in history] == ["conv2"] * 4 + ["conv1"] * 2


def test_screen_rescores_only_the_lowest_so_far(baseline, fmnist):
    scoring = subset(fmnist.val, 300)
    exact = car_prune(baseline, scoring, ["conv3"], keep=58, progress=False)
    wide = car_prune(baseline, scoring, ["conv3"], keep=58, approx=Approximation(screen=64),
                     progress=False)
    assert wide.layers["conv3"].removed == exact.layers["conv3"].removed
    steps = car_prune(baseline, scoring, ["conv3"], keep=58, approx=Approximation(screen=5),
                      progress=False).layers["conv3"].steps
    assert steps[0].candidates == exact.layers["conv3"].steps[0].candidates  # first: all
    last = dict(zip(steps[0].candidates, steps[0].car, strict=True))
    removed = set(steps[0].removed)
    for now in steps[1:]:
        alive = [o for o in last if o not in removed]
        assert now.candidates == sorted(sorted(alive, key=lambda o: (last[o], o))[:5])
        # the pick is the best of the screened, by the same exact ranking
        assert now.car[now.candidates.index(now.removed[0])] == min(now.car)
        last.update(zip(now.candidates, now.car, strict=True))
        removed |= set(now.removed)
    with pytest.raises(cp.CarpruneError, match="--screen must be at least --step"):
        car_prune(baseline, scoring, ["conv3"], keep=58, approx=Approximation(step=4, screen=2),
                  progress=False)
