"""`carprune explain` on a hidden nn.Linear layer (the shipped convnet's fc1): its numbers
against the network with a unit's weight row and bias zeroed, evaluated by hand."""

import copy
import csv
import html
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from carprune.commands.explain import explain_run
from carprune.errors import CarpruneError
from carprune.interpret import diversity
from carprune.interpret.report import LINEAR_NOTE

from .conftest import subset

N = 200
KEPT_CLASSES = [0, 1, 2, 3, 4]  # a made-up specialised run (carprune prune --classes)
RUN_REMOVED = torch.randperm(256, generator=torch.Generator().manual_seed(7))[:100].tolist()


@pytest.fixture(scope="module")
def by_hand(baseline, fmnist):
    """Per unit of fc1, the class hits of the network without it (its weight row and bias
    zeroed), the unpruned hits and totals, and fc1's activations after its ReLU."""
    x, y = subset(fmnist.val, N).tensors
    trunk = nn.Sequential(*list(baseline.children())[:13])  # conv1 ... flatten
    assert isinstance(list(baseline.children())[13], nn.Linear)

    def hits(fc1: nn.Linear) -> torch.Tensor:
        pred = baseline.fc2(torch.relu(fc1(z))).argmax(1)
        return torch.bincount(y[pred == y], minlength=10)

    with torch.no_grad():
        z = trunk(x)
        base = hits(baseline.fc1)
        without = []
        for f in range(baseline.fc1.out_features):
            fc1 = copy.deepcopy(baseline.fc1)
            fc1.weight[f] = 0
            fc1.bias[f] = 0
            without.append(hits(fc1))
        act = torch.relu(baseline.fc1(z))
    totals = torch.bincount(y, minlength=10)
    matrix = ((base - torch.stack(without)).double() / totals).numpy()
    car = (base.sum() - torch.stack(without).sum(1)).double().numpy() / N
    return matrix, car, act


@pytest.fixture(scope="module")
def explained(baseline, fmnist, tmp_path_factory):
    base = tmp_path_factory.mktemp("explain_linear")
    run = base / "prune"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(
        {"layers": {"fc1": {"filters_before": 256, "filters_after": 156,
                            "removed": RUN_REMOVED}},
         "classes": {"indices": KEPT_CLASSES, "of": 10}}))
    summary = explain_run(baseline, fmnist, ["fc1"], base / "out", prune_run=run,
                          score_samples=N, top_k=4, progress=False)
    return base / "out", summary


def test_class_importance_of_a_linear_layer_equals_zeroing_its_rows(explained, by_hand,
                                                                    fmnist):
    out, _ = explained
    matrix, car, _ = by_hand
    assert np.abs(car).max() > 0
    saved = json.loads((out / "class_importance_fc1.json").read_text())
    assert [u["filter"] for u in saved["filters"]] == list(range(256))
    np.testing.assert_allclose([u["car"] for u in saved["filters"]], car, rtol=0, atol=1e-12)
    rows = list(csv.reader((out / "class_importance_fc1.csv").read_text().splitlines()))
    assert rows[0] == ["filter", *fmnist.classes]
    np.testing.assert_allclose([[float(v) for v in r[1:]] for r in rows[1:]], matrix,
                               rtol=0, atol=1e-12)


def test_a_linear_layer_shows_whole_images_and_no_colour(explained, by_hand, baseline):
    out, summary = explained
    layer = summary["layers"]["fc1"]
    assert layer["colour"] is None and layer["top_patches"]["receptive_field"] is None
    assert layer["removal_order"] == RUN_REMOVED
    assert layer["order_source"].startswith("greedy")
    kept = [f for f in range(256) if f not in RUN_REMOVED]
    assert layer["diversity"]["CAR-kept"] == diversity(baseline.fc1.weight[kept])
    _, _, act = by_hand
    images = np.array(layer["top_patches"]["images"])
    assert images.shape == (256, 4)
    strongest = act.sort(0, descending=True).values[:4].T.numpy()
    np.testing.assert_allclose(np.take_along_axis(act.T.numpy(), images, 1), strongest,
                               rtol=1e-5, atol=1e-6)
    assert json.loads((out / "explain.json").read_text()) == summary
    assert "colour_fc1.png" not in summary["files"]
    assert {"patches_fc1.png", "heatmap_fc1.png", "diversity_fc1.png"} <= set(summary["files"])


def test_the_report_has_the_linear_section(explained, by_hand):
    out, summary = explained
    matrix, car, _ = by_hand
    page = (out / "report.html").read_text()
    assert '<h2 id="fc1">Layer fc1</h2>' in page and html.escape(LINEAR_NOTE) in page
    assert "<h3>Colour</h3>" not in page and "256 units" in page
    assert len(re.findall(r'alt="patches of unit \d+"', page)) == 256
    for position, f in enumerate(RUN_REMOVED[:3]):
        assert re.search(rf"<tr><td><b>{f}</b></td><td>[^<]*</td><td>{position + 1}</td>", page)
    special = summary["layers"]["fc1"]["specialisation"]
    dropped = [c for c in range(10) if c not in KEPT_CLASSES]
    block = matrix[RUN_REMOVED]
    assert special["dropped_mean"] == pytest.approx(np.nanmean(block[:, dropped]), abs=1e-12)
    assert special["kept_mean"] == pytest.approx(np.nanmean(block[:, KEPT_CLASSES]), abs=1e-12)
    assert "why the removed filters of fc1 could go" in page
    assert summary["kept_classes"] == [summary["classes"][c] for c in KEPT_CLASSES]


def test_explain_refuses_the_classifier_and_a_run_of_another_width(baseline, fmnist, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CarpruneError, match="fc2.*makes the network's outputs"):
        explain_run(baseline, fmnist, ["fc2"], out, score_samples=N, progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(
        {"layers": {"fc1": {"filters_before": 128, "removed": [1, 2]}}}))
    with pytest.raises(CarpruneError, match="fc1.*256 filters.*started from"):
        explain_run(baseline, fmnist, ["fc1"], out, prune_run=run, progress=False)
    assert not out.exists()
