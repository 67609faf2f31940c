"""The CAR ranking rule, written once: remove first what loses the fewest scoring images, then
what adds the least loss, then the lowest tie-break key (the original filter index; layer order
first in a global run). Global runs weigh both by what a removal saves.

Losses are compared in quanta of a millionth of the largest candidate loss, so that engines
summing the same numbers in another order still rank alike; the number of images is exact.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from .sets import Scores

LOSS_QUANTUM = 1e-6  # of the largest candidate loss


def outcomes(base: Scores, scores: Scores) -> list[tuple[int, int]]:
    """Per candidate: (images lost, loss gained in quanta) against the network as it is."""
    quantum = (float(scores.loss.abs().max()) if len(scores.loss) else 0.0) or 1.0
    quantum *= LOSS_QUANTUM
    correct, loss = int(base.correct[0]), round(float(base.loss[0]) / quantum)
    return [(correct - int(c), round(float(x) / quantum) - loss)
            for c, x in zip(scores.correct, scores.loss, strict=True)]


def efficiency(lost: float, saved: float) -> float:
    """What a removal loses per unit of cost it saves, lowest first. A removal that gains
    (lost < 0) ranks by gain times saving instead, so that of two equal gains the one saving
    more goes first, and any gain ranks before any loss."""
    return lost / saved if lost > 0 else lost * saved


def key(lost: float, gained: float, saved: float = 1.0) -> tuple[float, float]:
    """A candidate's place, lowest first: images lost, then loss gained, each per saving."""
    return efficiency(lost, saved), efficiency(gained, saved)


def rank(base: Scores, scores: Scores, tiebreak: Sequence[Hashable],
         saved: Sequence[float] | None = None) -> list[int]:
    """Candidate positions, best to remove first: by `key` (each candidate saving `saved`, or
    1), then by `tiebreak`."""
    saved = [1.0] * len(tiebreak) if saved is None else saved
    keys = [(*key(lost, gained, s), t) for (lost, gained), s, t
            in zip(outcomes(base, scores), saved, tiebreak, strict=True)]
    return sorted(range(len(keys)), key=keys.__getitem__)


def importance(base: Scores, scores: Scores, tiebreak: Sequence[Hashable]) -> torch.Tensor:
    """The rule as one number per candidate, lowest removed first (for Torch-Pruning and the
    other criteria): images lost plus the candidate's place in `rank` over twice the number of
    candidates, so that it orders exactly as `rank` and images lost stay comparable."""
    order = rank(base, scores, tiebreak)
    place = torch.empty(len(order), dtype=torch.float64)
    place[order] = torch.arange(len(order), dtype=torch.float64) / (2 * max(1, len(order)))
    return (base.correct[0] - scores.correct).double() + place
