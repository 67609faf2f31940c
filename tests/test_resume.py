"""Long runs that survive: kills, interrupted writes, full disks, changed configurations."""

import dataclasses
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import carprune as cp
from carprune import CarpruneError
from carprune.car import (
    Approximation,
    Budget,
    EngineOptions,
    LayerRecord,
    Resume,
    car_prune,
    global_car_prune,
)
from carprune.cli import main
from carprune.io import atomic_write, write_json
from carprune.resume import STATE_DIR, RunState

from .conftest import SMALL_DATA, quick_trained, subset

ARGS = ["prune", "convnet-fmnist", "--data", SMALL_DATA, "--layers", "conv3", "conv1", "--keep",
        "0.875", "--score-samples", "150", "--train-samples", "512", "--finetune-epochs", "4"]


def start(out, *extra, args=ARGS):
    # SIGINT back to its default in the child: a shell running the tests in the background
    # ignores it, and Python then never turns Ctrl-C into KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", "carprune", *args, "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def at_work(proc) -> float | None:
    """When `proc` began to prune or fine-tune (its first CAR or fine-tuning progress bar on
    stderr), past the imports and data loading that every run repeats; None if it ended
    first."""
    seen = ""
    while "CAR " not in seen and "fine-tune" not in seen:
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            return None
        seen += chunk.decode(errors="replace")
    return time.perf_counter()


def finished(out) -> bool:
    """Whether the run in `out` wrote its results and removed its resumable state."""
    return (out / "result.json").exists() and not (out / STATE_DIR).exists()


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    proc = start(ref)
    began = at_work(proc)
    assert proc.wait(timeout=900) == 0 and began is not None, proc.stderr.read()
    duration = time.perf_counter() - began  # of its work: pruning, fine-tuning, measuring
    reference = json.loads((ref / "result.json").read_text())

    out, kills, rng = tmp_path / "killed", 0, random.Random(7)
    while kills < 4:  # up to four kills at random instants of the work, each run resuming
        proc = start(out)
        try:
            at_work(proc)
            proc.wait(timeout=rng.uniform(0.2, 0.8) * duration)
            break  # it finished before its kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        if finished(out):
            break  # killed on its way out, after it had written everything
    else:
        proc = start(out)  # then let it finish
        proc.wait(timeout=900)
    assert proc.returncode == 0 or (proc.returncode == -signal.SIGKILL and finished(out)), \
        proc.stderr.read()
    assert kills >= 2
    result = json.loads((out / "result.json").read_text())
    for layer in ("conv1", "conv3"):
        assert result["layers"][layer]["removed"] == reference["layers"][layer]["removed"]
        assert result["layers"][layer]["steps"] == reference["layers"][layer]["steps"]
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert result["accuracy"] == reference["accuracy"]
    assert not (out / STATE_DIR).exists()


def test_a_write_killed_midway_leaves_the_old_state(tmp_path, monkeypatch):
    state = RunState.open(tmp_path / "run", {"a": 1})
    state.save_layers({}, 0.5)
    before = (tmp_path / "run" / STATE_DIR / "state.json").read_bytes()

    def die(*args):
        raise KeyboardInterrupt  # the process stops between writing and renaming
    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        state.save_layers({}, 0.9)
    assert (tmp_path / "run" / STATE_DIR / "state.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run" / STATE_DIR).iterdir()) == ["state.json"]


