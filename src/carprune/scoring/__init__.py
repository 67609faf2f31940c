"""The evaluation engine: how accuracy changes when units are gone.

`NaiveEngine` is the reference; `FastEngine` gives the same tallies with far less work. Both
return (base, candidates) `Scores`: correct counts, per-class correct counts and summed loss.
"""

from ..errors import CarpruneError
from ._common import Scores as Scores
from ._common import ScoringSet as ScoringSet
from ._common import rank as rank
from .fast import DEFAULT_MEMORY_BUDGET as DEFAULT_MEMORY_BUDGET
from .fast import FastEngine as FastEngine
from .naive import NaiveEngine as NaiveEngine

ENGINES = {"fast": FastEngine, "naive": NaiveEngine}


def make_engine(name: str = "fast", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                compensate: bool = False):
    if name == "fast":
        return FastEngine(memory_budget, compensate)
    if name == "naive":
        return NaiveEngine(compensate)
    raise CarpruneError(f"unknown engine {name!r}; use fast or naive")
