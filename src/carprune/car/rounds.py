"""One round of global CAR: score the units of the layers above their floors (all of them, or a
screened or shortlisted few), then remove the best until the round has removed `step` units or
its savings cover what the budget still needs."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..groups import Unit
from ..scoring import ScoringSet
from ..scoring.rule import rank
from .budget import Meter
from .ranking import Ranking, pick
from .records import GlobalStep, LayerRecord
from .run import Run
from .settings import Approximation


@dataclass
class Mode:
    """How a run's rounds score: its approximations, whether it shows progress, the images a
    raced shortlist is scored on first, and the images a block's refit is fitted on and those
    it is judged on (block mode with compensation)."""

    approx: Approximation
    show: bool
    race: ScoringSet | None = None
    halves: tuple[ScoringSet, ScoringSet] | None = None


def unit_round(run: Run, meter: Meter, ranking: Ranking, mode: Mode,
               records: dict[str, LayerRecord], number: int) -> list[GlobalStep] | None:
    """One round over single units, with a progress bar. None when no unit can go."""
    layers, approx = ranking.open_layers(), mode.approx
    saving_of = meter.savings(layers)
    began = time.perf_counter()
    estimate = run.estimate(layers, mode.race or run.scoring) if approx.shortlist else None
    units = ranking.screened(saving_of, approx.screen, approx.shortlist, estimate)
    raced = f"raced {len(units)} units on {mode.race.total} images, " if mode.race else ""
    if units and mode.race:
        units = _finalists(run, ranking, units, saving_of, mode)
    if units:
        with tqdm(total=len(units), desc=f"global CAR round {number}", unit="cand",
                  leave=False, disable=not mode.show) as bar:
            base, scores = run.engine.score(run.surgery, units, run.scoring, bar.update)
        run.measured(float(base.accuracy()[0]))
        ranking.learn(units, base, scores)
    ranked = ranking.cuts(layers, saving_of, set(units) if approx.shortlist else None)
    if not ranked:
        return None
    removals = [take(run, meter, records, name, chosen,
                     ranking.lost(name, [c for c, _ in chosen]) / ranking.images)
                for name, chosen in pick(ranked, approx.step, meter.need()).items()]
    say_round(mode, meter, number, f"{raced}scored {len(units)} units", began, removals)
    return removals


def _finalists(run: Run, ranking: Ranking, units: list[Unit], saving_of: dict[Unit, float],
               mode: Mode) -> list[Unit]:
    """A raced shortlist's `2 * step` best units by their exact scores on the race's images."""
    base, scores = run.engine.score(run.surgery, units, mode.race)
    order = rank(base, scores, [(ranking.leaders.index(u.layer), ranking.original(u))
                                for u in units], [saving_of[u] for u in units])
    return [units[i] for i in order[:2 * mode.approx.step]]


def take(run: Run, meter: Meter, records: dict[str, LayerRecord], name: str,
         chosen: list[tuple[int, float]], car: float) -> GlobalStep:
    """Remove a round's picks from one layer (channel, saving each; together they lost the
    share `car` of the scoring images); its step records what is left of the budget."""
    removed = run.remove(name, [c for c, _ in chosen])
    records[name].removed += removed
    records[name].filters_after = run.surgery.size(name)
    removal = GlobalStep(name, removed, car, sum(s for _, s in chosen), float("nan"),
                         meter.spent())
    run.pending.append(removal)
    return removal


def say_round(mode: Mode, meter: Meter, number: int, scored: str, began: float,
              removals: list[GlobalStep]) -> None:
    """The line a round ends with, when the run shows progress."""
    if mode.show:
        gone = sum(len(r.removed) for r in removals)
        tqdm.write(f"round {number}: {scored} in {time.perf_counter() - began:.1f} s, "
                   f"removed {gone}, {meter.left:.1%} of the {meter.kind} left (target "
                   f"{meter.target:.1%})")
