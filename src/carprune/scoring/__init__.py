"""The evaluation engine: how accuracy changes when units are gone.

`NaiveEngine` is the reference; `FastEngine` gives the same tallies with far less work. Both
answer the `Engine` call: (base, candidates) `Scores`, correct counts, per-class correct counts
and summed loss. rule.py ranks candidates by them.
"""

from collections.abc import Callable

from ..errors import CarpruneError
from .engine import DEFAULT_MEMORY_BUDGET as DEFAULT_MEMORY_BUDGET
from .engine import Engine as Engine
from .engine import EngineOptions as EngineOptions
from .fast import FastEngine as FastEngine
from .naive import NaiveEngine as NaiveEngine
from .sets import Scores as Scores
from .sets import ScoringSet as ScoringSet

ENGINES: dict[str, Callable[[EngineOptions], Engine]] = {"fast": FastEngine,
                                                         "naive": NaiveEngine}


def make_engine(options: EngineOptions = EngineOptions()) -> Engine:
    """The engine `options` name, built from them."""
    if options.engine not in ENGINES:
        raise CarpruneError(f"unknown engine {options.engine!r}; use "
                            f"{' or '.join(ENGINES)}")
    return ENGINES[options.engine](options)
