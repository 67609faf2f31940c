"""Know the cost before paying it: time a few candidates of each layer, then say what one exact
scoring round and the whole global run will take in the chosen mode."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from .groups import Surgery, Unit
from .scoring import Engine, ScoringSet

SAMPLE = (2, 10)  # candidates timed per layer, twice, after one that warms the caches up


def _seconds(engine: Engine, surgery: Surgery, units: list[Unit], scoring: ScoringSet) -> float:
    start = time.perf_counter()
    engine.score(surgery, units, scoring)
    return time.perf_counter() - start


def layer_costs(engine: Engine, surgery: Surgery, layers: Sequence[str],
                scoring: ScoringSet) -> dict[str, tuple[float, float]]:
    """Per layer: (seconds a scoring call costs whatever it scores, seconds per candidate),
    fitted to two timed calls of `SAMPLE` candidates (batched candidates cost less each)."""
    out = {}
    for name in layers:
        few, many = (min(k, surgery.size(name)) for k in SAMPLE)
        units = [Unit(name, c) for c in range(many)]
        engine.score(surgery, units[:1], scoring)
        t_few, t_many = (_seconds(engine, surgery, units[:k], scoring) for k in (few, many))
        per = (t_many - t_few) / (many - few) if many > few else t_many / many
        per = max(per, t_many / many / 4)
        out[name] = (max(0.0, t_many - per * many), per)
    return out


def round_seconds(costs: dict[str, tuple[float, float]], sizes: dict[str, int]) -> float:
    """One exact round: every unit of every layer."""
    return sum(fixed + per * sizes[n] for n, (fixed, per) in costs.items())


def run_seconds(costs: dict[str, tuple[float, float]], sizes: dict[str, int], removals: int,
                step: int, screen: int | None, shortlist: int | None,
                first_order: float, race: float | None = None,
                blocks: float | None = None) -> tuple[int, float]:
    """(rounds, seconds) of a run that removes about `removals` units, `step` a round: exact
    rounds over the units left, one exact round then `screen` a round, or `shortlist` a round
    after a first-order pass of `first_order` seconds; a raced shortlist on the share `race`
    of the images, then `2 * step` finalists on all; or `step` blocks a round of the share
    `blocks` of a layer each, after a first-order pass, one candidate a layer."""
    units = sum(sizes.values())
    mean = round_seconds(costs, sizes) / units
    if blocks:
        block = max(1.0, blocks * units / len(sizes))
        rounds = max(1, math.ceil(removals / (step * block)))
        return rounds, rounds * (first_order + sum(fixed + per for fixed, per in costs.values()))
    rounds = max(1, -(-removals // step))
    if shortlist and race:
        listed = min(shortlist, units)
        return rounds, rounds * (first_order + (listed * race + min(2 * step, listed)) * mean)
    if shortlist:
        return rounds, rounds * (first_order + min(shortlist, units) * mean)
    if screen:
        return rounds, units * mean + (rounds - 1) * min(screen, units) * mean
    return rounds, rounds * (units - removals / 2) * mean


def say(seconds: float) -> str:
    """A duration for people: 42 s, 7.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
