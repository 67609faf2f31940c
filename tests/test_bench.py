"""`carprune bench --kinds` (src/carprune/bench.py, src/carprune/commands/bench.py): the layers
it samples per unit kind, and the new kinds reported apart from the 2x-of-bound target."""

from carprune.bench import NEW_KINDS, LayerBench, by_kind, sample_layers
from carprune.commands.bench import _kind_summary, _kind_table
from carprune.groups import Surgery

from .test_norms import IMAGES, Grouped, randomised


def test_sample_layers_takes_each_kind_first_and_last_layer():
    # Grouped, by construction: stem and c3 feed one conv or Linear each (plain), c1 a
    # GroupNorm (norm-mixed), g's units are one channel of each of its 4 groups (grouped)
    surgery = Surgery(randomised(Grouped()), IMAGES[:1])
    assert sample_layers(surgery) == ["stem", "c3", "c1", "g"]
    assert sample_layers(surgery, widest=7) == ["stem", "c1"]  # c3 16, g 8 units; c1 4


def test_new_kinds_report_speedup_apart_from_the_bound_target():
    rows = [LayerBench("a", "plain", 10, 30.0, 3.0, 2.0, [1], [1]),
            LayerBench("b", "residual", 10, 9.0, 3.0, 1.0, [2], [2]),
            LayerBench("c", "linear", 10, 40.0, 8.0, 2.0, [3], [3]),
            LayerBench("d", "grouped", 10, 6.0, 2.0, 0.0, [4], [4])]
    kinds = [dict(k, network="net") for k in by_kind(rows)]
    assert [k["new"] for k in kinds] == [False, False, True, True]
    assert {"linear", "grouped"} < set(NEW_KINDS) and "plain" not in NEW_KINDS
    verdicts = [line.split()[-2] for line in _kind_table(kinds).splitlines()[2:]]
    assert verdicts == ["yes", "NO", "kind", "kind"]  # 1.5, 3.0, then "new kind"
    old, new = _kind_summary(kinds).splitlines()
    assert old == "old kinds within 2x of their bound: NO (largest 3.00, net residual)"
    assert new.endswith("speed-up over naive: net linear 5.0x, net grouped 3.0x")
