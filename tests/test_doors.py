"""The model doors a new user meets (`--model pkg.mod:f`, `--weights`, `evaluate --model`),
through `carprune.cli.main` in this process: a bad door is one sentence, exit status 2, no
traceback and nothing written; a good one measures the same network a checkpoint holds.

The factories below are imported by the CLI as `tests.test_doors:NAME`."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import carprune as cp
from carprune import io
from carprune.cli import main

from .conftest import subset

ME = "tests.test_doors"


def conv_net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, 10))


def tiny() -> nn.Module:
    return conv_net(4)


def wider() -> nn.Module:
    """tiny's layers with other widths: the same state-dict keys, other shapes."""
    return conv_net(6)


def other() -> nn.Module:
    return nn.Sequential(OrderedDict(flat=nn.Flatten(), fc=nn.Linear(784, 10)))


def double() -> nn.Module:
    return tiny().double()


def returns_int() -> int:
    return 3


def broken() -> nn.Module:
    raise ValueError("width must be even")


@pytest.fixture(autouse=True)
def _restore_cli_globals(monkeypatch):
    """`main` sets deterministic algorithms and the warning format for the whole process."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2 with one line on stderr and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("carprune: error: "), err
    assert "Traceback" not in err
    return lines[0]


def prune_argv(tmp_path, *model: str) -> list[str]:
    return ["prune", *model, "--layers", "0", "--keep", "2", "--finetune-epochs", "0",
            "--out", str(tmp_path / "run")]


def weights_of(factory, path) -> str:
    save_file(factory().state_dict(), path)
    return str(path)


def test_a_factory_that_returns_no_network(tmp_path, capsys):
    line = refused(capsys, prune_argv(tmp_path, "--model", f"{ME}:returns_int"))
    assert line == (f"carprune: error: the factory {ME}:returns_int returned int 3, not a "
                    "network; a model factory must return a torch.nn.Module")
    assert not (tmp_path / "run").exists()


def test_a_float64_network_is_refused_before_anything_runs(tmp_path, capsys, fmnist):
    line = refused(capsys, prune_argv(tmp_path, "--model", f"{ME}:double"))
    assert line == ("carprune: error: the network's weights are torch.float64, and carprune "
                    "prunes float32 networks; convert it with model.float() first (and back "
                    "after pruning if you need to)")
    assert not (tmp_path / "run").exists()
    with pytest.raises(cp.CarpruneError, match="model.float"):
        cp.car_prune(double(), subset(fmnist.val, 64), ["0"], keep=0.5, progress=False)


def test_a_factory_that_raises_names_itself_and_keeps_its_traceback_for_debug(tmp_path,
                                                                               capsys):
    argv = prune_argv(tmp_path, "--model", f"{ME}:broken")
    line = refused(capsys, argv)
    assert line.startswith(f"carprune: error: the factory {ME}:broken failed (ValueError: width "
                           "must be even); ")
    assert "carprune --debug" in line
    with pytest.raises(SystemExit) as exit_info:
        main(["--debug", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert 'raise ValueError("width must be even")' in err  # the user's own line
    assert err.strip().splitlines()[-1] == line
    assert not (tmp_path / "run").exists()


def test_a_factory_module_that_fails_to_import(tmp_path, capsys, monkeypatch):
    (tmp_path / "half_written.py").write_text("raise RuntimeError('not finished')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = refused(capsys, prune_argv(tmp_path, "--model", "half_written:net"))
    assert "importing 'half_written' for model 'half_written:net' failed (RuntimeError: not " \
           "finished)" in line
    assert not (tmp_path / "run").exists()


def test_a_timm_name_that_fails_to_build(tmp_path, capsys):
    """A checkpoint whose model.json asks timm for an argument its network does not take."""
    model = tiny()
    model.carprune_spec = {"arch": {"name": "timm:resnet18", "kwargs": {"no_such_arg": 1}},
                           "input_shape": [1, 28, 28]}
    io.save(model, tmp_path / "ck")
    line = refused(capsys, ["evaluate", str(tmp_path / "ck"), "--json",
                            str(tmp_path / "e.json")])
    assert line.startswith("carprune: error: timm could not build 'resnet18' (TypeError: ")
    assert "no_such_arg" in line
    assert not (tmp_path / "e.json").exists()


def test_weights_that_do_not_fit_the_factorys_network(tmp_path, capsys):
    keys = weights_of(other, tmp_path / "other.safetensors")
    line = refused(capsys, prune_argv(tmp_path, "--model", f"{ME}:tiny", "--weights", keys))
    assert line.startswith(f"carprune: error: {keys} does not fit the network {ME}:tiny "
                           "builds (missing ['0.bias', '0.weight', '1.bias'], unexpected "
                           "['fc.bias', 'fc.weight']); ")
    assert "model.json" not in line
    shapes = weights_of(wider, tmp_path / "wider.safetensors")
    line = refused(capsys, ["evaluate", "--model", f"{ME}:tiny", "--weights", shapes,
                            "--json", str(tmp_path / "e.json")])
    assert line.startswith(f"carprune: error: {shapes}: 0.weight has shape (6, 1, 3, 3) but "
                           f"the network {ME}:tiny builds needs (4, 1, 3, 3); ")  # its first
    assert "model.json" not in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "e.json").exists()


def test_a_checkpoint_whose_weights_do_not_fit_still_names_model_json(tmp_path, capsys):
    model = wider()  # saved under tiny's name: the checksums agree, the shapes do not
    model.carprune_spec = {"arch": {"name": f"{ME}:tiny", "kwargs": {}},
                           "input_shape": [1, 28, 28]}
    io.save(model, tmp_path / "ck")
    line = refused(capsys, ["evaluate", str(tmp_path / "ck")])
    assert "0.weight has shape (6, 1, 3, 3) but the model in model.json needs (4, 1, 3, 3); " \
           "pair the weights with the model.json they were saved with" in line


@pytest.mark.parametrize("argv,says", [
    (["evaluate"], "give a checkpoint directory, or --model"),
    (["evaluate", "convnet-fmnist", "--model", f"{ME}:tiny"],
     f"give a checkpoint (convnet-fmnist) or --model ({ME}:tiny), not both"),
    (["evaluate", "convnet-fmnist", "--weights", "w.safetensors"], "--weights goes with --model"),
])
def test_evaluate_needs_one_door(argv, says, capsys):
    assert says in refused(capsys, argv)


def test_evaluate_through_the_factory_door_equals_the_checkpoint(tmp_path, capsys, fmnist):
    """The same weights, once as --model + --weights and once as a saved checkpoint, give the
    accuracy `cp.evaluate` computes on the module itself."""
    torch.manual_seed(0)
    model = tiny()
    cp.fit(model, subset(fmnist.train, 2000), 1, cp.Recipe(lr=0.05), progress=False)
    model.eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    want = cp.evaluate(model, fmnist.test)
    assert 0.2 < want.accuracy < 1  # trained a little: a figure no constant guess gives

    main(["evaluate", "--model", f"{ME}:tiny", "--weights", str(weights),
          "--json", str(tmp_path / "door.json")])
    by_door = capsys.readouterr().out
    model.carprune_spec = {"arch": {"name": f"{ME}:tiny", "kwargs": {}},
                           "input_shape": [1, 28, 28]}
    io.save(model, tmp_path / "ck")
    main(["evaluate", str(tmp_path / "ck"), "--json", str(tmp_path / "ck.json")])
    by_checkpoint = capsys.readouterr().out

    line = f"test accuracy: {want.accuracy:.4f} ({want.correct}/{want.total})"
    assert line in by_door.splitlines() and line in by_checkpoint.splitlines()
    assert by_door == by_checkpoint  # per class too
    door, ck = (json.loads((tmp_path / n).read_text()) for n in ("door.json", "ck.json"))
    assert door["accuracy"] == ck["accuracy"] == pytest.approx(want.accuracy, abs=1e-12)
    assert door["checkpoint"] == f"{ME}:tiny" and ck["checkpoint"] == str(tmp_path / "ck")
