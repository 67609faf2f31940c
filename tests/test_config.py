"""One configuration object per command: the parser is derived from it, and a bad value gets the
same CarpruneError from Python as from the command line."""

import dataclasses
import json

import pytest
import torch

from carprune import Approximation, Budget, CarpruneError, EngineOptions, PruneConfig
from carprune.cli import build_parser, main
from carprune.commands import COMMANDS
from carprune.config import CompareConfig, ExplainConfig, TrainConfig, flag
from carprune.resume import STATE_DIR

OUT = {"out": "unused", "checkpoint": "convnet-fmnist"}

BAD = [  # (PruneConfig keywords, the same options on the command line, words of the sentence)
    ({"layers": ["conv1"], "keep": 0.0}, ["--layers", "conv1", "--keep", "0"], "fraction"),
    ({"layers": ["conv1"], "keep": 2.5}, ["--layers", "conv1", "--keep", "2.5"],
     "neither a fraction below 1 nor a whole count"),
    ({"layers": ["conv1"], "score_samples": 0}, ["--layers", "conv1", "--score-samples", "0"],
     "--score-samples must be positive"),
    ({"layers": ["conv1"], "step": 4, "screen": 2},
     ["--layers", "conv1", "--step", "4", "--screen", "2"], "--screen must be at least"),
    ({"layers": ["conv1"], "step": 0}, ["--layers", "conv1", "--step", "0"],
     "step must be at least 1"),
    ({"target_macs": 0.5, "target_params": 0.5}, ["--target-macs", "0.5", "--target-params",
                                                  "0.5"], "give one budget"),
    ({"target_macs": 1.5}, ["--target-macs", "1.5"], "--target-macs must be a fraction"),
    ({"layers": ["conv1"], "round_to": 8}, ["--layers", "conv1", "--round-to", "8"],
     "--round-to applies to global runs"),
    ({"target_macs": 0.5, "round_to": 0}, ["--target-macs", "0.5", "--round-to", "0"],
     "--round-to must be a whole number"),
    ({"target_macs": 0.5, "min_keep": 1.0}, ["--target-macs", "0.5", "--min-keep", "1"],
     "--min-keep must be a fraction in [0, 1)"),
    ({"layers": ["conv1"], "criterion": "l2", "compensate": True},
     ["--layers", "conv1", "--criterion", "l2", "--compensate"], "does not apply to"),
    ({}, [], "name the layers to prune with --layers"),
    ({"layers": ["conv1"], "shortlist": 8}, ["--layers", "conv1", "--shortlist", "8"],
     "--shortlist and --race apply to global runs"),
    ({"target_macs": 0.5, "shortlist": 8, "screen": 8},
     ["--target-macs", "0.5", "--shortlist", "8", "--screen", "8"], "give --shortlist or"),
    ({"target_macs": 0.5, "shortlist": 2, "step": 4},
     ["--target-macs", "0.5", "--shortlist", "2", "--step", "4"],
     "--shortlist must be at least --step"),
    ({"layers": ["conv1"], "race": 64}, ["--layers", "conv1", "--race", "64"],
     "--shortlist and --race apply to global runs"),
    ({"target_macs": 0.5, "race": 64}, ["--target-macs", "0.5", "--race", "64"],
     "give --shortlist M with it"),
    ({"target_macs": 0.5, "shortlist": 8, "race": 0},
     ["--target-macs", "0.5", "--shortlist", "8", "--race", "0"], "--race must be positive"),
    ({"layers": ["conv1"], "finetune_epochs": -1}, ["--layers", "conv1", "--finetune-epochs",
                                                    "-1"], "--finetune-epochs must be 0 or more"),
    ({"layers": ["conv1"], "memory_budget": 0.0}, ["--layers", "conv1", "--memory-budget", "0"],
     "--memory-budget must be positive"),
    ({"layers": ["conv1"], "blocks": 0.25}, ["--layers", "conv1", "--blocks", "0.25"],
     "--blocks applies to global runs"),
    ({"target_macs": 0.5, "blocks": 1.5}, ["--target-macs", "0.5", "--blocks", "1.5"],
     "--blocks must be a fraction in (0, 1)"),
    ({"target_macs": 0.5, "blocks": 0.25, "screen": 4},
     ["--target-macs", "0.5", "--blocks", "0.25", "--screen", "4"], "drop --screen"),
    ({"target_macs": 0.5, "blocks": 0.25, "round_to": 8},
     ["--target-macs", "0.5", "--blocks", "0.25", "--round-to", "8"],
     "--round-to keeps every layer a multiple"),
    ({"layers": ["conv1"], "ridge": 1e-2}, ["--layers", "conv1", "--ridge", "1e-2"],
     "give it with --compensate"),
    ({"layers": ["conv1"], "compensate": True, "ridge": -1.0},
     ["--layers", "conv1", "--compensate", "--ridge", "-1"], "--ridge must be positive"),
]


