"""Greedy CAR pruning (Abbasi-Asl & Yu): per layer, remove the filter whose absence costs the
least scoring accuracy, re-score every remaining filter on the new network, repeat."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from . import compensation, dist, estimate, measure
from .errors import CarpruneError
from .groups import Surgery, Unit
from .scoring import (
    DEFAULT_MEMORY_BUDGET,
    FastEngine,
    NaiveEngine,
    Scores,
    ScoringSet,
    make_engine,
    rank,
)
from .scoring.first_order import first_order
from .scoring.graph import trace


@dataclass
class Step:
    removed: list[int]          # original indices removed at this step
    val_accuracy: float         # scoring accuracy of the network after the removal
    candidates: list[int]       # original indices scored at this step
    car: list[float]            # CAR index of each candidate: base accuracy - accuracy without


@dataclass
class LayerRecord:
    filters_before: int
    filters_after: int
    removed: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


@dataclass
class PruneResult:
    model: nn.Module
    layers: dict[str, LayerRecord]
    val_before: float
    val_after: float
    seconds: float
    engine: str

    def to_json(self) -> dict:
        return {name: asdict(rec) for name, rec in self.layers.items()}


def check_keep(keep: float) -> None:
    """A fraction strictly between 0 and 1, or a whole count >= 1 (of any layer)."""
    if not math.isfinite(keep) or keep <= 0:
        raise CarpruneError(f"keep must be a fraction in (0, 1) or a count >= 1, got {keep}")
    if keep >= 1 and keep != int(keep):
        raise CarpruneError(f"keep {keep} is neither a fraction below 1 nor a whole count; "
                            "use e.g. 0.5 or 16")


def resolve_keep(keep: float, n: int, layer: str) -> int:
    """Filters to keep of the n in `layer`, for a keep that `check_keep` accepts."""
    check_keep(keep)
    if keep < 1:
        target = math.floor(keep * n + 0.5)
        if target < 1:
            raise CarpruneError(f"keep {keep} leaves no filter of the {n} in {layer!r}; use a "
                                f"fraction of at least {1 / (2 * n):.3f} or a count >= 1")
        return target
    if keep >= n:
        raise CarpruneError(f"keep {int(keep)} is not below the {n} filters of {layer!r}; "
                            f"choose a count under {n} or a fraction")
    return int(keep)


def check_layers(surgery: Surgery, layers: Sequence[str]) -> None:
    if not layers:
        raise CarpruneError("no layers given; name at least one conv layer with --layers")
    dupes = sorted({name for name in layers if list(layers).count(name) > 1})
    if dupes:
        raise CarpruneError(f"layer {dupes[0]!r} is listed twice; name each layer once")
    for name in layers:
        surgery.check_layer(name)


def check_approximation(step: int, screen: int | None) -> None:
    """`step` and `screen`, the approximations of greedy CAR, must make sense together."""
    if step < 1:
        raise CarpruneError(f"step must be at least 1, got {step}")
    if screen is not None and screen < step:
        raise CarpruneError(f"--screen must be at least --step ({step}), got {screen}")


def check_global(round_to: int, min_keep: float) -> None:
    """The guard rails of global CAR, `round_to` and `min_keep`, must be possible."""
    if round_to < 1:
        raise CarpruneError(f"--round-to must be a whole number >= 1, got {round_to}")
    if not 0 <= min_keep < 1:
        raise CarpruneError(f"--min-keep must be a fraction in [0, 1), got {min_keep}")


def check_shortlist(shortlist: int | None, step: int, screen: int | None,
                    race: int | None = None) -> None:
    """`shortlist` (global runs only) replaces `screen` and must hold a round's `step`;
    `race` races a shortlist."""
    if race is not None and shortlist is None:
        raise CarpruneError("--race races a shortlist's units on a few images first; give "
                            "--shortlist M with it")
    if race is not None and race < 1:
        raise CarpruneError(f"--race takes a number of images, at least 1, got {race}")
    if shortlist is None:
        return
    if screen is not None:
        raise CarpruneError("give --shortlist or --screen, not both: both choose the units a "
                            "round scores")
    if shortlist < step:
        raise CarpruneError(f"--shortlist must be at least --step ({step}), got {shortlist}")


def _open(model: nn.Module, data, num_classes: int | None,
          inplace: bool) -> tuple[nn.Module, ScoringSet, Surgery]:
    """The network to prune (a copy unless `inplace`, in eval mode), the scoring set, and the
    surgery that continues the network's earlier pruning history."""
    model = (model if inplace else copy.deepcopy(model)).eval()
    scoring = ScoringSet.from_any(data, num_classes)
    prior = getattr(model, "carprune_spec", {}).get("pruning_history", [])
    return model, scoring, Surgery(model, scoring.example(), prior_history=prior)


