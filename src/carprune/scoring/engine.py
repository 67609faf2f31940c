"""What an engine is: the options it is built from and the one call every engine answers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import CarpruneError
from ..groups import Surgery
from ..units import Block, Unit
from .compensation import RIDGE
from .sets import Scores, ScoringSet

DEFAULT_MEMORY_BUDGET = 2 * 2**30

Candidate = Unit | Block  # a unit, or a block of one layer's units scored jointly


@dataclass(frozen=True)
class EngineOptions:
    """How candidates are scored: the engine (a name of `scoring.ENGINES`), the bytes its
    caches and candidate batches may hold, and whether each candidate's consumers are refit by
    least squares (scoring/compensation.py, damped by `ridge` relative to the Gram diagonal's
    mean), when scoring and when removing."""

    engine: str = "fast"
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    compensate: bool = False
    ridge: float = RIDGE

    def __post_init__(self) -> None:
        if not self.memory_budget > 0:
            raise CarpruneError(f"the memory budget must be positive, got {self.memory_budget}")
        if not (math.isfinite(self.ridge) and self.ridge > 0):
            raise CarpruneError(f"--ridge must be a positive number, got {self.ridge}")
        if self.ridge != RIDGE and not self.compensate:
            raise CarpruneError("--ridge damps the least-squares refit; give it with "
                                "--compensate or drop it")


class Engine(Protocol):
    """Scores candidates: the tallies of the network as it is and of it without each one."""

    name: str
    compensate: bool
    reduce: Callable[[torch.Tensor], None]  # sums a tensor over the processes sharing images

    def score(self, surgery: Surgery, candidates: Sequence[Candidate], scoring: ScoringSet,
              advance: Callable[[int], None] = ..., fit: ScoringSet | None = None
              ) -> tuple[Scores, Scores]:
        """(base, candidates) tallies on `scoring`; when compensating, each candidate's refit
        is fitted on `fit` (default: `scoring` itself)."""
        ...

    def cache_bytes(self, surgery: Surgery, layer: str, scoring: ScoringSet) -> int:
        """Memory that scoring the layer's units holds between calls."""
        ...
