"""Two processes on localhost (gloo): the same picks and weights as one process; a dead peer
makes the other fail with a clear message instead of hanging."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from .conftest import SMALL_DATA

ARGS = ["prune", "convnet-fmnist", "--data", SMALL_DATA, "--layers", "conv3", "conv1", "--keep",
        "0.875", "--score-samples", "160", "--finetune-epochs", "0"]


def run(out, nproc, extra=()):
    prefix = [sys.executable, "-m", "carprune"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "carprune"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*prefix, *ARGS, *extra, "--out", str(out)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("extra", [[], ["--compensate"]])
def test_two_processes_pick_what_one_process_picks(tmp_path, extra):
    one = run(tmp_path / "one", 1, extra)
    two = run(tmp_path / "two", 2, extra)
    for layer in ("conv3", "conv1"):
        assert two["layers"][layer]["removed"] == one["layers"][layer]["removed"]
        for a, b in zip(one["layers"][layer]["steps"], two["layers"][layer]["steps"],
                        strict=True):
            assert a["val_accuracy"] == b["val_accuracy"]
            assert a["car"] == pytest.approx(b["car"], abs=1e-12)
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    if extra:  # the refit sums its Gram matrices over the shards in another order
        assert all(torch.allclose(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-7)
                   for k in weights[0])
    else:
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert one["compensate"] is two["compensate"] is bool(extra)
    assert not any(p.name.startswith(".") for p in (tmp_path / "two").iterdir())


def _peer(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", CARPRUNE_DIST_TIMEOUT="15")
    from carprune import CarpruneError
    from carprune import dist as cdist
    from carprune.scoring import Scores
    from carprune.scoring.sharded import all_reduce

    cdist.init_from_env()
    if rank == 1:
        os._exit(0)  # dies before the first collective
    try:
        all_reduce(Scores.zeros(2, 10))
        queue.put("no error")
    except CarpruneError as exc:
        queue.put(str(exc))


@pytest.mark.distributed
def test_a_dead_peer_is_a_clear_error_not_a_hang():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_peer, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    message = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert "peer process stopped or timed out" in message and "re-run" in message
