"""What a global CAR run spends: the network's MACs, parameters or latency, followed as a share
of the original down to the target, and what each unit's removal saves for the ranking."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .. import measure
from ..errors import CarpruneError
from ..groups import Surgery, Unit
from .settings import Budget


class Meter:
    """The budget of one run: `left` is what the network holds of the budget's kind as a
    fraction of the original, `target` the fraction to reach."""

    def __init__(self, budget: Budget, target: float, surgery: Surgery,
                 leaders: Sequence[str]) -> None:
        self.kind, self.cost, self.surgery = budget.kind, budget.cost, surgery
        self.shape = surgery.example_inputs.shape[1:]
        self.original = self.amount()
        if budget.kind == "latency":
            if not 0 < target < self.original:
                raise CarpruneError(f"--target-latency-ms must be below the network's measured "
                                    f"{self.original:.3f} ms per image (batch 1), got {target}")
            target = target / self.original
        self.target = target
        self.left = 1.0
        # a latency cost: milliseconds per unit of each layer, measured once at the start
        self.per_unit = measure.latency_costs(surgery, leaders) if self.cost == "latency" else {}

    @property
    def model(self) -> nn.Module:
        return self.surgery.model

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
