"""What a CAR run records: every step of a per-layer run, every removal of a global one, and
what an interrupted global run needs to go on (resume.py keeps them in the run directory)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn


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
    accuracy before, and what its budget measured (`Meter.snapshot`)."""

    rounds: list[list[GlobalStep]]
    last: dict[tuple[str, int], tuple[int, float]]
    images: int
    val_before: float | None
    meter: dict