def _record_history(model: nn.Module, surgery: Surgery) -> None:
    """Store the full pruning history in the model's spec, so that saving it rebuilds it."""
    model.carprune_spec = {**getattr(model, "carprune_spec", {}),
                           "pruning_history": surgery.history()}


@dataclass
class _Run:
    """What every step of a CAR run works with: the surgery, the scoring set and engine (this
    process's share of the set and tallies summed over all, when distributed), how units leave,
    and the scoring accuracy. A removal's accuracy is known only at the next scoring pass (its
    base), so its step waits in `pending` until then."""

    surgery: Surgery
    scoring: ScoringSet
    scorer: FastEngine | NaiveEngine | dist.ShardedEngine
    remove: Callable[[str, Sequence[int]], list[int]]
    val_before: float | None = None
    pending: list[Step | GlobalStep] = field(default_factory=list)

    def measured(self, accuracy: float) -> None:
        """The network as it is now scores `accuracy`: the first such is the run's before."""
        self.val_before = accuracy if self.val_before is None else self.val_before
        for st in self.pending:
            st.val_accuracy = accuracy
        self.pending = []


def _start(surgery: Surgery, scoring: ScoringSet, engine: str, memory_budget: int,
           compensate: bool, val_before: float | None = None) -> _Run:
    """A run on `surgery` with the named engine, sharded over the processes when distributed."""
    scorer = make_engine(engine, memory_budget, compensate)
    if dist.active():
        scoring, scorer = dist.shard(scoring), dist.ShardedEngine(scorer)
    return _Run(surgery, scoring, scorer, _remover(surgery, scoring, compensate), val_before)


def _remover(surgery: Surgery, scoring: ScoringSet,
             compensate: bool) -> Callable[[str, Sequence[int]], list[int]]:
    """How chosen channels leave: physically, after a least-squares refit of their consumers
    when compensating."""
    if compensate:
        return lambda layer, channels: compensation.remove(surgery, layer, channels,
                                                           scoring.batches)
    return surgery.remove


def _finish(model: nn.Module, run: _Run, records: dict[str, LayerRecord],
            start: float) -> PruneResult:
    """Score the pruned network, which also measures the last steps, and store its history."""
    val_after = float(run.scorer.score(run.surgery, [], run.scoring)[0].accuracy()[0])
    run.measured(val_after)
    _record_history(model, run.surgery)
    return PruneResult(model, records, run.val_before, val_after, time.perf_counter() - start,
                       run.scorer.name)


def car_prune(model: nn.Module, data, layers: Sequence[str], keep: float = 0.5, step: int = 1,
              screen: int | None = None, compensate: bool = False, engine: str = "fast",
              memory_budget: int = DEFAULT_MEMORY_BUDGET,
              num_classes: int | None = None, progress: bool = True, inplace: bool = False,
              done: dict[str, LayerRecord] | None = None, val_before: float | None = None,
              on_step: Callable[[dict[str, LayerRecord], float], None] | None = None
              ) -> PruneResult:
    """Greedy CAR over `layers` in the order given; returns the pruned model and every step.

    data: the scoring set (a TensorDataset, DataLoader or iterable of (images, labels)).
    keep: per layer, a fraction in (0, 1) or a count of filters to keep.
    step: filters removed per re-scoring (1 is the paper's greedy; more is an approximation).
    screen: an approximation too: after a layer's first full scoring, re-score only the
    `screen` filters with the lowest CAR index at their last exact scoring (the cheap
    criterion: it costs nothing to compute); the rest keep their old index.
    compensate: refit the consumers of each candidate on the inputs left (least squares over
    the scoring set, compensation.py), when scoring it and when removing it.
    done, val_before: the records of an interrupted run; its removals are replayed first.
    on_step: called with all records so far after every removal (to save state).
    """
    check_approximation(step, screen)
    start = time.perf_counter()
    model, scoring, surgery = _open(model, data, num_classes, inplace)
    check_layers(surgery, layers)
    targets = {name: resolve_keep(keep, surgery.size(name), name) for name in layers}
    if int((scoring.class_totals() > 0).sum()) < 2:
        warnings.warn("the scoring set holds a single class: CAR still ranks filters, but "
                      "class importance is meaningless; score on data with several classes",
                      stacklevel=2)
    run = _start(surgery, scoring, engine, memory_budget, compensate, val_before)
    _check_cache(run, layers, memory_budget)
    records: dict[str, LayerRecord] = {}
    for name in layers:
        target = targets[name]
        record = records[name] = LayerRecord(surgery.size(name), target)
        last: dict[int, float] = {}  # original index -> CAR index at its last exact scoring
        _replay(run, name, done[name].steps if done and name in done else [], record, last)
        bar = tqdm(total=_candidates(surgery.size(name), target, step, screen, bool(last)),
                   desc=f"CAR {name}", unit="cand", disable=not (progress and dist.is_main()))
        while surgery.size(name) > target:
            removal = _greedy_step(run, name, min(step, surgery.size(name) - target), screen,
                                   last, bar)
            record.removed += removal.removed
            record.steps.append(removal)
            if on_step is not None:
                on_step(records, run.val_before)
        bar.close()
    return _finish(model, run, records, start)


