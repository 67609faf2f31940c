"""Scoring shared among processes (torch.distributed ranks).

Scoring is a sum over images, so each rank scores its share of the scoring set and the tallies
(per-candidate correct counts, per-class counts and summed losses) are all-reduced, as are the
Gram matrices of a compensating refit. Every rank then takes the same decision from the same
reduced numbers (no broadcast needed: integers are exact, and all-reduce hands every rank the
same float sums).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.distributed

from .. import dist
from ..errors import CarpruneError
from ..groups import Surgery
from .engine import Candidate, Engine
from .sets import Scores, ScoringSet

KEPT = 4  # shards kept: a run's scoring set, a race's images, a refit's fitting and judging


def shard(scoring: ScoringSet) -> ScoringSet:
    """This rank's batches (every world-th batch): the shards are disjoint and cover the set."""
    if not dist.active():
        return scoring
    mine = scoring.batches[dist.rank()::dist.world()]
    if not mine:
        raise CarpruneError(f"the scoring set has {len(scoring.batches)} batches, fewer than the "
                            f"{dist.world()} processes; use more scoring images or fewer "
                            "processes")
    return dataclasses.replace(scoring, batches=mine)


def all_reduce(scores: Scores) -> Scores:
    """Sum the tallies (kept on the CPU) over all processes, through the backend's device."""
    device = torch.device("cuda", torch.cuda.current_device()) \
        if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([scores.total], dtype=torch.int64)
    parts = [t.to(device) for t in (scores.correct, scores.class_correct, scores.loss, total)]
    for tensor in parts:
        dist.all_reduce_tensor(tensor)
    scores.correct, scores.class_correct, scores.loss, total = (t.cpu() for t in parts)
    scores.total = int(total)
    return scores


class Sharded:
    """Wraps an engine: scores this rank's share of the images it is given (and fits a refit on
    its share of `fit`), then sums the tallies over all ranks; the engine's refits sum their
    Gram matrices over all ranks too."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.name = f"{engine.name} x{dist.world()} processes"
        self.compensate = engine.compensate
        engine.reduce = dist.all_reduce_tensor
        self._shards: dict[int, tuple[ScoringSet, ScoringSet]] = {}  # id -> (set, its shard)

    @property
    def reduce(self) -> Callable[[torch.Tensor], None]:
        return self.engine.reduce

    def mine(self, scoring: ScoringSet) -> ScoringSet:
        """This rank's share of `scoring`, the same object every time (the engine's caches go
        by it)."""
        held = self._shards.get(id(scoring))
        if held is None or held[0] is not scoring:
            held = self._shards[id(scoring)] = (scoring, shard(scoring))
            for old in list(self._shards)[:-KEPT]:
                del self._shards[old]
        return held[1]

    def score(self, surgery: Surgery, candidates: Sequence[Candidate], scoring: ScoringSet,
              advance: Callable[[int], None] = lambda n: None,
              fit: ScoringSet | None = None) -> tuple[Scores, Scores]:
        base, scores = self.engine.score(surgery, candidates, self.mine(scoring), advance,
                                         None if fit is None else self.mine(fit))
        return all_reduce(base), all_reduce(scores)

    def cache_bytes(self, surgery: Surgery, layer: str, scoring: ScoringSet) -> int:
        return self.engine.cache_bytes(surgery, layer, self.mine(scoring))