@pytest.mark.parametrize("kwargs, argv, words", BAD)
def test_python_and_cli_get_the_same_sentence(kwargs, argv, words, tmp_path, capsys):
    with pytest.raises(CarpruneError, match=None) as python:
        PruneConfig(**{**OUT, **kwargs})
    assert words in str(python.value)
    with pytest.raises(SystemExit) as cli:
        main(["prune", "convnet-fmnist", "--out", str(tmp_path / "run"), *argv])
    assert cli.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"carprune: error: {python.value}"
    assert not (tmp_path / "run").exists()


def test_choices_are_checked_in_python_too():
    with pytest.raises(CarpruneError, match="--labels takes data, model, got 'foo'"):
        PruneConfig(out="x", layers=["conv1"], labels="foo")
    with pytest.raises(CarpruneError, match="--criterion takes car, l1"):
        PruneConfig(out="x", layers=["conv1"], criterion="car-oneshot")
    PruneConfig(out="x", layers=["conv1"])  # a model given in Python needs no checkpoint


def test_a_good_config_keeps_what_it_was_given():
    config = PruneConfig(checkpoint="convnet-fmnist", out="x", target_params=0.4, round_to=8)
    assert config.budget == ("params", 0.4)
    assert config.budget_settings() == Budget("params", "params", 0.1, 8, ())
    blocks = PruneConfig(out="x", target_macs=0.5, blocks=0.25, step=2, compensate=True,
                         ridge=1e-2, memory_budget=0.5)
    assert blocks.approximation() == Approximation(step=2, blocks=0.25)
    assert blocks.engine_options() == EngineOptions("fast", 2**29, True, 1e-2)
    assert PruneConfig(checkpoint="c", out="x", layers=["conv1"]).budget == ("macs", None)
    assert json.loads(json.dumps(config.to_json()))["round_to"] == 8


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_parser_is_the_config(name):
    """Every field is one option of its command, with the field's default and help."""
    config = COMMANDS[name][0]
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    actions = {a.dest: a for a in sub._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in dataclasses.fields(config)}
    for f in dataclasses.fields(config):
        action = actions[f.name]
        assert action.help == f.metadata["help"]
        if not f.metadata["cli"].get("positional"):
            assert action.option_strings == [flag(f.name)]
        if f.default is not dataclasses.MISSING:
            assert sub.get_default(f.name) == f.default


def test_parsed_defaults_equal_the_dataclass_defaults():
    args = build_parser().parse_args(["compare", "convnet-fmnist", "--layers", "conv1",
                                      "--out", "x"])
    from carprune.cli import to_config

    assert to_config(args) == CompareConfig(checkpoint="convnet-fmnist", layers=["conv1"],
                                            out="x")


def test_other_commands_check_in_python_too():
    with pytest.raises(CarpruneError, match="unknown criterion 'l3'"):
        CompareConfig(checkpoint="c", layers=["conv1"], out="x", criteria=["car", "l3"])
    with pytest.raises(CarpruneError, match=r"--keep-grid takes fractions in \(0, 1\]"):
        CompareConfig(checkpoint="c", layers=["conv1"], out="x", keep_grid=[1.5])
    with pytest.raises(CarpruneError, match="--workers must be 0 or more"):
        ExplainConfig(checkpoint="c", layers=["conv1"], out="x", workers=-1)
    with pytest.raises(CarpruneError, match="--out is required"):
        TrainConfig()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_sentence(tmp_path, capsys):
    with pytest.raises(CarpruneError, match="--device cuda: no CUDA GPU is visible here"):
        ExplainConfig(checkpoint="c", layers=["conv1"], out="x", device="cuda")
    for device in ("cuda", "cuda:1", "tpu", "gpu0"):
        with pytest.raises(SystemExit) as cli:
            main(["prune", "convnet-fmnist", "--layers", "conv1", "--device", device,
                  "--out", str(tmp_path / "run")])
        assert cli.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--device {device}" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_run_started_before_the_configuration_object_is_refused_with_restart(tmp_path,
                                                                                capsys):
    """state.json as the last release wrote it (its own config keys): one sentence, --restart."""
    old = {"checkpoint": "convnet-fmnist", "weights": None, "data": "fashion-mnist",
           "val_images": 5000, "layers": ["conv1"], "keep": 0.5, "step": 1, "screen": None,
           "score_samples": 100, "engine": "fast", "criterion": "car", "finetune_epochs": 0,
           "finetune_lr": 0.01, "train_samples": 55000, "seed": 0, "target": None,
           "budget": "macs", "cost": None, "min_keep": 0.1, "ignore": [], "round_to": 1,
           "compensate": False, "labels": "data"}
    run = tmp_path / "run"
    (run / STATE_DIR).mkdir(parents=True)
    (run / STATE_DIR / "state.json").write_text(json.dumps({"config": old, "layers": {}}))
    with pytest.raises(SystemExit) as cli:
        main(["prune", "convnet-fmnist", "--layers", "conv1", "--score-samples", "100",
              "--finetune-epochs", "0", "--out", str(run)])
    assert cli.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different configuration" in err[0] and "--restart" in err[0]
