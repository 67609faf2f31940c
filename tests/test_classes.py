"""Specialisation to a class subset (`--classes`, `classes=`): CAR of a subset run equals the
naive engine on a network whose classifier rows were picked by hand, over the subset's images
relabelled by hand; the specialised checkpoint reloads and evaluates on the subset; and each
bad input is one sentence, exit status 2, nothing written.

The factories below are imported by the CLI as `tests.test_classes:NAME`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch_pruning as tp
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune.cli import main
from carprune.scoring import NaiveEngine, ScoringSet
from carprune.scoring.rule import rank

from .conftest import subset
from .test_doors import _restore_cli_globals, conv_net, refused  # noqa: F401 - a fixture

ME = "tests.test_classes"
HARD = ["t-shirt/top", "Pullover", "COAT", "shirt"]  # names in any case
HARD_INDICES = [0, 2, 4, 6]
HARD_NAMES = ["T-shirt/top", "Pullover", "Coat", "Shirt"]


def by_hand(model: nn.Module, rows: list[int]) -> nn.Module:
    """The convnet with a new classifier holding copies of the rows `rows` of its own."""
    net = copy.deepcopy(model)
    head = nn.Linear(model.fc2.in_features, len(rows))
    with torch.no_grad():
        head.weight.copy_(model.fc2.weight[rows])
        head.bias.copy_(model.fc2.bias[rows])
    net.fc2 = head
    return net.eval()


def relabelled_by_hand(data: TensorDataset, rows: list[int]) -> TensorDataset:
    """The images whose label is in `rows`, labelled by their place in `rows`."""
    x, y = data.tensors
    keep = [i for i, label in enumerate(y.tolist()) if label in rows]
    return TensorDataset(x[keep], torch.tensor([rows.index(int(y[i])) for i in keep]))


def naive_car(surgery: cp.Surgery, layer: str, originals: list[int], scoring: ScoringSet):
    """(base, scores, CAR indices) of the units `originals` by the naive engine."""
    units = [cp.Unit(layer, surgery.alive[layer].index(o)) for o in originals]
    base, scores = NaiveEngine().score(surgery, units, scoring)
    return base, scores, (float(base.accuracy()[0]) - scores.accuracy()).tolist()


def test_per_layer_car_of_a_subset_is_the_naive_engine_on_the_hand_trimmed_network(baseline,
                                                                                   fmnist):
    data = subset(fmnist.val, 300)
    result = cp.car_prune(baseline, data, ["conv2"], keep=61, classes=HARD, progress=False)
    hand = by_hand(baseline, HARD_INDICES)
    scoring = ScoringSet.from_any(relabelled_by_hand(data, HARD_INDICES), 4)
    surgery = cp.Surgery(hand, scoring.example())
    steps = result.layers["conv2"].steps
    assert len(steps) == 3
    for step in steps:
        base, scores, car = naive_car(surgery, "conv2", step.candidates, scoring)
        assert step.car == pytest.approx(car, abs=1e-12)
        assert step.removed == [step.candidates[rank(base, scores, step.candidates)[0]]]
        surgery.remove("conv2", [surgery.alive["conv2"].index(o) for o in step.removed])
    assert any(c != 0 for step in steps for c in step.car)  # the subset's accuracy moves
    unpruned = NaiveEngine().score(cp.Surgery(hand, scoring.example()), [], scoring)[0]
    assert result.val_before == float(unpruned.accuracy()[0])
    assert result.model.fc2.out_features == 4
    assert result.model.carprune_spec["classes"] == HARD_NAMES
    assert result.model.carprune_spec["class_indices"] == HARD_INDICES
    x = scoring.batches[0][0]
    with torch.inference_mode():
        torch.testing.assert_close(result.model(x), surgery.model(x), rtol=1e-5, atol=1e-5)


def test_global_car_of_a_subset_is_global_car_of_the_hand_trimmed_network(baseline, fmnist):
    data = subset(fmnist.val, 200)
    settings = {"layers": ["conv1", "conv2"], "approx": cp.Approximation(step=2),
                "progress": False}
    result, steps = cp.global_car_prune(baseline, data, 0.93, classes=HARD_INDICES, **settings)
    hand = by_hand(baseline, HARD_INDICES)
    images = relabelled_by_hand(data, HARD_INDICES)
    want, want_steps = cp.global_car_prune(hand, images, 0.93, **settings)
    assert steps == want_steps and len(steps) >= 2
    scoring = ScoringSet.from_any(images, 4)
    surgery = cp.Surgery(hand, scoring.example())
    first = steps[0]  # its CAR: the images its units lose on the unpruned trimmed network
    base, scores, _ = naive_car(surgery, first.layer, first.removed, scoring)
    lost = int(base.correct[0]) * len(first.removed) - int(scores.correct.sum())
    assert first.car == pytest.approx(lost / scoring.total, abs=1e-12)
    with torch.inference_mode():
        x = scoring.batches[0][0]
        assert torch.equal(result.model(x), want.model(x))


def test_car_importance_of_a_subset_on_the_untrimmed_network_equals_the_trimmed_one(baseline,
                                                                                     fmnist):
    data = subset(fmnist.val, 300)
    model = copy.deepcopy(baseline)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    example = data.tensors[0][:1]

    def conv2_group(net):
        dg = tp.DependencyGraph().build_dependency(net, example)
        return dg.get_pruning_group(net.conv2, tp.prune_conv_out_channels, list(range(64)))

    got = cp.CARImportance(data, classes=HARD)(conv2_group(model))
    want = cp.CARImportance(relabelled_by_hand(data, HARD_INDICES))(
        conv2_group(by_hand(baseline, HARD_INDICES)))
    assert torch.equal(got, want)
    first = cp.car_prune(baseline, data, ["conv2"], keep=63, classes=HARD, progress=False)
    total = len(relabelled_by_hand(data, HARD_INDICES))
    lost = [round(c * total) for c in first.layers["conv2"].steps[0].car]
    assert got.floor().long().tolist() == lost  # importance: images lost, then the rule's place
    assert model.fc2.out_features == 10  # the network keeps its head
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_specialised_checkpoint_reloads_and_evaluate_reads_the_subset(tmp_path, baseline,
                                                                        fmnist, capsys):
    result = cp.car_prune(baseline, subset(fmnist.val, 300), ["conv1"], keep=31, classes=HARD,
                          progress=False)
    cp.save(result.model, tmp_path / "ck")
    loaded = cp.load(tmp_path / "ck")  # never unpickles: load refuses pickles
    x = fmnist.test.tensors[0][:64]
    with torch.inference_mode():
        assert torch.equal(loaded(x), result.model(x))
    spec = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert spec["classes"] == HARD_NAMES and spec["class_indices"] == HARD_INDICES
    assert loaded.carprune_spec["classes"] == HARD_NAMES
    main(["evaluate", str(tmp_path / "ck"), "--json", str(tmp_path / "e.json")])
    printed = capsys.readouterr().out
    test = relabelled_by_hand(fmnist.test, HARD_INDICES)
    want = cp.evaluate(result.model, test)
    assert f"test accuracy: {want.accuracy:.4f} ({want.correct}/{want.total})" in printed
    assert want.total == 4000
    figures = json.loads((tmp_path / "e.json").read_text())
    assert list(figures["per_class"]) == HARD_NAMES
    assert figures["per_class"]["Coat"] == pytest.approx(want.per_class[2], abs=1e-12)


def test_the_onnx_export_names_the_kept_classes(tmp_path, baseline):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from carprune.compress import export_onnx

    model = cp.specialise(baseline, ["bag", "trouser"], torch.zeros(1, 1, 28, 28))
    export_onnx(model, tmp_path / "m.onnx", [1, 28, 28])
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == ["Trouser", "Bag"]  # the network's order
    assert json.loads(meta["class_indices"]) == [1, 8]


def test_a_specialised_run_explained_names_the_dropped_classes_its_removals_served(tmp_path,
                                                                                   capsys):
    run, ex = tmp_path / "run", tmp_path / "explain"
    main(["prune", "convnet-fmnist", "--classes", "trouser", "sneaker", "bag", "--layers",
          "conv1", "--keep", "28", "--score-samples", "200", "--finetune-epochs", "0",
          "--out", str(run)])
    printed = capsys.readouterr().out
    summary = json.loads((run / "result.json").read_text())
    kept = summary["classes"]
    assert kept["kept"] == ["Trouser", "Sneaker", "Bag"] and kept["indices"] == [1, 7, 8]
    assert kept["units_removed"] == 4 and kept["test_before"] == summary["accuracy"][
        "test_before"]
    assert "specialised to 3 of 10 classes (Trouser, Sneaker, Bag)" in printed
    main(["explain", "convnet-fmnist", "--layers", "conv1", "--prune-run", str(run),
          "--score-samples", "200", "--top-k", "1", "--out", str(ex)])
    info = json.loads((ex / "explain.json").read_text())
    rows = json.loads((ex / "class_importance_conv1.json").read_text())["filters"]
    names = info["classes"]
    dropped = [c for c in range(10) if c not in (1, 7, 8)]
    said = info["layers"]["conv1"]["specialisation"]
    assert info["kept_classes"] == ["Trouser", "Sneaker", "Bag"]
    removed = summary["layers"]["conv1"]["removed"]
    assert [r["filter"] for r in said["filters"]] == removed
    for r in said["filters"]:
        row = rows[r["filter"]]["row"]
        top = sorted(dropped, key=lambda c: (-row[c], c))[:3]
        assert [d["class"] for d in r["dropped_most"]] == [names[c] for c in top]
        assert r["dropped_mean"] == pytest.approx(sum(row[c] for c in dropped) / 7)
        assert r["kept_mean"] == pytest.approx(sum(row[c] for c in (1, 7, 8)) / 3)
    assert "why the removed filters of conv1 could go" in (ex / "report.html").read_text()


def without_bags():
    """Fashion-MNIST images whose scoring split holds no bag (class 8)."""
    data = cp.data.fashion_mnist()
    val = subset(data.val, 300)
    keep = val.tensors[1] != 8
    return subset(data.train, 200), TensorDataset(*[t[keep] for t in val.tensors]), \
        subset(data.test, 200)


def softmax_net() -> nn.Module:
    """A network that ends in a softmax: its last linear layer's outputs are not its own."""
    return nn.Sequential(*conv_net(4), nn.Softmax(dim=1))