def test_disk_full_is_a_clear_error_and_keeps_the_state(tmp_path, monkeypatch):
    state = RunState.open(tmp_path / "run", {"a": 1})
    state.save_layers({}, 0.5)
    before = (tmp_path / "run" / STATE_DIR / "state.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CarpruneError, match="disk is full.*resume"):
        state.save_layers({}, 0.9)
    assert (tmp_path / "run" / STATE_DIR / "state.json").read_bytes() == before


def test_atomic_write_never_leaves_a_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        atomic_write(tmp_path / "f.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_other_configuration_refused_and_restart_discards(tmp_path):
    RunState.open(tmp_path / "run", {"keep": 0.5, "layers": ["conv1"]}).save_layers({}, 0.9)
    with pytest.raises(CarpruneError, match=r"different configuration \(keep differ\).*--restart"):
        RunState.open(tmp_path / "run", {"keep": 0.25, "layers": ["conv1"]})
    resumed = RunState.open(tmp_path / "run", {"keep": 0.5, "layers": ["conv1"]})
    assert resumed.saved["val_before"] == 0.9
    # an option added since (here --race), left unset, resumes the older run
    newer = RunState.open(tmp_path / "run", {"keep": 0.5, "layers": ["conv1"], "race": None})
    assert newer.saved["val_before"] == 0.9
    with pytest.raises(CarpruneError, match=r"\(race differ\)"):
        RunState.open(tmp_path / "run", {"keep": 0.5, "layers": ["conv1"], "race": 64})
    fresh = RunState.open(tmp_path / "run", {"keep": 0.25, "layers": ["conv1"]}, restart=True)
    assert fresh.saved == {} and not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(CarpruneError, match="not a carprune run directory"):
        RunState.open(tmp_path / "mine", {}, restart=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    proc = start(tmp_path / "run")
    deadline = time.time() + 300
    while not (tmp_path / "run" / STATE_DIR / "state.json").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    for _ in range(20):  # a signal that lands inside native code is seen at the next bytecode
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=3)
            break
        except subprocess.TimeoutExpired:
            continue
    assert proc.returncode == 130
    err = proc.stderr.read()
    assert "run the same command again to resume" in err and "Traceback" not in err
    saved = json.loads((tmp_path / "run" / STATE_DIR / "state.json").read_text())
    assert saved["layers"]["conv3"]["steps"]


def test_compensated_replay_rebuilds_the_same_weights(baseline, fmnist):
    # a resumed run replays its recorded removals, refits included: the weights must come out
    # as in the uninterrupted run
    scoring = subset(fmnist.val, 200)
    kwargs = {"keep": 60, "approx": Approximation(step=2),
              "engine": EngineOptions(compensate=True), "progress": False}
    whole = car_prune(baseline, scoring, ["conv2"], **kwargs)
    first = whole.layers["conv2"].steps[:1]
    done = {"conv2": LayerRecord(64, 60, list(first[0].removed), list(first))}
    resumed = car_prune(baseline, scoring, ["conv2"], **kwargs, resume=Resume(done))
    assert resumed.layers["conv2"].removed == whole.layers["conv2"].removed
    theirs = resumed.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in whole.model.state_dict().items())


@pytest.fixture(scope="module")
def tiny(fmnist):
    torch.manual_seed(0)
    return quick_trained("convnet", fmnist, n=2000, widths=(6, 8, 8), hidden=16)


def saved_rounds(out) -> int:
    state = out / STATE_DIR / "state.json"
    return len(json.loads(state.read_text())["global"]["rounds"]) if state.exists() else 0


def says(proc, text):
    """A test that reads what `proc` wrote to stderr so far, true once it holds `text`."""
    seen = []

    def ready() -> bool:
        seen.append(os.read(proc.stderr.fileno(), 4096).decode(errors="replace"))
        return text in "".join(seen)
    return ready


def kill_when(proc, ready) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; it must still be running then."""
    deadline = time.time() + 300
    while not ready():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_global_run_killed_in_its_first_round_and_later_resumes_identically(tiny, tmp_path):
    cp.save(tiny, tmp_path / "tiny")
    args = ["prune", str(tmp_path / "tiny"), "--data", SMALL_DATA,
            "--target-macs", "0.4", "--screen", "4", "--score-samples", "500",
            "--finetune-epochs", "0"]
    ref = tmp_path / "ref"
    proc = start(ref, args=args)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    reference = json.loads((ref / "result.json").read_text())
    rounds = len(reference["global"]["steps"])  # one unit a round
    out = tmp_path / "killed"

    proc = start(out, args=args)  # killed in its first (full) scoring round
    kill_when(proc, says(proc, "global CAR"))  # its progress bar: the rounds begin
    assert saved_rounds(out) == 0
    proc = start(out, args=args)  # killed after some rounds: it goes on from the saved state
    kill_when(proc, lambda: saved_rounds(out) >= 2)
    assert 2 <= saved_rounds(out) < rounds
    proc = start(out, args=args)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    result = json.loads((out / "result.json").read_text())
    assert result["global"]["steps"] == reference["global"]["steps"]
    assert result["layers"] == reference["layers"]
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert not (out / STATE_DIR).exists()


def test_replayed_global_run_with_screen_goes_on_identically(tiny, fmnist, tmp_path):
    # killed right after saving its third round; resumed from state.json, the run must pick
    # the same units (the screen ranks by the scores it remembers) and refit the same weights
    scoring = subset(fmnist.val, 200)
    kwargs = {"target": 0.5, "budget": Budget(min_keep=0.0), "approx": Approximation(screen=3),
              "engine": EngineOptions(compensate=True), "progress": False}
    whole, steps = global_car_prune(tiny, scoring, **kwargs)
    state = RunState.open(tmp_path / "run", {"a": 1})

    def save_then_die(progress, model):
        state.save_global(progress)
        if len(progress.rounds) == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        global_car_prune(tiny, scoring, **kwargs, resume=Resume(on_step=save_then_die))
    done = RunState.open(tmp_path / "run", {"a": 1}).global_progress()
    assert len(done.rounds) == 3 < len(steps) and done.last
    assert all(math.isnan(st.val_accuracy) for st in done.rounds[-1])
    resumed, resumed_steps = global_car_prune(tiny, scoring, **kwargs, resume=Resume(done))
    assert [dataclasses.asdict(st) for st in resumed_steps] == \
        [dataclasses.asdict(st) for st in steps]
    assert resumed.layers == whole.layers and resumed.val_before == whole.val_before
    theirs = resumed.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in whole.model.state_dict().items())



def test_the_network_a_global_run_hands_on_saves_and_reloads(tiny, fmnist, tmp_path):
    """on_step's network carries the removals so far in its spec: cp.save writes it and
    cp.load rebuilds it with the same outputs, mid-run, also where gradients are off."""
    scoring, images = subset(fmnist.val, 200), fmnist.test.tensors[0][:32]
    seen = []

    def save_second(progress, model):
        if len(progress.rounds) == 2:
            cp.save(model, tmp_path / "mid")
            with torch.no_grad():
                seen.append(model.eval()(images))
    global_car_prune(tiny, scoring, 0.5, budget=Budget(min_keep=0.0), progress=False,
                     resume=Resume(on_step=save_second))
    with torch.no_grad():
        torch.testing.assert_close(cp.load(tmp_path / "mid")(images), seen[0])
    with torch.inference_mode():
        torch.testing.assert_close(cp.load(tmp_path / "mid")(images), seen[0])


def test_a_run_stopped_while_writing_its_results_resumes(tmp_path, monkeypatch):
    """The run's state goes only after the network and result.json are written, so a run
    stopped between the two resumes (rather than finding a directory it refuses)."""
    def stop_at_result(path, *args, **kwargs):
        if Path(path).name == "result.json":
            raise KeyboardInterrupt
        return write_json(path, *args, **kwargs)

    command = [*ARGS[:-1], "0", "--out", str(tmp_path / "run")]
    with monkeypatch.context() as patch:
        patch.setattr("carprune.commands.prune.io.write_json", stop_at_result)
        with pytest.raises(SystemExit):
            main(command)
    assert (tmp_path / "run" / "model.json").is_file()
    main(command)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["accuracy"]
