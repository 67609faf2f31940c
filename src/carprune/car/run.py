"""What both CAR loops run on: the surgery of their copy of the network, the scoring set and the
engine (shared among the processes when there are several), how units leave, and the scoring
accuracy as it is measured."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .. import dist
from ..classes import specialised
from ..errors import CarpruneError
from ..groups import Surgery, Unit
from ..scoring import Engine, EngineOptions, ScoringSet, compensation, make_engine
from ..scoring.first_order import first_order
from ..scoring.graph import trace
from ..scoring.sharded import Sharded, shard
from .records import GlobalStep, LayerRecord, PruneResult, Step


def check_layers(surgery: Surgery, layers: Sequence[str], convs: bool = False) -> None:
    """Each layer named once, and each a prunable layer (`convs`: conv) of the network."""
    if not layers:
        raise CarpruneError("no layers given; name at least one conv layer with --layers")
    dupes = sorted({name for name in layers if list(layers).count(name) > 1})
    if dupes:
        raise CarpruneError(f"layer {dupes[0]!r} is listed twice; name each layer once")
    for name in layers:
        surgery.check_layer(name, convs)


def open_surgery(model: nn.Module, data,
                 classes: Sequence[str | int] | None = None) -> tuple[ScoringSet, Surgery]:
    """The scoring set, with as many classes as the network outputs, and the surgery of a copy
    of the network that continues its earlier pruning history; with `classes`, the network
    specialised to them and the scoring set restricted to their images (classes.py)."""
    if classes is not None:
        model, data = specialised(model, data, classes)
    examples = ScoringSet.from_any(data)
    prior = getattr(model, "carprune_spec", {}).get("pruning_history", [])
    surgery = Surgery(model, examples.example(), prior_history=prior)
    return examples.classified_by(surgery.model), surgery


def record_history(surgery: Surgery) -> None:
    """Store the full pruning history in the pruned network's spec, so that saving it
    rebuilds it."""
    model = surgery.model
    model.carprune_spec = {**getattr(model, "carprune_spec", {}),
                           "pruning_history": surgery.history()}


@dataclass
class Run:
    """What every step of a CAR run works with. A removal's accuracy is known only at the next
    scoring pass (its base), so its step waits in `pending` until then."""

    surgery: Surgery
    scoring: ScoringSet
    engine: Engine
    remove: Callable[[str, Sequence[int]], list[int]]
    started: float
    val_before: float | None = None
    pending: list[Step | GlobalStep] = field(default_factory=list)
    traced: fx.GraphModule | None = None  # the network's graph, for first-order estimates

    def measured(self, accuracy: float) -> None:
        """The network as it is now scores `accuracy`: the first such is the run's before."""
        self.val_before = accuracy if self.val_before is None else self.val_before
        for st in self.pending:
            st.val_accuracy = accuracy
        self.pending = []

    def replay(self, layer: str, removed: Sequence[int]) -> None:
        """Remove again what an interrupted run removed (original indices), refits included."""
        self.remove(layer, [self.surgery.alive[layer].index(o) for o in removed])

    def estimate(self, layers: Sequence[str], scoring: ScoringSet) -> dict[Unit, float]:
        """The first-order estimate of each unit's absence over `scoring`, summed over the
        processes (scoring/first_order.py)."""
        self.traced = self.traced or trace(self.surgery.model)
        values = first_order(self.surgery, layers, shard(scoring), self.traced)
        summed = torch.tensor(list(values.values()), dtype=torch.float64)
        self.engine.reduce(summed)
        return dict(zip(values, map(float, summed), strict=True))


def start(surgery: Surgery, scoring: ScoringSet, options: EngineOptions, started: float,
          val_before: float | None = None) -> Run:
    """A run on `surgery` (begun at `started`, by time.perf_counter) with the engine `options`
    name, shared among the processes when there are several."""
    engine = make_engine(options)
    if dist.active():
        engine = Sharded(engine)
    remove = surgery.remove
    if options.compensate:
        def remove(layer: str, channels: Sequence[int]) -> list[int]:
            """Refit the channels' consumers on the scoring set, then remove them."""
            return compensation.remove(surgery, layer, channels, shard(scoring).batches,
                                       options.ridge, engine.reduce)
    return Run(surgery, scoring, engine, remove, started, val_before)


def finish(run: Run, records: dict[str, LayerRecord]) -> PruneResult:
    """Score the pruned network, which also measures the last steps, and store its history."""
    val_after = float(run.engine.score(run.surgery, [], run.scoring)[0].accuracy()[0])
    run.measured(val_after)
    record_history(run.surgery)
    return PruneResult(run.surgery.model, records, run.val_before, val_after,
                       time.perf_counter() - run.started, run.engine.name)
