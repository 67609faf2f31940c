import json
import subprocess
import sys

import pytest
import torch

import carprune as cp
from carprune.measure import macs_params

from .conftest import SMALL_DATA, small_fashion_mnist


def run(*args):
    return subprocess.run([sys.executable, "-m", "carprune", *args], capture_output=True,
                          text=True, timeout=900)


def test_help_lists_the_commands(carprune_cli):
    out = carprune_cli("--help").stdout
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
    (["--layers", "conv1", "--step", "4", "--screen", "2"], "--screen must be at least"),
    (["--target-macs", "0.5", "--target-params", "0.5"], "give one budget"),
    (["--target-latency-ms", "1000"], "below the network's measured"),
    (["--layers", "conv1", "--round-to", "8"], "--round-to applies to global runs"),
    (["--target-macs", "0.5", "--round-to", "0"], "--round-to must be a whole number"),
    (["--layers", "conv1", "--criterion", "l2", "--compensate"], "does not apply to"),
])
def test_prune_bad_input_exit_2_and_no_output(tmp_path, carprune_cli, args, words):
    out = tmp_path / "run"
    proc = carprune_cli("prune", "convnet-fmnist", "--out", str(out), *args)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_data_that_does_not_fit_the_model(tmp_path):
    """A real `python -m carprune` process: its exit status is 2 (the others run in-process)."""
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
def test_prune_end_to_end_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run("prune", "convnet-fmnist", "--data", SMALL_DATA, "--layers", "conv1", "conv2",
               "--keep", "0.75", "--score-samples", "150", "--finetune-epochs", "0", "--out",
               str(out))
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
    test = small_fashion_mnist().test
    acc = cp.evaluate(model, test).accuracy
    assert acc == pytest.approx(result["accuracy"]["test_finetuned"], abs=1e-12)
    x = test.tensors[0][:8]
    assert torch.equal(model(x), cp.load(out)(x))


def test_bench_overall_by_hand(baseline):
    from carprune.bench import LayerBench, by_kind, overall_speedup, run_candidates

    assert run_candidates(baseline, ["conv1", "conv3"], 0.5) == {
        "conv1": sum(range(17, 33)), "conv3": sum(range(33, 65))}
    rows = [LayerBench("conv1", "plain", 10, 20.0, 5.0, 4.0, [], []),
            LayerBench("conv3", "plain", 20, 10.0, 1.0, 0.5, [], [])]
    cands = {"conv1": 100, "conv3": 50}
    # naive: 2 s and 0.5 s a candidate; fast: 0.5 s and 0.05 s
    assert overall_speedup(rows, cands) == pytest.approx((200 + 25) / (50 + 2.5))
    assert overall_speedup(rows, cands, run_seconds=45.0) == pytest.approx(225 / 45)
    kinds = by_kind(rows + [LayerBench("x", "residual", 4, 8.0, 2.0, 0.0, [1], [2])])
    assert [k["kind"] for k in kinds] == ["plain", "residual"]
    assert kinds[0]["speedup"] == pytest.approx(30 / 6)
    assert kinds[0]["fast_over_bound"] == pytest.approx(6 / 4.5) and kinds[0]["identical"]
    assert kinds[1]["fast_over_bound"] is None and not kinds[1]["identical"]


def test_bench_end_to_end_small(tmp_path):
    out = tmp_path / "bench"
    proc = run("bench", "--layers", "conv3", "--steps", "1", "--score-samples", "200",
               "--keep", "60", "--approx", "--approx-step", "2", "--approx-screen", "3",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["identical_picks"] and report["layers"][0]["picks_naive"] == \
        report["layers"][0]["picks_fast"]
    assert report["layers"][0]["candidates"] == 64
    assert [a["mode"] for a in report["approximate"]] == ["--step 2", "--screen 3"]
    assert all(0 <= a["identical_picks"] <= 1 for a in report["approximate"])
    assert "overall speed-up:" in proc.stdout.splitlines()[-2]
