"""The naive engine: ablate one candidate, run the whole network over the scoring set, count.

Slow and obviously right; it stays forever as the reference the fast engine is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from ..groups import Surgery
from . import compensation
from .engine import Candidate, EngineOptions
from .sets import Scores, ScoringSet


@torch.inference_mode()
def full_pass(model: torch.nn.Module, scoring: ScoringSet) -> Scores:
    scores = Scores.zeros(1, scoring.num_classes)
    for x, y in scoring.batches:
        scores.add_logits(slice(0, 1), model(x).unsqueeze(0), y)
    scores.total = scoring.total
    return scores


class NaiveEngine:
    name = "naive"

    def __init__(self, options: EngineOptions = EngineOptions()):
        self.compensate = options.compensate  # score each candidate with its consumers refit
        self.ridge = options.ridge
        self.reduce: Callable[[torch.Tensor], None] = compensation.alone

    def cache_bytes(self, surgery: Surgery, layer: str, scoring: ScoringSet) -> int:
        return 0  # keeps nothing between calls

    def score(self, surgery: Surgery, candidates: Sequence[Candidate], scoring: ScoringSet,
              advance: Callable[[int], None] = lambda n: None,
              fit: ScoringSet | None = None) -> tuple[Scores, Scores]:
        """(base, candidates): tallies of the current network and of it without each
        candidate, its consumers refit on `fit` (default: `scoring`) when compensating."""
        scoring = scoring.in_layout(surgery.layout)
        fit = None if fit is None else fit.in_layout(surgery.layout)
        base = full_pass(surgery.model, scoring)
        p = None
        if self.compensate:
            consumers = compensation.consumers_of(surgery, [u for c in candidates for u in c.units])
            p = compensation.inverses(surgery, list(consumers), (fit or scoring).batches,
                                      self.ridge, self.reduce)
        parts = []
        for candidate in candidates:
            with surgery.ablated(candidate.units), (
                    compensation.refitted(surgery, candidate.units, p) if p is not None
                    else contextlib.nullcontext()):
                parts.append(full_pass(surgery.model, scoring))
            advance(1)
        return base, Scores.cat(parts) if parts else Scores.zeros(0, scoring.num_classes)