def tiny() -> nn.Module:
    return conv_net(4)


def argv(tmp_path, *extra: str, model=("convnet-fmnist",), layers=("conv1",),
         keep="30") -> list[str]:
    return ["prune", *model, "--layers", *layers, "--keep", keep, "--score-samples", "100",
            "--finetune-epochs", "0", *extra, "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("classes,says", [
    (["trouser", "boots"], "unknown class 'boots'; the network's classes are: T-shirt/top, "
                           "Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle "
                           "boot (or their indices)"),
    (["trouser"], "a specialised network needs at least two classes, got 1; name two or more"),
    (["bag", "Bag"], "class 'Bag' is given twice; name each class once"),
    (["3", "10"], "class index 10 is out of range: the network has 10 outputs, 0 to 9; "),
])
def test_bad_classes_are_one_sentence_and_nothing_written(classes, says, tmp_path, capsys):
    line = refused(capsys, argv(tmp_path, "--classes", *classes))
    assert says in line
    assert not (tmp_path / "run").exists()


def test_a_class_without_scoring_images_is_refused(tmp_path, capsys):
    line = refused(capsys, argv(tmp_path, "--classes", "7", "8", "--data",
                                f"{ME}:without_bags"))
    assert line == ("carprune: error: class 'Bag' has no image in the scoring set; give more "
                    "images (--score-samples) or leave the class out")
    assert not (tmp_path / "run").exists()