def _check_cache(run: _Run, layers: Sequence[str], memory_budget: int) -> None:
    """Refuse at the start, not layers into the run, when exact CAR of a layer would cache more
    activations than the memory budget allows."""
    for name in layers:
        need = run.scorer.cache_bytes(run.surgery, name, run.scoring)
        if need > memory_budget:
            raise CarpruneError(f"exact CAR of {name!r} caches {need / 2**30:.1f} GiB of "
                                f"activations for {run.scoring.total} scoring images, over the "
                                f"memory budget of {memory_budget / 2**30:.1f} GiB; lower "
                                "--score-samples or raise --memory-budget")


def _replay(run: _Run, name: str, steps: Sequence[Step], record: LayerRecord,
            last: dict[int, float]) -> None:
    """Redo an interrupted run's removals in `name`, so that the run goes on where it stopped
    with the CAR indices it had; a step it never measured waits for the next scoring pass."""
    for past in steps:
        last.update(zip(past.candidates, past.car, strict=True))
        run.remove(name, [run.surgery.alive[name].index(o) for o in past.removed])
        record.removed += past.removed
        record.steps.append(past)
        run.pending = [past] if math.isnan(past.val_accuracy) else []


def _candidates(n: int, target: int, step: int, screen: int | None, scored: bool) -> int:
    """Candidates greedy CAR scores in a layer cut from `n` filters to `target`, for the
    progress bar: every filter left at each step, or only `screen` of them once the layer has
    been scored (`scored`: by the replayed steps of an interrupted run)."""
    return sum(min(k, screen or k) if i or scored else k
               for i, k in enumerate(_lefts(n, target, step)))


def _lefts(n: int, target: int, step: int) -> Iterator[int]:
    """The filters a layer has at each step of greedy CAR from `n` down to `target`."""
    while n > target:
        yield n
        n -= min(step, n - target)


def _greedy_step(run: _Run, name: str, count: int, screen: int | None, last: dict[int, float],
                 bar: tqdm) -> Step:
    """One step of greedy CAR in `name`: score its filters (with `screen`, only those with the
    lowest CAR index at their last scoring) and remove the `count` whose absence costs least."""
    alive = run.surgery.alive[name]
    channels = list(range(len(alive)))
    if screen and last:
        channels = sorted(sorted(channels, key=lambda c: (last[alive[c]], alive[c]))[:screen])
    units = [Unit(name, c) for c in channels]
    base, scores = run.scorer.score(run.surgery, units, run.scoring, bar.update)
    base_acc = float(base.accuracy()[0])
    run.measured(base_acc)
    original = [alive[c] for c in channels]
    picks = rank(scores, original)[:count]
    car = (base_acc - scores.accuracy()).tolist()
    last.update(zip(original, car, strict=True))
    removal = Step(run.remove(name, [channels[i] for i in picks]), float("nan"), original, car)
    run.pending = [removal]
    bar.set_postfix(left=run.surgery.size(name), best_car=f"{car[picks[0]]:+.4f}")
    return removal


