"""Block mode of global CAR, for networks where even one candidate per removed filter is too
dear (MobileNetV2 at 224 px needs some 4 400 removals to halve its MACs): every round, each
layer above its floor offers one block, the fraction F of its units that the first-order
estimate ranks least needed; the blocks are scored jointly, one engine call, and ranked by the
rule per summed saving; the best `step` go.

With compensation a block's refit is fitted on the first half of the scoring images and its
tallies counted on the rest, so that a refit which only fits its own images cannot look free;
the removal itself is refit on all of them.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..scoring.rule import outcomes, rank
from ..units import Block, Unit
from .budget import Meter
from .ranking import Cut, Ranking, pick
from .records import GlobalStep, LayerRecord
from .rounds import Mode, say_round, take
from .run import Run


def block_of(ranking: Ranking, layer: str, estimate: dict[Unit, float],
             fraction: float) -> Block:
    """The layer's block: the max(1, round(fraction x size)) units, at most the room above its
    floor, that the first-order `estimate` ranks least needed (ties: the lower channel)."""
    size = ranking.surgery.size(layer)
    count = min(size - ranking.floors[layer], max(1, round(fraction * size)))
    ranked = sorted(range(size), key=lambda c: (estimate[Unit(layer, c)], c))
    return Block(layer, tuple(sorted(ranked[:count])))


def block_round(run: Run, meter: Meter, ranking: Ranking, mode: Mode,
                records: dict[str, LayerRecord], number: int) -> list[GlobalStep] | None:
    """One round of block mode, with a progress bar. None when no layer is above its floor."""
    layers = ranking.open_layers()
    if not layers:
        return None
    began = time.perf_counter()
    estimate = run.estimate(layers, run.scoring)
    blocks = [block_of(ranking, n, estimate, mode.approx.blocks) for n in layers]
    saving_of = meter.savings(layers)
    saved = [sum(saving_of[u] for u in b.units) for b in blocks]
    fit, judge = mode.halves or (None, run.scoring)
    with tqdm(total=len(blocks), desc=f"global CAR round {number}", unit="block",
              leave=False, disable=not mode.show) as bar:
        base, scores = run.engine.score(run.surgery, blocks, judge, bar.update, fit=fit)
    whole = base if fit is None else run.engine.score(run.surgery, [], run.scoring)[0]
    run.measured(float(whole.accuracy()[0]))
    order = rank(base, scores, [ranking.leaders.index(b.layer) for b in blocks], saved)
    cuts = [Cut((place,), blocks[i].layer, [(c, saving_of[Unit(blocks[i].layer, c)])
                                            for c in blocks[i].channels])
            for place, i in enumerate(order)]
    car = {b.layer: lost / base.total for b, (lost, _) in zip(blocks, outcomes(base, scores),
                                                               strict=True)}
    removals = [take(run, meter, records, name, chosen, car[name])
                for name, chosen in pick(cuts, mode.approx.step, meter.need(),
                                         per_cut=True).items()]
    say_round(mode, meter, number, f"scored {len(blocks)} blocks", began, removals)
    return removals
