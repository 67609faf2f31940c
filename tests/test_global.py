"""Global CAR under a budget, on any architecture the dependency graph handles, and CAR inside
Torch-Pruning."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from safetensors.torch import save_file
from torch import nn

import carprune as cp
from carprune.car import Approximation, Budget, EngineOptions, global_car_prune
from carprune.groups import Surgery, Unit
from carprune.measure import macs_params
from carprune.scoring.rule import efficiency

from .conftest import quick_trained, subset


@pytest.fixture(scope="module")
def tiny(fmnist):
    torch.manual_seed(0)
    return quick_trained("convnet", fmnist, n=2000, widths=(4, 6, 6), hidden=16)


def by_hand_cost(model, layer, i):
    """MACs a filter's removal saves in the tiny convnet: its own output channel at its
    resolution plus its consumer's input channel (conv: 9 taps per output, fc1: 3x3 features)."""
    size = {"conv1": 28, "conv2": 14, "conv3": 7}[layer]
    conv = getattr(model, layer)
    own = conv.in_channels * 9 * size * size
    nxt = {"conv1": "conv2", "conv2": "conv3"}.get(layer)
    consumer = getattr(model, nxt).out_channels * 9 * (size // 2) ** 2 if nxt \
        else model.fc1.out_features * 9
    return own + consumer


def unit_scores(model, x, y, gone):
    """(images lost, loss gained) of removing each remaining filter, by zeroing it on top of
    the `gone` ones; the model's weights are left as they were."""
    state = copy.deepcopy(model.state_dict())

    def evaluate(extra=None):
        with torch.no_grad():
            model.load_state_dict(state)
            for layer, idx in gone.items():
                chosen = idx + ([extra[1]] if extra and extra[0] == layer else [])
                for p in (f"{layer}.weight", f"bn{layer[-1]}.weight", f"bn{layer[-1]}.bias"):
                    model.get_parameter(p)[chosen] = 0
            logits = model(x)
        return int((logits.argmax(1) == y).sum()), float(F.cross_entropy(logits, y,
                                                                          reduction="sum"))
    base_correct, base_loss = evaluate()
    scores = {}
    for layer in ("conv1", "conv2", "conv3"):
        for i in range(getattr(model, layer).out_channels):
            if i not in gone[layer]:
                correct, loss = evaluate((layer, i))
                scores[layer, i] = (base_correct - correct, loss - base_loss)
    model.load_state_dict(state)
    return scores


def by_hand_efficiency(lost, cost):
    """Lost per MAC saved; a gain by gain times MACs saved (bigger savings first)."""
    return lost / cost if lost > 0 else lost * cost


def brute_force_global(model, x, y, picks):
    gone = {"conv1": [], "conv2": [], "conv3": []}
    order = []
    for _ in range(picks):
        keys = []
        for (layer, i), (lost, worse) in unit_scores(model, x, y, gone).items():
            cost = by_hand_cost(model, layer, i)
            keys.append((by_hand_efficiency(lost, cost), by_hand_efficiency(worse, cost),
                         int(layer[-1]), i, layer))
        best = min(keys)
        gone[best[4]].append(best[3])
        order.append((best[4], best[3]))
    return order


def test_first_global_picks_equal_a_cost_weighted_brute_force(tiny, fmnist):
    scoring = subset(fmnist.val, 400)
    expected = brute_force_global(tiny, *scoring.tensors, picks=2)
    for engine in ("naive", "fast"):
        _, steps = global_car_prune(tiny, scoring, target=0.5, budget=Budget(min_keep=0.0),
                                    engine=EngineOptions(engine), progress=False)
        assert [(s.layer, s.removed[0]) for s in steps[:2]] == expected
        assert steps[0].cost == by_hand_cost(tiny, *expected[0])


def candidates_scored(monkeypatch) -> list[int]:
    """The number of candidates of every scoring call global CAR makes from now on."""
    from carprune.car import run

    calls = []
    make = run.make_engine

    def spy(*args):
        engine = make(*args)
        score = engine.score
        engine.score = lambda surgery, units, *rest, **kw: (calls.append(len(units)),
                                                            score(surgery, units, *rest, **kw))[1]
        return engine

    monkeypatch.setattr(run, "make_engine", spy)
    return calls


def test_global_screen_rescores_only_the_first_few(tiny, fmnist, monkeypatch):

    scoring = subset(fmnist.val, 200)
    free = Budget(min_keep=0.0)
    exact, exact_steps = global_car_prune(tiny, scoring, target=0.5, budget=free,
                                          progress=False)
    _, wide = global_car_prune(tiny, scoring, target=0.5, budget=free,
                               approx=Approximation(screen=16),
                               progress=False)  # 16 = every unit: the exact run
    assert [(s.layer, s.removed) for s in wide] == [(s.layer, s.removed) for s in exact_steps]
    calls = candidates_scored(monkeypatch)
    _, screened = global_car_prune(tiny, scoring, target=0.5, budget=free,
                                   approx=Approximation(screen=3), progress=False)
    assert calls[0] == 16 and set(calls[1:-1]) == {3} and calls[-1] == 0  # last: the base
    assert (screened[0].layer, screened[0].removed) == (exact_steps[0].layer,
                                                        exact_steps[0].removed)
    with pytest.raises(cp.CarpruneError, match="--screen must be at least --step"):
        global_car_prune(tiny, scoring, target=0.5, approx=Approximation(step=4, screen=2),
                         progress=False)


def test_round_to_removes_blocks_and_leaves_multiples(tiny, fmnist):
    """Widths 4/6/6 in blocks of 2: each layer's block is its two filters that rank first on
    their own, and the first block to go has the least summed loss per summed MACs."""
    scoring = subset(fmnist.val, 400)
    scores = unit_scores(tiny, *scoring.tensors, {"conv1": [], "conv2": [], "conv3": []})
    blocks = []
    for layer in ("conv1", "conv2", "conv3"):
        cost = by_hand_cost(tiny, layer, 0)
        own = sorted((by_hand_efficiency(lost, cost), by_hand_efficiency(worse, cost), i)
                     for (name, i), (lost, worse) in scores.items() if name == layer)
        pair = [i for *_, i in own[:2]]
        lost, worse = (sum(scores[layer, i][k] for i in pair) for k in (0, 1))
        blocks.append((by_hand_efficiency(lost, 2 * cost), by_hand_efficiency(worse, 2 * cost),
                       int(layer[-1]), layer, sorted(pair)))
    first = min(blocks)
    for engine in ("naive", "fast"):
        result, steps = global_car_prune(tiny, scoring, target=0.5,
                                         budget=Budget(min_keep=0.0, round_to=2),
                                         engine=EngineOptions(engine), progress=False)
        assert (steps[0].layer, sorted(steps[0].removed)) == first[3:]
        assert all(len(s.removed) == 2 for s in steps)
        widths = [getattr(result.model, n).out_channels for n in ("conv1", "conv2", "conv3")]
        assert all(w % 2 == 0 and w >= 2 for w in widths)
        assert steps[-1].remaining <= 0.5
    # blocks of 4 from 4/6/6: conv1 cannot go (it would be empty), conv2 and conv3 only to 4
    with pytest.warns(UserWarning, match="--round-to"):
        result, _ = global_car_prune(tiny, scoring, target=0.3,
                                     budget=Budget(min_keep=0.0, round_to=4), progress=False)
    assert [getattr(result.model, n).out_channels for n in ("conv1", "conv2", "conv3")] == \
        [4, 4, 4]
    _, exact = global_car_prune(tiny, scoring, target=0.5, budget=Budget(min_keep=0.0),
                                progress=False)
    _, ones = global_car_prune(tiny, scoring, target=0.5, budget=Budget(min_keep=0.0, round_to=1),
                               progress=False)
    assert [(s.layer, s.removed) for s in ones] == [(s.layer, s.removed) for s in exact]


def test_ranking_prefers_gains_then_small_loss_per_saving():
    ranked = sorted([(2, 100), (2, 400), (0, 50), (-1, 10), (-1, 300), (-3, 10)],
                    key=lambda u: efficiency(*u))
    # gains first, by gain x saving: -1 x 300 = -300 before -3 x 10 = -30 before -1 x 10
    assert ranked == [(-1, 300), (-3, 10), (-1, 10), (0, 50), (2, 400), (2, 100)]


def test_budget_and_min_keep(tiny, fmnist):
    scoring = subset(fmnist.val, 200)
    with pytest.warns(UserWarning, match="min-keep floor"):
        result, steps = global_car_prune(tiny, scoring, target=0.05, budget=Budget(min_keep=0.5),
                                         approx=Approximation(step=3), progress=False)
    sizes = {"conv1": 4, "conv2": 6, "conv3": 6}
    for layer, n in sizes.items():
        assert getattr(result.model, layer).out_channels == -(-n // 2)  # ceil(0.5 n)
    result, steps = global_car_prune(tiny, scoring, target=0.6, progress=False)
    macs = macs_params(result.model, (1, 28, 28))[0]
    assert macs <= 0.6 * macs_params(tiny, (1, 28, 28))[0]
    assert steps[-1].remaining == pytest.approx(macs / macs_params(tiny, (1, 28, 28))[0])
    # rounds of 6: the last stops once it covers the budget, not 6 units further
    _, coarse = global_car_prune(tiny, scoring, target=0.6, approx=Approximation(step=6),
                                 progress=False)
    biggest = max(by_hand_cost(tiny, layer, 0) for layer in ("conv1", "conv2", "conv3"))
    assert 0.6 - biggest / macs_params(tiny, (1, 28, 28))[0] < coarse[-1].remaining <= 0.6


def test_latency_budget_and_cost(tiny, fmnist, monkeypatch):
    """With latency made exactly proportional to MACs (1 ms per million), a latency budget and
    a latency cost must choose what the MACs budget and cost choose."""
    from carprune import measure

    monkeypatch.setattr(measure, "latency_ms", lambda model, shape, batch_size=1, repeats=50,
                        warmup=5: macs_params(model, shape)[0] / 1e6)
    scoring = subset(fmnist.val, 200)
    by_macs, macs_steps = global_car_prune(tiny, scoring, target=0.6, progress=False)
    ms = 0.6 * macs_params(tiny, (1, 28, 28))[0] / 1e6
    by_latency, latency_steps = global_car_prune(tiny, scoring, target=ms,
                                                 budget=Budget("latency", cost="macs"),
                                                 progress=False)
    assert [(s.layer, s.removed) for s in latency_steps] == \
        [(s.layer, s.removed) for s in macs_steps]
    _, steps = global_car_prune(tiny, scoring, target=0.9,
                                budget=Budget(cost="latency", min_keep=0.0), progress=False)
    # measured once at the start: half of a layer removed, saving per unit (ms)
    expected = measure.latency_costs(Surgery(tiny, scoring.tensors[0][:1]),
                                     ["conv1", "conv2", "conv3"])
    assert steps[0].cost == pytest.approx(expected[steps[0].layer])
    with pytest.raises(cp.CarpruneError, match="below the network's measured"):
        global_car_prune(tiny, scoring, target=10 * ms, budget=Budget("latency"),
                         progress=False)


def test_residual_groups_go_whole(small_resnet, fmnist, tmp_path):
    result, steps = global_car_prune(small_resnet, subset(fmnist.val, 128), target=0.85,
                                     approx=Approximation(step=4), progress=False)
    m = result.model
    for stage in ("layer1", "layer2", "layer3"):
        blocks = getattr(m, stage)
        widths = {blk.conv2.out_channels for blk in blocks} | {blk.bn2.num_features
                                                               for blk in blocks}
        assert len(widths) == 1  # every block of the stage lost the same channels
    cp.save(m, tmp_path / "r")
    x = fmnist.test.tensors[0][:4]
    assert torch.equal(cp.load(tmp_path / "r")(x), m(x))


@pytest.fixture(scope="module")
def zoo_trained(fmnist):
    """name -> a briefly trained zoo network, trained once for the module."""
    trained = {}

    def get(name):
        if name not in trained:
            torch.manual_seed(0)
            trained[name] = quick_trained(name, fmnist, n=1000, width=8)
        return trained[name]
    return get


@pytest.mark.parametrize("name", ["mobilenet", "inception"])
@pytest.mark.parametrize("compensate", [False, True])
def test_depthwise_and_concat_networks_prune_and_run(name, compensate, zoo_trained, fmnist,
                                                     tmp_path):
    model = zoo_trained(name)
    result, steps = global_car_prune(model, subset(fmnist.val, 128), target=0.8,
                                     approx=Approximation(step=4),
                                     engine=EngineOptions(compensate=compensate), progress=False)
    assert macs_params(result.model, (1, 28, 28))[0] <= 0.8 * macs_params(model, (1, 28, 28))[0]
    cp.save(result.model, tmp_path / "m")
    x = fmnist.test.tensors[0][:4]
    assert torch.equal(cp.load(tmp_path / "m")(x), result.model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", [("tiny", {}), ("tiny", {"shortlist": 5, "step": 2}),
                                          ("mobilenet", {"shortlist": 12}),
                                          ("inception", {"shortlist": 12})])
def test_whole_global_runs_pick_what_the_naive_engine_picks(name, kwargs, tiny, zoo_trained,
                                                            fmnist):
    """Round after round, the fast engine's caches (kept across removals in other layers) and
    its shortlisted im2col must leave every pick as the naive engine's."""
    model = tiny if name == "tiny" else zoo_trained(name)
    runs = [global_car_prune(model, subset(fmnist.val, 64), target=0.4 if name == "tiny" else 0.85,
                             budget=Budget(min_keep=0.0), approx=Approximation(**kwargs),
                             engine=EngineOptions(engine), progress=False)[1]
            for engine in ("naive", "fast")]
    assert len(runs[0]) >= 3
    assert [(s.layer, s.removed) for s in runs[0]] == [(s.layer, s.removed) for s in runs[1]]


def test_car_importance_inside_torch_pruning(baseline, fmnist):
    scoring = subset(fmnist.val, 200)
    model = copy.deepcopy(baseline)
    surgery = Surgery(baseline, fmnist.val.tensors[0][:1])
    from carprune.criteria import importance
    ours = importance("car-oneshot", surgery, "conv3", cp.scoring.ScoringSet.from_any(scoring))
    keep = sorted(sorted(range(64), key=lambda i: (-float(ours[i]), i))[:48])
    importance_ = cp.CARImportance(scoring)
    pruner = tp.pruner.BasePruner(model, fmnist.val.tensors[0][:1], importance=importance_,
                                  pruning_ratio=0.25,
                                  ignored_layers=[model.conv1, model.conv2, model.fc2])
    pruner.step()
    assert model.conv3.out_channels == 48
    assert torch.equal(model.conv3.weight, baseline.conv3.weight[keep])


def tiny_factory() -> nn.Module:
    """A user's own model, for the --model test: imported by path from the CLI."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.slow
def test_factory_model_through_the_cli(tmp_path, fmnist, carprune_cli):
    torch.manual_seed(0)
    model = tiny_factory()
    cp.fit(model, subset(fmnist.train, 2000), 1, progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.st")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    base = ["prune", "--model", "tests.test_global:tiny_factory", "--score-samples", "200",
            "--finetune-epochs", "0"]
    proc = carprune_cli(*base, "--weights", tmp_path / "w.pt", "--layers", "0", "--out",
                        tmp_path / "p")
    assert proc.returncode == 2 and "--trust-pickle" in proc.stderr
    proc = carprune_cli(*base, "--weights", tmp_path / "w.st", "--target-macs", "0.7",
                        "--labels", "model", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["model"]["macs_after"] <= 0.7 * result["model"]["macs_before"]
    assert 0 < result["accuracy"]["val_agreement_pruned"] <= 1
    assert [s["layer"] for s in result["global"]["steps"]]
    assert (tmp_path / "run" / "filters_kept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = cp.load(tmp_path / "run")
    assert reloaded(fmnist.test.tensors[0][:2]).shape == (2, 10)


def test_first_order_estimate_is_the_derivative_of_each_images_loss(tiny, fmnist):
    """A unit's estimate is the sum over images of |d loss_n / d s| at s = 1, where s scales
    the unit's channel at its mask point: checked against central differences of the
    network's per-image losses, in double precision."""
    from carprune.scoring import ScoringSet
    from carprune.scoring.first_order import first_order
    from carprune.scoring.graph import trace
    from carprune.scoring.masked import mask_points

    scoring = ScoringSet.from_any(subset(fmnist.val, 64), 10)
    surgery = Surgery(tiny, scoring.example())
    estimate = first_order(surgery, ["conv2", "conv3"], scoring)
    x, y = scoring.batches[0]
    surgery.model.double()
    for layer, channel in (("conv2", 1), ("conv3", 4)):
        makers, points = mask_points(trace(surgery.model), surgery, layer)
        point = makers[points[0]]
        idxs = surgery.producing(layer, channel)[point]

        def losses(scale, point=point, idxs=idxs):
            def hook(module, inputs, output):
                output = output.clone()
                output[:, idxs] *= scale
                return output
            handle = surgery.modules[point].register_forward_hook(hook)
            with torch.no_grad():
                out = F.cross_entropy(surgery.model(x.double()), y, reduction="none")
            handle.remove()
            return out

        eps = 1e-5
        numeric = ((losses(1 + eps) - losses(1 - eps)) / (2 * eps)).abs().sum()
        assert len(points) == 1
        assert estimate[Unit(layer, channel)] == pytest.approx(float(numeric), rel=1e-3)


def test_shortlist_scores_only_the_shortlist_from_the_first_round(tiny, fmnist, monkeypatch,
                                                                    capsys):
    scoring = subset(fmnist.val, 200)
    calls = candidates_scored(monkeypatch)
    result, steps = global_car_prune(tiny, scoring, target=0.6, budget=Budget(min_keep=0.0),
                                     approx=Approximation(step=2, shortlist=5))
    # the estimate first: 1, then 2, then 10 candidates (or all) of each layer of 4, 6, 6
    timed = 9
    assert calls[:timed] == [1, 2, 4, 1, 2, 6, 1, 2, 6]
    assert calls[timed:-1] and set(calls[timed:-1]) == {5} and calls[-1] == 0
    assert all(len(s.removed) <= 2 for s in steps) and steps[-1].remaining <= 0.6
    out = capsys.readouterr().out
    assert "one exact scoring round takes about" in out and "--shortlist 5, --step 2" in out
    assert "round 1: scored 5 units in" in out


def test_race_scores_the_shortlist_on_its_images_and_only_the_finalists_on_all(
        tiny, fmnist, monkeypatch):
    """Round 1 by hand: the shortlist of 5 by the estimate on the first 50 images, its best 2
    by their own CAR on those 50, and of these the one that loses least on all 200 goes."""
    from carprune.scoring import ScoringSet
    from carprune.scoring.first_order import first_order

    scoring = subset(fmnist.val, 200)
    x, y = scoring.tensors
    calls = candidates_scored(monkeypatch)
    _, steps = global_car_prune(tiny, scoring, target=0.7, budget=Budget(min_keep=0.0),
                                approx=Approximation(shortlist=5, race=50), progress=False)
    monkeypatch.undo()
    assert calls[:4] == [5, 2, 5, 2]

    def key(u, scores):
        lost, worse = scores[u]
        cost = by_hand_cost(tiny, *u)
        return by_hand_efficiency(lost, cost), by_hand_efficiency(worse, cost), int(u[0][-1]), u[1]
    surgery = Surgery(tiny, x[:1])
    estimate = first_order(surgery, ["conv1", "conv2", "conv3"],
                           ScoringSet.from_any(subset(fmnist.val, 50), 10))
    listed = sorted(((u.layer, u.channel) for u in estimate), key=lambda u: (
        estimate[Unit(*u)] / by_hand_cost(tiny, *u), int(u[0][-1]), u[1]))[:5]
    gone = {"conv1": [], "conv2": [], "conv3": []}
    few = unit_scores(tiny, x[:50], y[:50], gone)
    finalists = sorted(listed, key=lambda u: key(u, few))[:2]
    best = min(finalists, key=lambda u: key(u, unit_scores(tiny, x, y, gone)))
    assert (steps[0].layer, steps[0].removed) == (best[0], [best[1]])


@pytest.mark.parametrize("kwargs, message", [
    ({"race": 50}, "give --shortlist M with it"),
    ({"race": 0, "shortlist": 5}, "at least 1"),
    ({"race": 200, "shortlist": 5}, "must be fewer than the 200 scoring images")])
def test_race_refuses_what_cannot_race(tiny, fmnist, kwargs, message):
    with pytest.raises(cp.CarpruneError, match=message):
        global_car_prune(tiny, subset(fmnist.val, 200), target=0.7, progress=False,
                         approx=Approximation(**kwargs))


def test_the_run_estimate_is_arithmetic_on_the_timed_costs():
    from carprune import estimate

    costs = {"a": (1.0, 0.5), "b": (0.0, 2.0)}  # (fixed seconds a call, seconds a candidate)
    sizes = {"a": 10, "b": 5}
    assert estimate.round_seconds(costs, sizes) == 1 + 5 + 10
    mean = 16 / 15
    # exact: 3 rounds of one removal each, over 15, 14 and 13 units (15 - 3/2 on average)
    assert estimate.run_seconds(costs, sizes, 3, 1, None, None, 0.0) == (3, 3 * 13.5 * mean)
    assert estimate.run_seconds(costs, sizes, 6, 4, 2, None, 0.0) == (2, 15 * mean + 2 * mean)
    assert estimate.run_seconds(costs, sizes, 6, 4, None, 8, 3.0) == (2, 2 * (3 + 8 * mean))
    # raced on a quarter of the images: 8 candidates there, then 2 x 2 finalists on all
    assert estimate.run_seconds(costs, sizes, 6, 2, None, 8, 3.0, 0.25) == \
        pytest.approx((3, 3 * (3 + (8 * 0.25 + 4) * mean)))
    assert estimate.say(42) == "42 s" and estimate.say(450) == "7.5 min"
