"""Greedy CAR pruning (Abbasi-Asl & Yu): per layer, remove the filter whose absence costs the
least scoring accuracy, re-score every remaining filter on the new network, repeat."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from torch import nn
from tqdm.auto import tqdm

from . import compensation, dist
from .errors import CarpruneError
from .groups import Surgery, Unit
from .scoring import DEFAULT_MEMORY_BUDGET, ScoringSet, make_engine, rank


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


def resolve_keep(keep: float, n: int, layer: str) -> int:
    """Filters to keep: a fraction strictly between 0 and 1, or a whole count >= 1."""
    if not math.isfinite(keep) or keep <= 0:
        raise CarpruneError(f"keep must be a fraction in (0, 1) or a count >= 1, got {keep}")
    if keep < 1:
        target = math.floor(keep * n + 0.5)
        if target < 1:
            raise CarpruneError(f"keep {keep} leaves no filter of the {n} in {layer!r}; use a "
                                f"fraction of at least {1 / (2 * n):.3f} or a count >= 1")
        return target
    if keep != int(keep):
        raise CarpruneError(f"keep {keep} is neither a fraction below 1 nor a whole count; "
                            "use e.g. 0.5 or 16")
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
    scorer = make_engine(engine, memory_budget, compensate)
    if dist.active():
        scoring, scorer = dist.shard(scoring), dist.ShardedEngine(scorer)
    remove = _remover(surgery, scoring, compensate)
    for name in layers:
        need = scorer.cache_bytes(surgery, name, scoring)
        if need > memory_budget:
            raise CarpruneError(f"exact CAR of {name!r} caches {need / 2**30:.1f} GiB of "
                                f"activations for {scoring.total} scoring images, over the "
                                f"memory budget of {memory_budget / 2**30:.1f} GiB; lower "
                                "--score-samples or raise --memory-budget")
    records: dict[str, LayerRecord] = {}
    pending: Step | None = None  # the last step, until the next scoring pass measures it
    for name in layers:
        n, target = surgery.size(name), targets[name]
        record = records[name] = LayerRecord(n, target)
        last: dict[int, float] = {}  # original index -> CAR index at its last exact scoring
        for past in (done or {}).get(name, LayerRecord(n, target)).steps:
            last.update(zip(past.candidates, past.car, strict=True))
            remove(name, [surgery.alive[name].index(o) for o in past.removed])
            record.removed += past.removed
            record.steps.append(past)
            pending = past if math.isnan(past.val_accuracy) else None
        sizes = list(_lefts(surgery.size(name), target, step))
        bar = tqdm(total=sum(min(k, screen or k) if i or last else k
                             for i, k in enumerate(sizes)),
                   desc=f"CAR {name}", unit="cand", disable=not (progress and dist.is_main()))
        while surgery.size(name) > target:
            alive = surgery.alive[name]
            channels = list(range(len(alive)))
            if screen and last:
                channels = sorted(sorted(channels, key=lambda c: (last[alive[c]], alive[c]))
                                  [:screen])
            units = [Unit(name, c) for c in channels]
            base, scores = scorer.score(surgery, units, scoring, bar.update)
            base_acc = float(base.accuracy()[0])
            val_before = base_acc if val_before is None else val_before
            if pending is not None:
                pending.val_accuracy = base_acc
            original = [alive[c] for c in channels]
            picks = rank(scores, original)[:min(step, surgery.size(name) - target)]
            car = (base_acc - scores.accuracy()).tolist()
            last.update(zip(original, car, strict=True))
            pending = Step(remove(name, [channels[i] for i in picks]), float("nan"),
                           original, car)
            record.removed += pending.removed
            record.steps.append(pending)
            bar.set_postfix(left=surgery.size(name), best_car=f"{car[picks[0]]:+.4f}")
            if on_step is not None:
                on_step(records, val_before)
        bar.close()
    val_after = float(scorer.score(surgery, [], scoring)[0].accuracy()[0])
    if pending is not None:
        pending.val_accuracy = val_after
    _record_history(model, surgery)
    return PruneResult(model, records, val_before if val_before is not None else val_after,
                       val_after, time.perf_counter() - start, scorer.name)


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


def _remover(surgery: Surgery, scoring: ScoringSet,
             compensate: bool) -> Callable[[str, Sequence[int]], list[int]]:
    """How chosen channels leave: physically, after a least-squares refit of their consumers
    when compensating."""
    if compensate:
        return lambda layer, channels: compensation.remove(surgery, layer, channels,
                                                           scoring.batches)
    return surgery.remove


def _lefts(n: int, target: int, step: int):
    while n > target:
        yield n
        n -= min(step, n - target)


@dataclass
class GlobalStep:
    layer: str                  # the unit's layer (the first layer of a coupled group)
    removed: list[int]          # original indices removed at this step
    car: float                  # accuracy lost without it (fraction of the scoring set)
    cost: float                 # MACs, parameters or milliseconds its removal saved
    val_accuracy: float         # scoring accuracy after the removal
    remaining: float            # the budgeted quantity left, as a fraction of the original


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
            round_to: int) -> list[_Block]:
    """One layer's removals in the order they may go. Its units (channel, saving, images lost,
    loss gained, original index) are ranked by their own efficiency and cut into blocks that
    each leave a multiple of `round_to` filters (the first block takes the remainder), at most
    `room` units in all. A block ranks by its summed loss per summed saving, never before the
    block ahead of it in its layer."""
    ranked = sorted(units, key=lambda u: (*_own_key(u[2], u[3], u[1]), u[4]))
    blocks, at, width, worst = [], 0, len(units) % round_to or round_to, ()
    while at + width <= room:
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
                     progress: bool = True, inplace: bool = False) -> tuple[PruneResult,
                                                                            list[GlobalStep]]:
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
    round_to: every layer the run prunes keeps a multiple of this many filters (CPU and GPU
    convolutions run fastest on widths that fill their vector registers, e.g. 8 or 16): a
    layer's units go in blocks, its next `round_to` by their own scores, ranked by the block's
    summed loss per summed saving; a round removes blocks until it has removed `step` units.
    compensate: as in `car_prune`, every candidate is scored, and every removal made, with
    its consumers refit by least squares.
    """
    from .measure import latency_costs, latency_ms, macs_params, unit_costs

    kinds = ("macs", "params", "latency")
    cost = cost or budget
    for kind in (budget, cost):
        if kind not in kinds:
            raise CarpruneError(f"unknown budget or cost {kind!r}; use macs, params or latency")
    if budget != "latency" and not 0 < target < 1:
        raise CarpruneError(f"the target must be a fraction in (0, 1) of the original "
                            f"{budget}, got {target}")
    check_approximation(step, screen)
    if round_to < 1:
        raise CarpruneError(f"--round-to must be a whole number >= 1, got {round_to}")
    if not 0 <= min_keep < 1:
        raise CarpruneError(f"--min-keep must be a fraction in [0, 1), got {min_keep}")
    start = time.perf_counter()
    model, scoring, surgery = _open(model, data, num_classes, inplace)
    for name in ignore:
        surgery.check_layer(name)
    chosen_layers = [n for n in (layers or surgery.conv_layers()) if n not in set(ignore)]
    check_layers(surgery, chosen_layers)
    leaders = group_leaders(surgery, chosen_layers)
    floors = {n: max(1, math.ceil(min_keep * surgery.size(n))) for n in leaders}
    records = {n: LayerRecord(surgery.size(n), surgery.size(n)) for n in leaders}
    shape = scoring.example().shape[1:]

    def amount() -> float:
        if budget == "latency":
            return latency_ms(model, shape, repeats=20)
        return macs_params(model, shape)[budget == "params"]

    original = amount()
    if budget == "latency":
        if not 0 < target < original:
            raise CarpruneError(f"--target-latency-ms must be below the network's measured "
                                f"{original:.3f} ms per image (batch 1), got {target}")
        target = target / original
    per_unit = latency_costs(surgery, leaders) if cost == "latency" else {}

    def costs_of(name: str) -> list[float]:
        if cost == "latency":
            return [per_unit[name]] * surgery.size(name)
        return unit_costs(surgery, name, cost)

    scorer = make_engine(engine, memory_budget, compensate)
    if dist.active():
        scoring, scorer = dist.shard(scoring), dist.ShardedEngine(scorer)
    remove = _remover(surgery, scoring, compensate)
    steps: list[GlobalStep] = []
    pending: list[GlobalStep] = []  # this round's steps, until the next pass measures them
    left = 1.0
    bar = tqdm(total=round(100 * (1 - target)), desc=f"global CAR to {target:.0%} {budget}",
               unit="%", disable=not (progress and dist.is_main()))
    val_before = None
    # (layer, original index) -> (images lost, loss gained) at the unit's last exact scoring
    last: dict[tuple[str, int], tuple[int, float]] = {}

    def key(u: Unit, saved: float) -> tuple:
        original = surgery.alive[u.layer][u.channel]
        return (*_own_key(*last[u.layer, original], saved), leaders.index(u.layer), original)

    while left > target:
        open_layers = [n for n in leaders if surgery.size(n) > floors[n]]
        saving_of = {Unit(n, c): saved for n in open_layers
                     for c, saved in enumerate(costs_of(n))}
        units = list(saving_of)
        if screen and last:
            units = sorted(units, key=lambda u: key(u, saving_of[u]))[:screen]
        if units:
            base, scores = scorer.score(surgery, units, scoring)
            base_acc = float(base.accuracy()[0])
            val_before = base_acc if val_before is None else val_before
            for st in pending:
                st.val_accuracy = base_acc
            pending = []
            quantum = (float(scores.loss.abs().max()) or 1.0) * 1e-6
            for i, u in enumerate(units):
                last[u.layer, surgery.alive[u.layer][u.channel]] = (
                    int(base.correct[0]) - int(scores.correct[i]),
                    round((float(scores.loss[i]) - float(base.loss[0])) / quantum))
        blocks = [b for n in open_layers for b in _blocks(
            n, leaders.index(n), [(c, saving_of[Unit(n, c)], *last[n, o], o)
                                  for c, o in enumerate(surgery.alive[n])],
            surgery.size(n) - floors[n], round_to)]
        if not blocks:
            blocked = " or a --round-to block above it" if round_to > 1 else ""
            warnings.warn(f"every layer is at its --min-keep floor{blocked} with {left:.1%} "
                          f"of the {budget} left, short of the target {target:.0%}; lower "
                          f"--min-keep{' or --round-to' if round_to > 1 else ''}", stacklevel=2)
            break
        # a round stops early once its savings cover what the budget still needs
        need = (left - target) * original if cost == budget != "latency" else math.inf
        picked: dict[str, list[tuple[int, float]]] = {}
        saving = 0.0
        for block in sorted(blocks, key=lambda b: b.key):
            if sum(map(len, picked.values())) >= step or saving >= need:
                break
            picked.setdefault(block.layer, []).extend(block.units)
            saving += sum(saved for _, saved in block.units)
        for name, chosen in picked.items():
            channels = [c for c, _ in chosen]
            car = sum(last[name, surgery.alive[name][c]][0] for c in channels) / scoring.total
            removed = remove(name, channels)
            records[name].removed += removed
            records[name].filters_after = surgery.size(name)
            now = amount() / original
            pending.append(GlobalStep(name, removed, car, sum(s for _, s in chosen),
                                      float("nan"), now))
            steps.append(pending[-1])
            bar.update(max(0, round(100 * (1 - now)) - bar.n))
            left = now
    bar.close()
    val_after = float(scorer.score(surgery, [], scoring)[0].accuracy()[0])
    for st in pending:
        st.val_accuracy = val_after
    _record_history(model, surgery)
    result = PruneResult(model, records, val_before if val_before is not None else val_after,
                         val_after, time.perf_counter() - start, scorer.name)
    return result, steps