def criterion_prune(model: nn.Module, data, layers: Sequence[str], criterion: str,
                    keep: float = 0.5, seed: int = 0, num_classes: int | None = None,
                    inplace: bool = False) -> PruneResult:
    """Prune by any other criterion (`criteria.py`): rank once per layer, remove the lowest."""
    from .criteria import ranking

    start = time.perf_counter()
    model, scoring, surgery = _open(model, data, num_classes, inplace)
    check_layers(surgery, layers)
    targets = {name: resolve_keep(keep, surgery.size(name), name) for name in layers}
    records = {}
    for name in layers:
        n = surgery.size(name)
        doomed = ranking(criterion, surgery, name, scoring, seed)[:n - targets[name]]
        records[name] = LayerRecord(n, targets[name], [surgery.alive[name][p] for p in doomed])
        surgery.remove(name, doomed)
    _record_history(model, surgery)
    return PruneResult(model, records, float("nan"), float("nan"),
                       time.perf_counter() - start, criterion)


@dataclass
class GlobalStep:
    layer: str                  # the unit's layer (the first layer of a coupled group)
    removed: list[int]          # original indices removed at this step
    car: float                  # accuracy lost without it (fraction of the scoring set)
    cost: float                 # MACs, parameters or milliseconds its removal saved
    val_accuracy: float         # scoring accuracy after the removal
    remaining: float            # the budgeted quantity left, as a fraction of the original


@dataclass
class GlobalProgress:
    """What a global run has done so far, and all it needs to go on after a kill: its steps
    round by round, what its ranking remembers of each unit's last exact scoring ((layer,
    original index) -> (images lost, loss gained)) over how many scored images, its scoring
    accuracy before, and what its budget measured (`_Budget.snapshot`)."""

    rounds: list[list[GlobalStep]]
    last: dict[tuple[str, int], tuple[int, float]]
    images: int
    val_before: float | None
    meter: dict


def efficiency(lost: float, saved: float) -> float:
    """Global CAR's ranking key, lowest first: what a removal loses per unit of cost it saves.
    A removal that gains (lost < 0) ranks by gain times saving instead, so that of two equal
    gains the one saving more goes first, and any gain ranks before any loss."""
    return lost / saved if lost > 0 else lost * saved


def _own_key(lost: float, worse: float, saved: float) -> tuple[float, float]:
    """A unit's (or block's) rank: images lost per saving, then loss gained per saving."""
    return efficiency(lost, saved), efficiency(worse, saved)


@dataclass
class _Block:
    key: tuple
    layer: str
    units: list[tuple[int, float]]  # (channel, cost saved)


def _blocks(layer: str, rank: int, units: list[tuple[int, float, int, int, int]], room: int,
            round_to: int, size: int) -> list[_Block]:
    """One layer's removals in the order they may go. Its units (channel, saving, images lost,
    loss gained, original index; all `size` of the layer's, or a shortlist) are ranked by their
    own efficiency and cut into blocks that each leave a multiple of `round_to` filters (the
    first block takes the remainder), at most `room` units in all. A block ranks by its
    summed loss per summed saving, never before the block ahead of it in its layer."""
    ranked = sorted(units, key=lambda u: (*_own_key(u[2], u[3], u[1]), u[4]))
    blocks, at, width, worst = [], 0, size % round_to or round_to, ()
    while at + width <= min(room, len(units)):
        part = ranked[at:at + width]
        saved = sum(u[1] for u in part)
        worst = max(worst, _own_key(sum(u[2] for u in part), sum(u[3] for u in part), saved))
        blocks.append(_Block((*worst, rank, at), layer, [(u[0], u[1]) for u in part]))
        at, width = at + width, round_to
    return blocks


def group_leaders(surgery: Surgery, layers: Sequence[str]) -> list[str]:
    """One layer per dependency group: coupled layers (a residual stage) are one set of units."""
    leaders, seen = [], set()
    for name in layers:
        producers = frozenset(id(dep.target.module) for dep, _ in surgery.unit_group(name, 0)
                              if isinstance(dep.target.module, nn.Conv2d))
        if producers not in seen:
            seen.add(producers)
            leaders.append(name)
    return leaders


