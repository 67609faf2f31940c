"""More than one process: CAR scoring sharded over torch.distributed ranks.

Scoring is a sum over images, so each rank scores its share of the scoring set and the tallies
(per-candidate correct counts, per-class counts and summed losses) are all-reduced. Every rank
then takes the same decision from the same reduced numbers (no broadcast needed: integers are
exact, and all-reduce hands every rank the same float sums). Rank 0 alone shows progress and
writes files. Backend: nccl on GPUs (each process on cuda:LOCAL_RANK), gloo on the CPU.
Launch with torchrun.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .errors import CarpruneError

if TYPE_CHECKING:  # the scoring layer sits above this one: names for annotations only
    from .groups import Surgery, Unit
    from .scoring import Scores, ScoringSet

TIMEOUT_ENV = "CARPRUNE_DIST_TIMEOUT"


def init_from_env(device: torch.device | None = None) -> None:
    """Join the process group torchrun describes in the environment (no-op when alone): nccl
    with this process on `device` (cuda:LOCAL_RANK) when it is a GPU, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (rank 0 may have changed files the others are about to read)."""
    if active():
        dist.barrier()


def shard(scoring: ScoringSet) -> ScoringSet:
    """This rank's batches (every world-th batch): the shards are disjoint and cover the set."""
    if not active():
        return scoring
    mine = scoring.batches[rank()::world()]
    if not mine:
        raise CarpruneError(f"the scoring set has {len(scoring.batches)} batches, fewer than the "
                            f"{world()} processes; use more scoring images or fewer processes")
    return dataclasses.replace(scoring, batches=mine)


def all_reduce_tensor(tensor: torch.Tensor) -> None:
    """Sum a tensor over all processes, in place."""
    try:
        dist.all_reduce(tensor)
    except RuntimeError as exc:
        raise CarpruneError(f"a peer process stopped or timed out during scoring ({exc}); "
                            "re-run the same command, it resumes from the last saved step") \
            from None


def all_reduce(scores: Scores) -> Scores:
    """Sum the tallies (kept on the CPU) over all processes, through the backend's device."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([scores.total], dtype=torch.int64)
    parts = [t.to(device) for t in (scores.correct, scores.class_correct, scores.loss, total)]
    for tensor in parts:
        all_reduce_tensor(tensor)
    scores.correct, scores.class_correct, scores.loss, total = (t.cpu() for t in parts)
    scores.total = int(total)
    return scores


class ShardedEngine:
    """Wraps an engine: scores this rank's shard, then sums the tallies over all ranks."""

    def __init__(self, engine):
        self.engine = engine
        self.name = f"{engine.name} x{world()} processes"

    def score(self, surgery: Surgery, units: Sequence[Unit], scoring: ScoringSet,
              advance: Callable[[int], None] = lambda n: None) -> tuple[Scores, Scores]:
        base, scores = self.engine.score(surgery, units, scoring, advance)
        return all_reduce(base), all_reduce(scores)

    def cache_bytes(self, surgery: Surgery, layer: str, scoring: ScoringSet) -> int:
        return self.engine.cache_bytes(surgery, layer, scoring)
