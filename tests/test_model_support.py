"""The quick part of the support matrix (benchmarks/model_support.py, docs/models-and-data.md):
networks that between them have every unit kind, each with every layer Torch-Pruning prunes a
CAR unit, the fast engine's scores equal to the physically pruned network's, the same picks as
the naive engine, and a pruned network that reloads with identical outputs."""

import pytest
import torch
from benchmarks.model_support import QUICK, TOLERANCE, check, label, main, network
from torch.utils.data import TensorDataset

from carprune.groups import Surgery, Unit
from carprune.scoring import FastEngine, NaiveEngine, ScoringSet

KINDS = {"plain", "branch", "concat", "residual", "depthwise", "linear", "grouped",
         "norm-mixed"}


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {name: check(name) for name in QUICK}


@pytest.mark.parametrize("name", QUICK)
def test_quick_networks_meet_every_target(rows, name):
    row = rows[name]
    assert "error" not in row, row["error"]
    # Torch-Pruning's own groups (its get_all_groups), each offered by CAR: at its root, or
    # (a depthwise root) at the layer that makes its channels
    assert row["refused"] == {} and len(row["car_layers"]) >= len(row["tp_layers"])
    assert row["logit_gap"] < TOLERANCE and row["loss_gap"] < TOLERANCE and row["correct"]
    for layer, (naive, fast) in row["picks"].items():
        assert naive == fast and len(fast) == 1, layer
    assert row["fast_is_naive"] and row["reload_identical"] and row["passed"]


def test_quick_networks_have_every_unit_kind(rows):
    assert set().union(*(row["engines"] for row in rows.values())) == KINDS


def test_a_network_that_fails_gets_its_row_with_one_sentence():
    row = check("timm:no_such_network")
    assert row["network"] == "timm:no_such_network" and not row["passed"]
    assert row["error"].startswith("build: ") and "\n" not in row["error"]
    assert "no_such_network" in row["error"]


def test_an_unknown_network_name_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "no_such_network"])
    assert exit_info.value.code == 2
    assert label(QUICK[0]) in capsys.readouterr().err


def test_units_that_change_different_modules_score_alike_in_both_engines():
    """GhostNet's stem feeds a residual sum whose other side comes, for half of its units, from
    a ghost module's primary conv and, for the others, from its cheap depthwise conv: the
    masked tail masks each unit where it is made (scoring/masked.py)."""
    model, x = network("timm:ghostnet_100", 64)
    surgery = Surgery(model, x[:1])
    with torch.inference_mode():
        scoring = ScoringSet.from_any(TensorDataset(x, model(x).argmax(1)), 1000)
    units = [Unit("conv_stem", u) for u in range(surgery.size("conv_stem"))]
    assert FastEngine().plan(surgery, "conv_stem") is not None  # scored by the masked tail
    _, naive = NaiveEngine().score(surgery, units, scoring)
    _, fast = FastEngine().score(surgery, units, scoring)
    assert torch.equal(naive.correct, fast.correct)
    assert torch.allclose(naive.loss, fast.loss, rtol=1e-5)
