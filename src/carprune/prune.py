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

from . import dist
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


def car_prune(model: nn.Module, data, layers: Sequence[str], keep: float = 0.5, step: int = 1,
              engine: str = "fast", memory_budget: int = DEFAULT_MEMORY_BUDGET,
              num_classes: int | None = None, progress: bool = True, inplace: bool = False,
              done: dict[str, LayerRecord] | None = None, val_before: float | None = None,
              on_step: Callable[[dict[str, LayerRecord], float], None] | None = None
              ) -> PruneResult:
    """Greedy CAR over `layers` in the order given; returns the pruned model and every step.

    data: the scoring set (a TensorDataset, DataLoader or iterable of (images, labels)).
    keep: per layer, a fraction in (0, 1) or a count of filters to keep.
    step: filters removed per re-scoring (1 is the paper's greedy; more is an approximation).
    done, val_before: the records of an interrupted run; its removals are replayed first.
    on_step: called with all records so far after every removal (to save state).
    """
    if step < 1:
        raise CarpruneError(f"step must be at least 1, got {step}")
    start = time.perf_counter()
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    scoring = ScoringSet.from_any(data, num_classes)
    prior = getattr(model, "carprune_spec", {}).get("pruning_history", [])
    surgery = Surgery(model, scoring.example(), prior_history=prior)
    check_layers(surgery, layers)
    targets = {name: resolve_keep(keep, surgery.size(name), name) for name in layers}
    if int((scoring.class_totals() > 0).sum()) < 2:
        warnings.warn("the scoring set holds a single class: CAR still ranks filters, but "
                      "class importance is meaningless; score on data with several classes",
                      stacklevel=2)
    scorer = make_engine(engine, memory_budget)
    if dist.active():
        scoring, scorer = dist.shard(scoring), dist.ShardedEngine(scorer)
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
        for past in (done or {}).get(name, LayerRecord(n, target)).steps:
            surgery.remove(name, [surgery.alive[name].index(o) for o in past.removed])
            record.removed += past.removed
            record.steps.append(past)
            pending = past if math.isnan(past.val_accuracy) else None
        bar = tqdm(total=sum(_lefts(n, target, step)), desc=f"CAR {name}", unit="cand",
                   disable=not (progress and dist.is_main()))
        while surgery.size(name) > target:
            units = [Unit(name, c) for c in range(surgery.size(name))]
            base, scores = scorer.score(surgery, units, scoring, bar.update)
            base_acc = float(base.accuracy()[0])
            val_before = base_acc if val_before is None else val_before
            if pending is not None:
                pending.val_accuracy = base_acc
            original = list(surgery.alive[name])
            chosen = rank(scores, original)[:min(step, surgery.size(name) - target)]
            car = (base_acc - scores.accuracy()).tolist()
            pending = Step(surgery.remove(name, chosen), float("nan"), original, car)
            record.removed += pending.removed
            record.steps.append(pending)
            bar.set_postfix(left=surgery.size(name), best_car=f"{car[chosen[0]]:+.4f}")
            if on_step is not None:
                on_step(records, val_before)
        bar.close()
    val_after = float(scorer.score(surgery, [], scoring)[0].accuracy()[0])
    if pending is not None:
        pending.val_accuracy = val_after
    spec = dict(getattr(model, "carprune_spec", {}))
    spec["pruning_history"] = surgery.history()
    model.carprune_spec = spec
    return PruneResult(model, records, val_before if val_before is not None else val_after,
                       val_after, time.perf_counter() - start, scorer.name)


def criterion_prune(model: nn.Module, data, layers: Sequence[str], criterion: str,
                    keep: float = 0.5, seed: int = 0, num_classes: int | None = None,
                    inplace: bool = False) -> PruneResult:
    """Prune by any other criterion (`criteria.py`): rank once per layer, remove the lowest."""
    from .criteria import ranking

    start = time.perf_counter()
    model = model if inplace else copy.deepcopy(model)
    scoring = ScoringSet.from_any(data, num_classes)
    prior = getattr(model, "carprune_spec", {}).get("pruning_history", [])
    surgery = Surgery(model.eval(), scoring.example(), prior_history=prior)
    check_layers(surgery, layers)
    targets = {name: resolve_keep(keep, surgery.size(name), name) for name in layers}
    records = {}
    for name in layers:
        n = surgery.size(name)
        doomed = ranking(criterion, surgery, name, scoring, seed)[:n - targets[name]]
        records[name] = LayerRecord(n, targets[name], [surgery.alive[name][p] for p in doomed])
        surgery.remove(name, doomed)
    spec = dict(getattr(model, "carprune_spec", {}))
    spec["pruning_history"] = surgery.history()
    model.carprune_spec = spec
    return PruneResult(model, records, float("nan"), float("nan"),
                       time.perf_counter() - start, criterion)


def _lefts(n: int, target: int, step: int):
    while n > target:
        yield n
        n -= min(step, n - target)