def test_a_network_whose_classifier_cannot_be_trimmed_is_refused(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    save_file(softmax_net().state_dict(), weights)
    line = refused(capsys, argv(tmp_path, "--classes", "1", "2", "--weights", str(weights),
                                model=("--model", f"{ME}:softmax_net"), layers=("0",),
                                keep="2"))
    assert line.startswith("carprune: error: cannot find or trim this network's classifier: "
                           "no conv or linear layer with its 10 outputs gives its logits alone")
    assert not (tmp_path / "run").exists()


def test_prune_opens_one_door(tmp_path, capsys):
    line = refused(capsys, argv(tmp_path, model=("convnet-fmnist", "--model", f"{ME}:tiny")))
    assert "give a checkpoint (convnet-fmnist) or --model" in line
    line = refused(capsys, argv(tmp_path, "--weights", "w.safetensors"))
    assert "--weights goes with --model" in line
    assert not (tmp_path / "run").exists()


def interrupted(monkeypatch, capsys, command: list[str]) -> None:
    """Run `command` until its CAR is done, then stop it as Ctrl-C would."""
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("carprune.commands.prune.fit", stop)
        with pytest.raises(SystemExit) as exit_info:
            main(command)
    assert exit_info.value.code == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_the_classes_and_the_weights_file_are_part_of_a_runs_identity(tmp_path, monkeypatch,
                                                                       capsys):
    interrupted(monkeypatch, capsys, argv(tmp_path, "--classes", "trouser", "bag"))
    line = refused(capsys, argv(tmp_path, "--classes", "trouser", "sneaker"))
    assert "holds an unfinished run with a different configuration (class_subset, classes " \
           "differ)" in line
    weights, out = tmp_path / "w.safetensors", tmp_path / "factory"
    torch.manual_seed(0)
    save_file(tiny().state_dict(), weights)
    command = argv(out, "--weights", str(weights), model=("--model", f"{ME}:tiny"),
                   layers=("0",), keep="2")
    interrupted(monkeypatch, capsys, command)
    save_file(tiny().state_dict(), weights)  # other values, the same path
    assert "(weights differ)" in refused(capsys, command)


def test_distill_fine_tunes_towards_the_unpruned_specialised_network(tmp_path, monkeypatch,
                                                                     fmnist):
    """--distill hands fine-tuning the unpruned network with the run's classes as teacher:
    its outputs are those of the shipped network specialised by hand; without it, none."""
    seen = []
    monkeypatch.setattr("carprune.commands.prune.fit",
                        lambda model, train, epochs, recipe, **kwargs:
                        seen.append(recipe.teacher) or [])
    main(argv(tmp_path, "--classes", "trouser", "bag", "--distill"))
    main(argv(tmp_path, "--classes", "trouser", "bag", "--restart"))
    x = fmnist.test.tensors[0][:16]
    with torch.no_grad():
        want = by_hand(cp.load("convnet-fmnist"), [1, 8])(x)
        torch.testing.assert_close(seen[0](x), want)
    assert seen[1] is None
