"""The naive engine: ablate one candidate, run the whole network over the scoring set, count.

Slow and obviously right; it stays forever as the reference the fast engine is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .. import compensation
from ..groups import Surgery, Unit
from ._common import Scores, ScoringSet


@torch.inference_mode()
def full_pass(model: torch.nn.Module, scoring: ScoringSet) -> Scores:
    scores = Scores.zeros(1, scoring.num_classes)
    for x, y in scoring.batches:
        scores.add_logits(slice(0, 1), model(x).unsqueeze(0), y)
    scores.total = scoring.total
    return scores


class NaiveEngine:
    name = "naive"

    def __init__(self, compensate: bool = False):
        self.compensate = compensate  # score each candidate with its consumers refit

    def cache_bytes(self, surgery: Surgery, layer: str, scoring: ScoringSet) -> int:
        return 0  # keeps nothing between calls

    def score(self, surgery: Surgery, units: Sequence[Unit], scoring: ScoringSet,
              advance: Callable[[int], None] = lambda n: None) -> tuple[Scores, Scores]:
        """(base, candidates): tallies of the current network and of it without each unit."""
        base = full_pass(surgery.model, scoring)
        p = compensation.inverses(surgery, list(compensation.consumers_of(surgery, units)),
                                  scoring.batches) if self.compensate else None
        parts = []
        for unit in units:
            with surgery.ablated([unit]), (compensation.refitted(surgery, [unit], p)
                                           if p is not None else contextlib.nullcontext()):
                parts.append(full_pass(surgery.model, scoring))
            advance(1)
        return base, Scores.cat(parts) if parts else Scores.zeros(0, scoring.num_classes)
