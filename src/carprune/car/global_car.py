"""Global CAR under a budget: every round scores the units of all layers and removes those that
lose the least scoring accuracy per unit of cost they save, until the network meets the
target (rounds.py; blocks.py in block mode)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

from torch import nn
from tqdm.auto import tqdm

from .. import dist, estimate
from ..errors import CarpruneError
from ..groups import Surgery
from ..scoring import EngineOptions
from .blocks import block_round
from .budget import Meter
from .ranking import Ranking, group_leaders
from .records import GlobalProgress, GlobalStep, LayerRecord, PruneResult
from .rounds import Mode, unit_round
from .run import Run, check_layers, finish, open_surgery, record_history, start
from .settings import Approximation, Budget, Resume, check_global


def global_car_prune(model: nn.Module, data, target: float, layers: Sequence[str] | None = None,
                     budget: Budget = Budget(), approx: Approximation = Approximation(),
                     engine: EngineOptions = EngineOptions(), progress: bool = True,
                     resume: Resume | None = None, classes: Sequence[str | int] | None = None
                     ) -> tuple[PruneResult, list[GlobalStep]]:
    """Global CAR of `layers` (default: every prunable conv) down to `target`: a fraction of
    the original MACs or parameters, or milliseconds per image (batch 1, median, this
    machine's threads) for a latency budget, measured after every removal. Returns the result
    (a pruned copy of the model) and every removal in order.

    budget: what the target counts and a removal saves, and the guard rails (settings.Budget).
    approx: step, screen, shortlist and race, or block mode (settings.Approximation).
    engine: the scoring engine, its memory budget, and least-squares compensation.
    resume: an interrupted run's GlobalProgress, replayed first, and a function called with
    the progress and the network after every round (to save state, or measure the network).
    classes: specialise the network to these classes first (car_prune says how); the target
    is then a share of the specialised network's MACs or parameters.
    """
    began = time.perf_counter()
    budget.check_target(target)
    check_global(approx, budget)
    resume = resume or Resume()
    run, meter, ranking, records = _prepare(model, data, target, layers, budget, approx.race,
                                            engine, began, classes)
    rounds = _replay_rounds(run, meter, ranking, records, resume.done)
    mode = _mode(run, approx, progress)
    if progress and meter.left > meter.target:  # every process scores the timed candidates
        _estimate(run, meter, ranking, mode)
    round_of = block_round if approx.blocks else unit_round
    while meter.left > meter.target:
        removals = round_of(run, meter, ranking, mode, records, len(rounds) + 1)
        if removals is None:
            blocked = " or a --round-to block above it" if budget.round_to > 1 else ""
            warnings.warn(f"every layer is at its --min-keep floor{blocked} with "
                          f"{meter.left:.1%} of the {budget.kind} left, short of the target "
                          f"{meter.target:.0%}; lower --min-keep"
                          f"{' or --round-to' if budget.round_to > 1 else ''}", stacklevel=2)
            break
        rounds.append(removals)
        if resume.on_step is not None:
            record_history(run.surgery)  # so that the network handed on saves and reloads
            resume.on_step(GlobalProgress(rounds, ranking.last, ranking.images, run.val_before,
                                          meter.snapshot()), run.surgery.model)
    return finish(run, records), [st for r in rounds for st in r]


def _prepare(model: nn.Module, data, target: float, layers: Sequence[str] | None,
             budget: Budget, race: int | None, engine: EngineOptions, began: float,
             classes: Sequence[str | int] | None
             ) -> tuple[Run, Meter, Ranking, dict[str, LayerRecord]]:
    """The run on a copy of the network (specialised to `classes`), its budget, its ranking
    and its empty records."""
    scoring, surgery = open_surgery(model, data, classes)
    if race is not None and race >= scoring.total:
        raise CarpruneError(f"--race {race} must be fewer than the {scoring.total} scoring "
                            "images, or nothing is raced; lower it or drop it")
    leaders = group_leaders(surgery, _global_layers(surgery, layers, budget.ignore))
    floors = {n: max(1, math.ceil(budget.min_keep * surgery.size(n))) for n in leaders}
    records = {n: LayerRecord(surgery.size(n), surgery.size(n)) for n in leaders}
    meter = Meter(budget, target, surgery, leaders)
    run = start(surgery, scoring, engine, began)
    return run, meter, Ranking(surgery, leaders, floors, budget.round_to), records


def _global_layers(surgery: Surgery, layers: Sequence[str] | None,
                   ignore: Sequence[str]) -> list[str]:
    """The layers global CAR prunes: `layers` (default every prunable conv) less `ignore`."""
    for name in ignore:
        surgery.check_layer(name)
    chosen = [n for n in (layers or surgery.conv_layers()) if n not in set(ignore)]
    check_layers(surgery, chosen)
    return chosen


def _mode(run: Run, approx: Approximation, progress: bool) -> Mode:
    """How the rounds score: a raced shortlist's images, a compensated block's halves."""
    race = approx.race
    halves = run.scoring.halves() if approx.blocks and run.engine.compensate else None
    return Mode(approx, progress and dist.is_main(),
                run.scoring.subset(race) if race else None, halves)


def _estimate(run: Run, meter: Meter, ranking: Ranking, mode: Mode) -> None:
    """Before the first round: time a few candidates of each layer and say what an exact round
    and this run will take (estimate.py)."""
    layers, approx = ranking.open_layers(), mode.approx
    sizes = {n: run.surgery.size(n) for n in layers}
    per = estimate.layer_costs(run.engine, run.surgery, layers, run.scoring)
    began = time.perf_counter()
    if approx.shortlist or approx.blocks:
        run.estimate(layers, mode.race or run.scoring)
    units = sum(sizes.values())
    rounds, seconds = estimate.run_seconds(
        per, sizes, round(units * (1 - meter.target)), approx.step, approx.screen,
        approx.shortlist, time.perf_counter() - began,
        mode.race.total / run.scoring.total if mode.race else None, approx.blocks)
    how = (f"--shortlist {approx.shortlist}" if approx.shortlist else
           f"--blocks {approx.blocks}" if approx.blocks else
           f"--screen {approx.screen}" if approx.screen else "exact") + f", --step {approx.step}"
    how += f", --race {mode.race.total}" if mode.race else ""
    if mode.show:
        tqdm.write(f"global CAR: {units} units in {len(layers)} groups on {run.scoring.total} "
                   f"images; one exact scoring round takes about "
                   f"{estimate.say(estimate.round_seconds(per, sizes))} (timed "
                   f"{sum(estimate.SAMPLE) + 1} candidates a group); this run ({how}): "
                   f"about {rounds} rounds, {estimate.say(seconds)}")


def _replay_rounds(run: Run, meter: Meter, ranking: Ranking, records: dict[str, LayerRecord],
                   done: GlobalProgress | None) -> list[list[GlobalStep]]:
    """Redo an interrupted global run's removals in order (refits included) and restore what
    its ranking and budget knew, so that the run goes on where it stopped; the steps it never
    measured wait for the next scoring pass. Returns its rounds (none for a fresh run)."""
    if done is None:
        return []
    for past in (st for r in done.rounds for st in r):
        run.replay(past.layer, past.removed)
        records[past.layer].removed += past.removed
        records[past.layer].filters_after = run.surgery.size(past.layer)
    ranking.last, ranking.images = dict(done.last), done.images
    meter.restore(done.meter)
    run.val_before = done.val_before
    run.pending = [st for r in done.rounds for st in r if math.isnan(st.val_accuracy)]
    return list(done.rounds)
