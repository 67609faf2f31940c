"""The order in which global CAR removes units: by the ranking rule (scoring/rule.py) on each
unit's last exact scores and today's saving, ties broken by layer order, then original index;
in cuts of `round_to` units per layer, and no layer below its floor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..groups import Surgery, Unit
from ..scoring import Scores
from ..scoring.rule import key, outcomes


def group_leaders(surgery: Surgery, layers: Sequence[str]) -> list[str]:
    """One layer per dependency group: coupled layers (a residual stage) are one set of units."""
    leaders, seen = [], set()
    for name in layers:
        producers = frozenset(id(dep.target.module) for dep, _ in surgery.unit_group(name, 0)
                              if isinstance(dep.target.module, (nn.Conv2d, nn.Linear)))
        if producers not in seen:
            seen.add(producers)
            leaders.append(name)
    return leaders


@dataclass
class Cut:
    """Units of one layer that go together (a multiple of `round_to` stays), with the key it
    ranks by among all layers' cuts."""

    key: tuple
    layer: str
    units: list[tuple[int, float]]  # (channel, cost saved)


def cuts(layer: str, order: int, units: list[tuple[int, float, int, int, int]], room: int,
         round_to: int, size: int) -> list[Cut]:
    """One layer's removals in the order they may go. Its units (channel, saving, images lost,
    loss gained, original index; all `size` of the layer's, or a shortlist) are ranked by the
    rule on their own and cut into pieces that each leave a multiple of `round_to` filters
    (the first takes the remainder), at most `room` units in all. A cut ranks by its summed
    loss per summed saving, never before the cut ahead of it in its layer (`order`: the
    layer's place, for ties)."""
    ranked = sorted(units, key=lambda u: (*key(u[2], u[3], u[1]), u[4]))
    out, at, width, worst = [], 0, size % round_to or round_to, ()
    while at + width <= min(room, len(units)):
        part = ranked[at:at + width]
        saved = sum(u[1] for u in part)
        worst = max(worst, key(sum(u[2] for u in part), sum(u[3] for u in part), saved))
        out.append(Cut((*worst, order, at), layer, [(u[0], u[1]) for u in part]))
        at, width = at + width, round_to
    return out


class Ranking:
    """What a global run knows of each unit: its (images lost, loss gained) at its last exact
    scoring (a screened round re-scores only some), and the layers' floors."""

    def __init__(self, surgery: Surgery, leaders: list[str], floors: dict[str, int],
                 round_to: int) -> None:
        self.surgery, self.leaders = surgery, leaders
        self.floors, self.round_to = floors, round_to
        # (layer, original index) -> (images lost, loss gained) at the unit's last exact scoring
        self.last: dict[tuple[str, int], tuple[int, float]] = {}
        self.images = 0  # scored images, over all processes

    def open_layers(self) -> list[str]:
        """The layers above their floor: those a round may still prune."""
        return [n for n in self.leaders if self.surgery.size(n) > self.floors[n]]

    def original(self, unit: Unit) -> int:
        return self.surgery.alive[unit.layer][unit.channel]

    def learn(self, units: Sequence[Unit], base: Scores, scores: Scores) -> None:
        """Keep what each scored unit's absence loses (rule.outcomes)."""
        self.images = base.total
        for unit, outcome in zip(units, outcomes(base, scores), strict=True):
            self.last[unit.layer, self.original(unit)] = outcome

    def unit_key(self, unit: Unit, saved: float) -> tuple:
        """A unit's rank by its last scores when its removal saves `saved`."""
        original = self.original(unit)
        return (*key(*self.last[unit.layer, original], saved), self.leaders.index(unit.layer),
                original)

    def screened(self, saving_of: dict[Unit, float], screen: int | None,
                 shortlist: int | None, estimate: dict[Unit, float] | None) -> list[Unit]:
        """The units a round scores: all; or once each has a score, the `screen` that rank
        first by their last scores; or the `shortlist` that rank first by their first-order
        `estimate` per saving."""
        units = list(saving_of)
        if shortlist:
            order = {u: (estimate[u] / max(saving_of[u], 1e-12), self.leaders.index(u.layer),
                         u.channel) for u in units}
            units = sorted(units, key=order.__getitem__)[:shortlist]
        elif screen and self.last:
            units = sorted(units, key=lambda u: self.unit_key(u, saving_of[u]))[:screen]
        return units

    def cuts(self, layers: Sequence[str], saving_of: dict[Unit, float],
             only: set[Unit] | None = None) -> list[Cut]:
        """Every cut of `layers` (of their units in `only`, when given) that may go, in each
        layer's order."""
        return [c for n in layers for c in cuts(
            n, self.leaders.index(n), [(c, saving_of[Unit(n, c)], *self.last[n, o], o)
                                       for c, o in enumerate(self.surgery.alive[n])
                                       if only is None or Unit(n, c) in only],
            self.surgery.size(n) - self.floors[n], self.round_to, self.surgery.size(n))]

    def lost(self, layer: str, channels: Sequence[int]) -> int:
        """Images the absence of each of `channels` lost at its last scoring, summed."""
        return sum(self.last[layer, self.surgery.alive[layer][c]][0] for c in channels)


def pick(ranked: list[Cut], step: int, need: float,
         per_cut: bool = False) -> dict[str, list[tuple[int, float]]]:
    """A round's removals per layer, (channel, saving) each: the best cuts until the round has
    `step` units (`per_cut`: `step` cuts) or its savings reach `need`."""
    picked: dict[str, list[tuple[int, float]]] = {}
    saving, taken = 0.0, 0
    for cut in sorted(ranked, key=lambda c: c.key):
        if taken >= step or saving >= need:
            break
        picked.setdefault(cut.layer, []).extend(cut.units)
        saving += sum(saved for _, saved in cut.units)
        taken += 1 if per_cut else len(cut.units)
    return picked
