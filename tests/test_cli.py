import json
import subprocess
import sys

import pytest
import torch

import carprune as cp
from carprune.measure import macs_params


def run(*args):
    return subprocess.run([sys.executable, "-m", "carprune", *args], capture_output=True,
                          text=True, timeout=900)


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("train", "evaluate", "prune"):
        assert command in out


@pytest.mark.parametrize("args, words", [
    (["--layers", "conv9"], "no layer 'conv9'"),
    (["--layers", "bn1"], "not a prunable conv"),
    (["--layers", "conv1", "--keep", "0"], "fraction"),
    (["--layers", "conv1", "--keep", "32"], "not below the 32 filters"),
    (["--layers", "conv1", "--keep", "0.001"], "leaves no filter"),
    (["--layers", "conv1", "conv1"], "listed twice"),
    (["--layers", "conv1", "--score-samples", "0"], "must be positive"),
    (["--layers", "conv1", "--data", "mnist", "--data-dir", "/nonexistent"], "does not exist"),
])
def test_prune_bad_input_exit_2_and_no_output(tmp_path, args, words):
    out = tmp_path / "run"
    proc = run("prune", "convnet-fmnist", "--out", str(out), *args)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_data_that_does_not_fit_the_model(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "imgs" / cls / f"{i}.png")
    proc = run("prune", "convnet-fmnist", "--data", str(tmp_path / "imgs"), "--layers", "conv1",
               "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "use the data set the model was trained on" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_prune_end_to_end_outputs(tmp_path, fmnist):
    out = tmp_path / "run"
    proc = run("prune", "convnet-fmnist", "--layers", "conv1", "conv2", "--keep", "0.75",
               "--score-samples", "300", "--finetune-epochs", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    model = cp.load(out)
    macs, params = macs_params(model, (1, 28, 28))
    assert result["model"]["params_after"] == params and result["model"]["macs_after"] == macs
    assert result["model"]["params_before"] > params
    assert result["layers"]["conv1"]["filters_after"] == 24 == model.conv1.out_channels
    assert result["layers"]["conv2"]["filters_after"] == 48 == model.conv2.out_channels
    removed = result["layers"]["conv2"]["removed"]
    assert len(removed) == 16 == len(set(removed))
    assert result["layers"]["conv2"]["steps"][0]["candidates"] == list(range(64))
    acc = cp.evaluate(model, fmnist.test).accuracy
    assert acc == pytest.approx(result["accuracy"]["test_finetuned"], abs=1e-12)
    x = fmnist.test.tensors[0][:8]
    assert torch.equal(model(x), cp.load(out)(x))
