"""Greedy CAR pruning (Abbasi-Asl & Yu): per layer, remove the filter whose absence costs the
least scoring accuracy, re-score every remaining filter on the new network, repeat."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict

from torch import nn
from tqdm.auto import tqdm

from .. import dist
from ..errors import CarpruneError
from ..groups import Unit
from ..scoring import EngineOptions
from ..scoring.rule import rank
from .records import LayerRecord, PruneResult, Step
from .run import Run, check_layers, finish, open_surgery, start
from .settings import Approximation, Resume, resolve_keep


def car_prune(model: nn.Module, data, layers: Sequence[str], keep: float = 0.5,
              approx: Approximation = Approximation(), engine: EngineOptions = EngineOptions(),
              progress: bool = True, resume: Resume | None = None,
              classes: Sequence[str | int] | None = None) -> PruneResult:
    """Greedy CAR over `layers` in the order given; returns the pruned copy of the model and
    every step.

    data: the scoring set (a TensorDataset, DataLoader or iterable of (images, labels)).
    keep: per layer, a fraction in (0, 1) or a count of filters to keep.
    approx: `step` and `screen` (settings.Approximation); exact greedy CAR by default.
    engine: the scoring engine, its memory budget, and least-squares compensation.
    resume: an interrupted run's records (and accuracy before) to replay first, and a function
    called with all records so far after every removal (to save state).
    classes: specialise the network to these classes (names or output indices, at least two):
    its classifier keeps their outputs only, the scoring set their images, and CAR measures
    the accuracy on them (classes.py).
    """
    began = time.perf_counter()
    approx = Approximation.per_layer(**asdict(approx))
    resume = resume or Resume()
    scoring, surgery = open_surgery(model, data, classes)
    check_layers(surgery, layers)
    targets = {name: resolve_keep(keep, surgery.size(name), name) for name in layers}
    if int((scoring.class_totals() > 0).sum()) < 2:
        warnings.warn("the scoring set holds a single class: CAR still ranks filters, but "
                      "class importance is meaningless; score on data with several classes",
                      stacklevel=2)
    run = start(surgery, scoring, engine, began, resume.val_before)
    _check_cache(run, layers, engine.memory_budget)
    records: dict[str, LayerRecord] = {}
    for name in layers:
        target = targets[name]
        record = records[name] = LayerRecord(surgery.size(name), target)
        last: dict[int, float] = {}  # original index -> CAR index at its last exact scoring
        _replay(run, name, resume.done[name].steps if resume.done and name in resume.done
                else [], record, last)
        bar = tqdm(total=_candidates(surgery.size(name), target, approx, bool(last)),
                   desc=f"CAR {name}", unit="cand", disable=not (progress and dist.is_main()))
        while surgery.size(name) > target:
            removal = _greedy_step(run, name, min(approx.step, surgery.size(name) - target),
                                   approx.screen, last, bar)
            record.removed += removal.removed
            record.steps.append(removal)
            if resume.on_step is not None:
                resume.on_step(records, run.val_before)
        bar.close()
    return finish(run, records)


def _check_cache(run: Run, layers: Sequence[str], memory_budget: int) -> None:
    """Refuse at the start, not layers into the run, when exact CAR of a layer would cache more
    activations than the memory budget allows."""
    for name in layers:
        need = run.engine.cache_bytes(run.surgery, name, run.scoring)
        if need > memory_budget:
            raise CarpruneError(f"exact CAR of {name!r} caches {need / 2**30:.1f} GiB of "
                                f"activations for {run.scoring.total} scoring images, over the "
                                f"memory budget of {memory_budget / 2**30:.1f} GiB; lower "
                                "--score-samples or raise --memory-budget")


def _replay(run: Run, name: str, steps: Sequence[Step], record: LayerRecord,
            last: dict[int, float]) -> None:
    """Redo an interrupted run's removals in `name`, so that the run goes on where it stopped
    with the CAR indices it had; a step it never measured waits for the next scoring pass."""
    for past in steps:
        last.update(zip(past.candidates, past.car, strict=True))
        run.replay(name, past.removed)
        record.removed += past.removed
        record.steps.append(past)
        run.pending = [past] if math.isnan(past.val_accuracy) else []


def _candidates(n: int, target: int, approx: Approximation, scored: bool) -> int:
    """Candidates greedy CAR scores in a layer cut from `n` filters to `target`, for the
    progress bar: every filter left at each step, or only `screen` of them once the layer has
    been scored (`scored`: by the replayed steps of an interrupted run)."""
    return sum(min(k, approx.screen or k) if i or scored else k
               for i, k in enumerate(_lefts(n, target, approx.step)))


def _lefts(n: int, target: int, step: int) -> Iterator[int]:
    """The filters a layer has at each step of greedy CAR from `n` down to `target`."""
    while n > target:
        yield n
        n -= min(step, n - target)


def _greedy_step(run: Run, name: str, count: int, screen: int | None, last: dict[int, float],
                 bar: tqdm) -> Step:
    """One step of greedy CAR in `name`: score its filters (with `screen`, only those with the
    lowest CAR index at their last scoring) and remove the `count` whose absence costs least."""
    alive = run.surgery.alive[name]
    channels = list(range(len(alive)))
    if screen and last:
        channels = sorted(sorted(channels, key=lambda c: (last[alive[c]], alive[c]))[:screen])
    units = [Unit(name, c) for c in channels]
    base, scores = run.engine.score(run.surgery, units, run.scoring, bar.update)
    base_acc = float(base.accuracy()[0])
    run.measured(base_acc)
    original = [alive[c] for c in channels]
    picks = rank(base, scores, original)[:count]
    car = (base_acc - scores.accuracy()).tolist()
    last.update(zip(original, car, strict=True))
    removal = Step(run.remove(name, [channels[i] for i in picks]), float("nan"), original, car)
    run.pending = [removal]
    bar.set_postfix(left=run.surgery.size(name), best_car=f"{car[picks[0]]:+.4f}")
    return removal