def global_car_prune(model: nn.Module, data, target: float, layers: Sequence[str] | None = None,
                     budget: str = "macs", cost: str | None = None, min_keep: float = 0.1,
                     step: int = 1, screen: int | None = None, ignore: Sequence[str] = (),
                     round_to: int = 1, compensate: bool = False, engine: str = "fast",
                     memory_budget: int = DEFAULT_MEMORY_BUDGET, num_classes: int | None = None,
                     progress: bool = True, inplace: bool = False,
                     shortlist: int | None = None, race: int | None = None,
                     done: GlobalProgress | None = None,
                     on_round: Callable[[GlobalProgress], None] | None = None
                     ) -> tuple[PruneResult, list[GlobalStep]]:
    """Global CAR under a budget: every step scores the units of all `layers` (default: every
    prunable conv) and removes the one that loses the least scoring accuracy per unit of `cost`
    it saves, until the network meets the target.

    budget: "macs" or "params", with `target` the fraction of the original to keep; or
    "latency", with `target` the milliseconds per image (batch 1, median, this machine's
    threads) to reach, measured after every step.
    cost: what a removal saves, for the ranking: "macs", "params" (counted per dependency
    group) or "latency" (milliseconds per unit of each layer, measured once at the start);
    default the budget's own kind.
    Guard rails: each layer keeps at least `min_keep` of its filters, and never none.
    screen: an approximation, as in `car_prune`: after the first full scoring, each round
    re-scores only the `screen` units that rank first by their last exact scores (at today's
    costs); the rest keep their old scores.
    shortlist: an approximation for networks too big for exact rounds: every round, from the
    first, scores exactly only the `shortlist` units that a first-order estimate of their
    absence (scoring/first_order.py, one forward and backward pass) ranks first per saving,
    and removes the best `step` of them.
    race: with `shortlist`, an approximation that makes rounds cheaper still: the estimate
    and the shortlist's exact scores use the scoring set's first `race` images, and only the
    shortlist's best `2 * step` by those (the finalists) are scored on the whole set, which
    alone decides what goes.
    round_to: every layer the run prunes keeps a multiple of this many filters (CPU and GPU
    convolutions run fastest on widths that fill their vector registers, e.g. 8 or 16): a
    layer's units go in blocks, its next `round_to` by their own scores, ranked by the block's
    summed loss per summed saving; a round removes blocks until it has removed `step` units.
    compensate: as in `car_prune`, every candidate is scored, and every removal made, with
    its consumers refit by least squares.
    done: the progress of an interrupted run; its removals are replayed first.
    on_round: called with the progress so far after every round (to save state).
    """
    cost = cost or budget
    _check_global(target, budget, cost, min_keep, step, screen, round_to, shortlist, race)
    start = time.perf_counter()
    model, scoring, surgery = _open(model, data, num_classes, inplace)
    if race is not None and race >= scoring.total:
        raise CarpruneError(f"--race {race} must be fewer than the {scoring.total} scoring "
                            "images, or nothing is raced; lower it or drop it")
    leaders = group_leaders(surgery, _global_layers(surgery, layers, ignore))
    floors = {n: max(1, math.ceil(min_keep * surgery.size(n))) for n in leaders}
    records = {n: LayerRecord(surgery.size(n), surgery.size(n)) for n in leaders}
    meter = _Budget(budget, cost, target, model, scoring.example().shape[1:], surgery, leaders)
    run = _start(surgery, scoring, engine, memory_budget, compensate)
    ranking = _Ranking(surgery, leaders, floors, round_to)
    rounds = _replay_rounds(run, meter, ranking, records, done)
    mode = _Mode(step, screen, shortlist, progress and dist.is_main(),
                 run.scoring.subset(max(1, race // dist.world())) if race else None)
    if progress and meter.left > meter.target:  # every process scores the timed candidates
        _estimate(run, meter, ranking, mode)
    while meter.left > meter.target:
        removals = _round(run, meter, ranking, mode, records, len(rounds) + 1)
        if removals is None:
            blocked = " or a --round-to block above it" if round_to > 1 else ""
            warnings.warn(f"every layer is at its --min-keep floor{blocked} with "
                          f"{meter.left:.1%} of the {budget} left, short of the target "
                          f"{meter.target:.0%}; lower --min-keep"
                          f"{' or --round-to' if round_to > 1 else ''}", stacklevel=2)
            break
        rounds.append(removals)
        if on_round is not None:
            on_round(GlobalProgress(rounds, ranking.last, ranking.images, run.val_before,
                                    meter.snapshot()))
    return _finish(model, run, records, start), [st for r in rounds for st in r]


def _estimate(run: _Run, meter: _Budget, ranking: _Ranking, mode: _Mode) -> None:
    """Before the first round: time a few candidates of each layer and say what an exact round
    and this run will take (estimate.py)."""
    layers = ranking.open_layers()
    sizes = {n: run.surgery.size(n) for n in layers}
    per = estimate.layer_costs(run.scorer, run.surgery, layers, run.scoring)
    start = time.perf_counter()
    if mode.shortlist:
        first_order(run.surgery, layers, mode.race or run.scoring)
    units = sum(sizes.values())
    rounds, seconds = estimate.run_seconds(
        per, sizes, round(units * (1 - meter.target)), mode.step, mode.screen, mode.shortlist,
        time.perf_counter() - start, mode.race.total / run.scoring.total if mode.race else None)
    how = (f"--shortlist {mode.shortlist}" if mode.shortlist else
           f"--screen {mode.screen}" if mode.screen else "exact") + f", --step {mode.step}"
    how += f", --race {mode.race.total}" if mode.race else ""
    if mode.show:
        tqdm.write(f"global CAR: {units} units in {len(layers)} groups on {run.scoring.total} "
                   f"images; one exact scoring round takes about "
                   f"{estimate.say(estimate.round_seconds(per, sizes))} (timed "
                   f"{sum(estimate.SAMPLE) + 1} candidates a group); this run ({how}): "
                   f"about {rounds} rounds, {estimate.say(seconds)}")


def _replay_rounds(run: _Run, meter: _Budget, ranking: _Ranking, records: dict[str, LayerRecord],
                   done: GlobalProgress | None) -> list[list[GlobalStep]]:
    """Redo an interrupted global run's removals in order (refits included) and restore what
    its ranking and budget knew, so that the run goes on where it stopped; the steps it never
    measured wait for the next scoring pass. Returns its rounds (none for a fresh run)."""
    if done is None:
        return []
    for past in (st for r in done.rounds for st in r):
        run.remove(past.layer, [run.surgery.alive[past.layer].index(o) for o in past.removed])
        records[past.layer].removed += past.removed
        records[past.layer].filters_after = run.surgery.size(past.layer)
    ranking.last, ranking.images = dict(done.last), done.images
    meter.restore(done.meter)
    run.val_before = done.val_before
    run.pending = [st for r in done.rounds for st in r if math.isnan(st.val_accuracy)]
    return list(done.rounds)


def _check_global(target: float, budget: str, cost: str, min_keep: float, step: int,
                  screen: int | None, round_to: int, shortlist: int | None = None,
                  race: int | None = None) -> None:
    """Refuse settings of global CAR that make no sense, before any work."""
    for kind in (budget, cost):
        if kind not in ("macs", "params", "latency"):
            raise CarpruneError(f"unknown budget or cost {kind!r}; use macs, params or latency")
    if budget != "latency" and not 0 < target < 1:
        raise CarpruneError(f"the target must be a fraction in (0, 1) of the original "
                            f"{budget}, got {target}")
    check_approximation(step, screen)
    check_global(round_to, min_keep)
    check_shortlist(shortlist, step, screen, race)


def _global_layers(surgery: Surgery, layers: Sequence[str] | None,
                   ignore: Sequence[str]) -> list[str]:
    """The layers global CAR prunes: `layers` (default every prunable conv) less `ignore`."""
    for name in ignore:
        surgery.check_layer(name)
    chosen = [n for n in (layers or surgery.conv_layers()) if n not in set(ignore)]
    check_layers(surgery, chosen)
    return chosen


class _Budget:
    """What global CAR spends: the network's MACs, parameters or latency (`kind`), followed as
    a fraction of the original down to the `target` fraction, and what each unit's removal
    saves by the ranking's `cost`."""

    def __init__(self, kind: str, cost: str, target: float, model: nn.Module,
                 shape: Sequence[int], surgery: Surgery, leaders: Sequence[str]) -> None:
        self.kind, self.cost, self.surgery = kind, cost, surgery
        self.model, self.shape = model, shape
        self.original = self.amount()
        if kind == "latency":
            if not 0 < target < self.original:
                raise CarpruneError(f"--target-latency-ms must be below the network's measured "
                                    f"{self.original:.3f} ms per image (batch 1), got {target}")
            target = target / self.original
        self.target = target
        self.left = 1.0
        # a latency cost: milliseconds per unit of each layer, measured once at the start
        self.per_unit = measure.latency_costs(surgery, leaders) if cost == "latency" else {}

    def snapshot(self) -> dict:
        """What the budget knows, JSON-ready: a resumed run goes on with the latencies the
        interrupted one measured, not new ones."""
        return {"original": self.original, "target": self.target, "left": self.left,
                "per_unit": self.per_unit}

    def restore(self, saved: dict) -> None:
        """Go on from what `snapshot` returned in an interrupted run."""
        self.original, self.target = saved["original"], saved["target"]
        self.left, self.per_unit = saved["left"], dict(saved["per_unit"])

    def amount(self) -> float:
        """The budgeted quantity of the network as it is now (a latency is measured anew)."""
        if self.kind == "latency":
            return measure.latency_ms(self.model, self.shape, repeats=20)
        return measure.macs_params(self.model, self.shape)[self.kind == "params"]

    def spent(self) -> float:
        """What is left after a removal, as a fraction of the original."""
        self.left = self.amount() / self.original
        return self.left

    def need(self) -> float:
        """What a round must still save to meet the target, so that it stops early once its
        savings cover it: known only when the ranking's cost is what the budget counts, and
        never for a latency, which is measured rather than summed."""
        if self.cost == self.kind != "latency":
            return (self.left - self.target) * self.original
        return math.inf

    def savings(self, layers: Sequence[str]) -> dict[Unit, float]:
        """What removing each unit of `layers` saves, by the ranking's cost."""
        if self.cost == "latency":
            costs = {n: [self.per_unit[n]] * self.surgery.size(n) for n in layers}
        else:
            costs = measure.unit_costs(self.surgery, layers, self.cost)
        return {Unit(n, c): saved for n in layers for c, saved in enumerate(costs[n])}


class _Ranking:
    """The order in which global CAR removes units: by what each lost at its last exact
    scoring (a screened round re-scores only some) per unit of today's saving, ties broken by
    layer (in `leaders` order), then original index; in blocks of `round_to` per layer, and no
    layer below its floor."""

    def __init__(self, surgery: Surgery, leaders: list[str], floors: dict[str, int],
                 round_to: int) -> None:
        self.surgery, self.leaders = surgery, leaders
        self.floors, self.round_to = floors, round_to
        # (layer, original index) -> (images lost, loss gained) at the unit's last exact scoring
        self.last: dict[tuple[str, int], tuple[int, float]] = {}
        self.images = 0  # scored images, over all processes
        self.traced: fx.GraphModule | None = None  # the model's graph, for the estimate

    def open_layers(self) -> list[str]:
        """The layers above their floor: those a round may still prune."""
        return [n for n in self.leaders if self.surgery.size(n) > self.floors[n]]

    def learn(self, units: Sequence[Unit], base: Scores, scores: Scores) -> None:
        """Keep what each scored unit's absence loses: images, and loss in millionths of the
        largest loss, so that engines that sum in a different order still rank alike."""
        quantum = (float(scores.loss.abs().max()) or 1.0) * 1e-6
        self.images = base.total
        for i, u in enumerate(units):
            self.last[u.layer, self.surgery.alive[u.layer][u.channel]] = (
                int(base.correct[0]) - int(scores.correct[i]),
                round((float(scores.loss[i]) - float(base.loss[0])) / quantum))

    def unit_key(self, unit: Unit, saved: float) -> tuple:
        """A unit's rank by its last scores when its removal saves `saved`."""
        original = self.surgery.alive[unit.layer][unit.channel]
        return (*_own_key(*self.last[unit.layer, original], saved),
                self.leaders.index(unit.layer), original)

    def screened(self, saving_of: dict[Unit, float], screen: int | None,
                 shortlist: int | None, scoring: ScoringSet) -> list[Unit]:
        """The units a round scores: all; or once each has a score, the `screen` that rank
        first by their last scores; or the `shortlist` that rank first by their first-order
        estimate per saving (summed over all processes)."""
        units = list(saving_of)
        if shortlist:
            self.traced = self.traced or trace(self.surgery.model)
            estimate = first_order(self.surgery, list(dict.fromkeys(u.layer for u in units)),
                                   scoring, self.traced)
            values = torch.tensor([estimate[u] for u in units], dtype=torch.float64)
            if dist.active():
                dist.all_reduce_tensor(values)
            key = {u: (float(v) / max(saving_of[u], 1e-12), self.leaders.index(u.layer),
                       u.channel) for u, v in zip(units, values, strict=True)}
            units = sorted(units, key=key.__getitem__)[:shortlist]
        elif screen and self.last:
            units = sorted(units, key=lambda u: self.unit_key(u, saving_of[u]))[:screen]
        return units

    def blocks(self, layers: Sequence[str], saving_of: dict[Unit, float],
               only: set[Unit] | None = None) -> list[_Block]:
        """Every block of `layers` (of their units in `only`, when given) that may go, in each
        layer's order."""
        return [b for n in layers for b in _blocks(
            n, self.leaders.index(n), [(c, saving_of[Unit(n, c)], *self.last[n, o], o)
                                       for c, o in enumerate(self.surgery.alive[n])
                                       if only is None or Unit(n, c) in only],
            self.surgery.size(n) - self.floors[n], self.round_to, self.surgery.size(n))]

    def lost(self, layer: str, channels: Sequence[int]) -> int:
        """Images the absence of each of `channels` lost at its last scoring, summed."""
        return sum(self.last[layer, self.surgery.alive[layer][c]][0] for c in channels)


@dataclass
class _Mode:
    """How global CAR's rounds score: `step` removals a round, and the approximations
    `screen` or `shortlist` (see global_car_prune); `show` prints progress."""

    step: int
    screen: int | None
    shortlist: int | None
    show: bool
    race: ScoringSet | None  # the first images, that a raced shortlist is scored on first


def _round(run: _Run, meter: _Budget, ranking: _Ranking, mode: _Mode,
           records: dict[str, LayerRecord], number: int) -> list[GlobalStep] | None:
    """One round of global CAR: score the (screened or shortlisted) units of the layers above
    their floors, with a progress bar, then remove the best blocks until `step` units have
    gone or the savings cover what the budget still needs. None when no block can go."""
    layers = ranking.open_layers()
    saving_of = meter.savings(layers)
    start = time.perf_counter()
    units = ranking.screened(saving_of, mode.screen, mode.shortlist, mode.race or run.scoring)
    raced = f"raced {len(units)} units on {mode.race.total} images, " if mode.race else ""
    if units and mode.race:
        units = _finalists(run, ranking, units, saving_of, mode)
    if units:
        with tqdm(total=len(units), desc=f"global CAR round {number}", unit="cand",
                  leave=False, disable=not mode.show) as bar:
            base, scores = run.scorer.score(run.surgery, units, run.scoring, bar.update)
        run.measured(float(base.accuracy()[0]))
        ranking.learn(units, base, scores)
    blocks = ranking.blocks(layers, saving_of, set(units) if mode.shortlist else None)
    if not blocks:
        return None
    removals = [_take(run, meter, ranking, records, name, chosen)
                for name, chosen in _pick(blocks, mode.step, meter.need()).items()]
    if mode.show:
        gone = sum(len(r.removed) for r in removals)
        tqdm.write(f"round {number}: {raced}scored {len(units)} units in "
                   f"{time.perf_counter() - start:.1f} s, removed {gone}, "
                   f"{meter.left:.1%} of the {meter.kind} left (target {meter.target:.1%})")
    return removals


def _finalists(run: _Run, ranking: _Ranking, units: list[Unit], saving_of: dict[Unit, float],
               mode: _Mode) -> list[Unit]:
    """A raced shortlist's `2 * step` best units by their exact scores on the race's images."""
    base, scores = run.scorer.score(run.surgery, units, mode.race)
    lost = base.correct[0] - scores.correct
    gained = scores.loss - base.loss[0]
    key = {u: (*_own_key(int(lost[i]), float(gained[i]), saving_of[u]),
               ranking.leaders.index(u.layer), u.channel) for i, u in enumerate(units)}
    return sorted(units, key=key.__getitem__)[:2 * mode.step]


def _pick(blocks: list[_Block], step: int, need: float) -> dict[str, list[tuple[int, float]]]:
    """A round's removals per layer, (channel, saving) each: the best blocks until the round
    has `step` units or its savings reach `need`."""
    picked: dict[str, list[tuple[int, float]]] = {}
    saving = 0.0
    for block in sorted(blocks, key=lambda b: b.key):
        if sum(map(len, picked.values())) >= step or saving >= need:
            break
        picked.setdefault(block.layer, []).extend(block.units)
        saving += sum(saved for _, saved in block.units)
    return picked


def _take(run: _Run, meter: _Budget, ranking: _Ranking, records: dict[str, LayerRecord],
          name: str, chosen: list[tuple[int, float]]) -> GlobalStep:
    """Remove a round's picks from one layer; its step records what is left of the budget."""
    channels = [c for c, _ in chosen]
    car = ranking.lost(name, channels) / ranking.images
    removed = run.remove(name, channels)
    records[name].removed += removed
    records[name].filters_after = run.surgery.size(name)
    removal = GlobalStep(name, removed, car, sum(s for _, s in chosen), float("nan"),
                         meter.spent())
    run.pending.append(removal)
    return removal
