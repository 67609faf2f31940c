"""Interpretation: every number checked against an independent computation."""

import base64
import copy
import csv
import html
import json
import re
import subprocess
from collections import OrderedDict
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune.commands.explain import explain_run
from carprune.errors import CarpruneError
from carprune.interpret import (
    ClassImportance,
    ReceptiveField,
    activation_colour_index,
    class_importance,
    colour_selectivity,
    diversity,
    diversity_comparison,
    receptive_field,
    top_patches,
)
from carprune.interpret.colour import (
    ACTIVATION_THRESHOLD,
    WEIGHT_THRESHOLD,
    colour_of_pruned,
    grey_version,
)

from .conftest import subset

N = 300
CHROMIUM = Path("/usr/bin/chromium")
RUN_REMOVED = [5, 3, 9, 30, 0, 12, 7, 21, 1, 2, 4, 6, 8, 10, 11, 13]  # a made-up prune run


@pytest.fixture(scope="module")
def val(fmnist) -> TensorDataset:
    return subset(fmnist.val, N)


@pytest.fixture(scope="module")
def importance(baseline, val, fmnist):
    return class_importance(baseline, val, "conv1", classes=fmnist.classes, progress=False)


def class_hits(model: nn.Module, data: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.tensors
    with torch.inference_mode():
        pred = model.eval()(x).argmax(1)
    return torch.bincount(y[pred == y], minlength=10), torch.bincount(y, minlength=10)


def test_class_importance_equals_brute_force_ablation(baseline, val, importance, fmnist):
    base_hits, totals = class_hits(baseline, val)
    top = int(np.argmax(importance.car))
    assert np.abs(importance.matrix[top]).max() > 0
    for f in (top, 0, 31):
        ablated = copy.deepcopy(baseline)
        with torch.no_grad():
            for param in (ablated.conv1.weight, ablated.bn1.weight, ablated.bn1.bias):
                param[f] = 0
        hits, _ = class_hits(ablated, val)
        expected = ((base_hits - hits).double() / totals).numpy()
        np.testing.assert_allclose(importance.matrix[f], expected, rtol=0, atol=1e-12)
        assert importance.car[f] == pytest.approx(float(base_hits.sum() - hits.sum()) / N,
                                                  abs=1e-12)
    assert importance.base_accuracy == pytest.approx(float(base_hits.sum()) / N)
    assert importance.classes == fmnist.classes


def test_weighted_rows_are_the_car_index_and_rankings_follow_the_rows(importance):
    weights = importance.class_totals / importance.class_totals.sum()
    np.testing.assert_allclose((importance.matrix * weights).sum(1), importance.car, atol=1e-12)
    for f in range(importance.num_filters):
        row = sorted(importance.matrix[f])
        assert [v for _, v in importance.most(f)] == row[::-1][:3]
        assert [v for _, v in importance.least(f)] == row[:3]
        name, value = importance.most(f, 1)[0]
        assert importance.matrix[f, importance.classes.index(name)] == value


def test_tied_classes_rank_by_their_images_then_their_id():
    imp = ClassImportance("conv1", ["a", "b", "c", "d"], np.array([[1.0, 1.0, 1.0, 0.5]]),
                          np.array([0.9]), 1.0, np.ones(4), np.array([1, 3, 2, 3]), [0], "fast")
    assert imp.most(0) == [("b", 1.0), ("c", 1.0), ("a", 1.0)]
    assert imp.least(0, 2) == [("d", 0.5), ("b", 1.0)]


def test_classes_missing_from_the_scoring_set_are_never_ranked(baseline, val):
    x, y = val.tensors
    few = TensorDataset(x[y < 4], y[y < 4])
    imp = class_importance(baseline, few, "conv1", progress=False)
    assert np.isnan(imp.matrix[:, 4:]).all() and not np.isnan(imp.matrix[:, :4]).any()
    weights = imp.class_totals / imp.class_totals.sum()
    np.testing.assert_allclose(np.nansum(imp.matrix * weights, 1), imp.car, atol=1e-12)
    assert {c for f in range(imp.num_filters) for c, _ in imp.most(f) + imp.least(f)} <= \
        set(imp.classes[:4])
    assert imp.classes[0] == "T-shirt/top"  # names come from the checkpoint's spec
    assert ",,,,,," in imp.to_csv().splitlines()[1]  # absent classes are empty CSV cells


def test_colour_selectivity_index():
    g = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    grey = g.expand(-1, 3, -1, -1)
    red = torch.cat([g, torch.zeros(4, 2, 5, 5)], 1)
    opponent = torch.cat([g, -g, torch.zeros_like(g)], 1)
    s = colour_selectivity(torch.cat([grey, red, opponent]))
    np.testing.assert_allclose(s[:4], 0, atol=1e-12)
    np.testing.assert_allclose(s[4:8], 2 / 3, atol=1e-12)
    assert (s[4:8] > 0.6).all()
    np.testing.assert_allclose(s[8:], 1, atol=1e-12)
    assert colour_selectivity(torch.randn(4, 1, 3, 3)) is None


def test_activation_colour_index_sees_colour_but_not_luma():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 2, 1, bias=False), relu=nn.ReLU()))
    with torch.no_grad():
        # on pixels: filter 0 reads luma (blind to colour), filter 1 red minus green + 0.1
        luma = torch.tensor([0.299, 0.587, 0.114]) * torch.tensor(std)
        net.conv.weight[0] = luma.view(3, 1, 1)
        net.conv.weight[1] = torch.tensor([std[0], -std[1], 0.0]).view(3, 1, 1)
    torch.manual_seed(0)
    pixels = torch.rand(20, 3, 6, 6)
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    index = activation_colour_index(net, x, "conv", mean, std)
    grey_pixels = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    colour = (pixels[:, 0] - pixels[:, 1] + 0.1).clamp(min=0).mean((1, 2))
    grey = torch.full_like(colour, 0.1)
    expected = float((colour - grey).abs().sum() / (colour.abs().sum() + grey.abs().sum()))
    assert index[0] == pytest.approx(0, abs=1e-6)
    assert index[1] == pytest.approx(expected, rel=1e-5) and index[1] > ACTIVATION_THRESHOLD
    torch.testing.assert_close(grey_version(x, mean, std)[:, 0] * std[0] + mean[0], grey_pixels)
    assert activation_colour_index(net, x[:, :1], "conv") is None


def test_colour_of_pruned_counts():
    index = np.array([0.9, 0.1, 0.7, 0.2, 0.6, 0.0])
    got = colour_of_pruned(index, [2, 1, 0, 5], 0.5, first=3)
    assert got == {"threshold": 0.5, "first": 3, "colour_in_first": 2,
                   "share_in_first": pytest.approx(2 / 3), "colour_in_layer": 3,
                   "layer_share": 0.5}


def test_diversity_of_identical_and_orthogonal_filters():
    same = torch.randn(1, 3, 3, 3).repeat(6, 1, 1, 1) * torch.arange(1.0, 7).view(-1, 1, 1, 1)
    d = diversity(same)
    assert d["mean_cosine_distance"] == pytest.approx(0, abs=1e-9)
    assert d["effective_rank"] == pytest.approx(1, abs=1e-6)
    ortho = 2.5 * torch.eye(9).view(9, 1, 3, 3)
    d = diversity(ortho)
    assert d["mean_cosine_distance"] == pytest.approx(1, abs=1e-12)
    assert d["effective_rank"] == pytest.approx(9, abs=1e-9)
    assert d["filters"] == 9


def test_diversity_comparison_keeps_the_right_filters():
    g = torch.Generator().manual_seed(0)
    magnitude = (1 + torch.rand(8, 2, 3, 3, generator=g)) * 2 ** torch.arange(8.0).view(-1, 1, 1, 1)
    w = magnitude * torch.randn(8, 2, 3, 3, generator=g).sign()  # L1 grows with the index
    table = diversity_comparison(w, car_removed=[7, 3, 5])
    assert table["original"] == diversity(w)
    assert table["CAR-kept"] == diversity(w[[0, 1, 2, 4, 6]])
    assert table["L1-kept"] == diversity(w[3:])
    assert table["random-kept"]["filters"] == 5


def test_receptive_field_matches_the_gradient_support():
    net = nn.Sequential(OrderedDict(
        c1=nn.Conv2d(1, 2, 3, padding=1), p1=nn.AvgPool2d(2),
        c2=nn.Conv2d(2, 2, 5, stride=2, padding=2), c3=nn.Conv2d(2, 2, 3, padding=2, dilation=2)))
    for p in net.parameters():
        nn.init.constant_(p, 1.0)
    rf = receptive_field(net, "c3")
    x = torch.ones(1, 1, 30, 30, requires_grad=True)
    out = net(x)
    for i, j in [(0, 0), (3, 5), (out.shape[2] - 1, out.shape[3] - 1)]:
        (grad,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
        rows, cols = grad[0, 0].nonzero(as_tuple=True)
        support = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        assert rf.box(i, j, 30, 30) == support


def test_receptive_fields_of_the_shipped_convnet(baseline):
    # conv1 3x3; pool /2; conv2 adds 2 steps of 2; pool; conv3 adds 2 steps of 4
    assert receptive_field(baseline, "conv1") == ReceptiveField((3, 3), (1, 1), (-1, -1))
    assert receptive_field(baseline, "conv2") == ReceptiveField((8, 8), (2, 2), (-3, -3))
    assert receptive_field(baseline, "conv3") == ReceptiveField((18, 18), (4, 4), (-7, -7))


def test_top_patches_are_the_strongest_responses(baseline, val):
    x = val.tensors[0]
    patches = top_patches(baseline, x, "conv2", k=4)
    m = copy.deepcopy(baseline)
    with torch.inference_mode():
        act = m.relu2(m.bn2(m.conv2(m.pool1(m.relu1(m.bn1(m.conv1(x)))))))
    peak, where = act.flatten(2).max(2)
    np.testing.assert_allclose(patches.value, peak.sort(0, descending=True).values[:4].T.numpy(),
                               rtol=1e-5)
    for f in (0, 17, 63):
        for n, image in enumerate(patches.image[f]):
            assert peak[image, f] == pytest.approx(float(patches.value[f, n]), rel=1e-5)
            i, j = divmod(int(where[image, f]), act.shape[-1])
            top, left = -3 + 2 * i, -3 + 2 * j
            assert tuple(patches.box[f, n]) == (max(top, 0), max(left, 0), min(top + 8, 28),
                                                min(left + 8, 28))


@pytest.fixture(scope="module")
def report(baseline, fmnist, tmp_path_factory):
    base = tmp_path_factory.mktemp("explain")
    run = base / "prune"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(
        {"layers": {"conv1": {"filters_before": 32, "filters_after": 16,
                              "removed": RUN_REMOVED}}}))
    summary = explain_run(baseline, fmnist, ["conv1"], base / "out", prune_run=run,
                          score_samples=N, progress=False)
    return base / "out", summary


def test_explain_run_writes_a_report_with_images_and_class_names(report, fmnist, importance,
                                                                 baseline):
    out, summary = report
    page = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3 + 32  # filter grid, heat map, diversity; one strip per filter
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)
    assert all(html.escape(name) in page for name in fmnist.classes)
    assert "http" not in page and "<script" not in page and "<link" not in page
    assert "do not apply" in page and summary["layers"]["conv1"]["colour"] is None
    rows = list(csv.reader((out / "class_importance_conv1.csv").read_text().splitlines()))
    assert rows[0] == ["filter", *fmnist.classes]
    assert [int(r[0]) for r in rows[1:]] == list(range(32))
    np.testing.assert_array_equal([[float(v) for v in r[1:]] for r in rows[1:]],
                                  importance.matrix)
    saved = json.loads((out / "class_importance_conv1.json").read_text())
    assert saved["filters"][4]["car"] == importance.car[4]
    assert [c["class"] for c in saved["filters"][4]["most"]] == \
        [c for c, _ in importance.most(4)]
    assert json.loads((out / "explain.json").read_text()) == summary
    assert sorted(p.name for p in out.iterdir()) == summary["files"]
    for name in summary["files"]:
        if name.endswith(".png"):
            assert (out / name).read_bytes().startswith(b"\x89PNG")
    layer = summary["layers"]["conv1"]
    assert layer["removal_order"] == RUN_REMOVED and layer["order_source"].startswith("greedy")
    kept = [f for f in range(32) if f not in RUN_REMOVED]
    assert layer["diversity"]["CAR-kept"] == diversity(baseline.conv1.weight[kept])
    for f, removed in ((5, 1), (3, 2), (9, 3)):
        assert re.search(rf"<tr><td><b>{f}</b></td><td>[^<]*</td><td>{removed}</td>", page)


def test_explain_run_checks_inputs_before_writing(baseline, fmnist, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CarpruneError, match="no layer 'conv9'"):
        explain_run(baseline, fmnist, ["conv1", "conv9"], out, score_samples=N, progress=False)
    with pytest.raises(CarpruneError, match="bn1.*not a prunable conv or linear layer"):
        explain_run(baseline, fmnist, ["bn1"], out, score_samples=N, progress=False)
    with pytest.raises(CarpruneError, match="score-samples"):
        explain_run(baseline, fmnist, ["conv1"], out, score_samples=0, progress=False)
    with pytest.raises(CarpruneError, match="does not exist"):
        explain_run(baseline, fmnist, ["conv1"], out, prune_run=tmp_path / "none",
                    progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(
        {"layers": {"conv1": {"filters_before": 16, "removed": [1, 2]}}}))
    with pytest.raises(CarpruneError, match="started from"):
        explain_run(baseline, fmnist, ["conv1"], out, prune_run=run, progress=False)
    assert not out.exists()


def test_explain_run_on_rgb_images_counts_colour_filters(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(60, 3, 12, 12), torch.arange(60) % 3
    ds = TensorDataset(x, y)
    data = cp.data.Data("rgb-toy", ds, ds, ds, ["red", "green", "blue"], (0.5,) * 3, (0.25,) * 3)
    model = cp.create_model("convnet", in_channels=3, num_classes=3, widths=(6, 8),
                            input_size=12).eval()
    summary = explain_run(model, data, ["conv1", "conv2"], tmp_path / "out", progress=False)
    conv1, conv2 = summary["layers"]["conv1"], summary["layers"]["conv2"]
    index = colour_selectivity(model.conv1.weight)
    order = class_importance(model, ds, "conv1", progress=False).removal_order
    assert conv1["colour"] == {"index": "weight", "values": index.tolist(),
                               **colour_of_pruned(index, order, WEIGHT_THRESHOLD)}
    assert conv1["colour"]["first"] == 6  # a layer smaller than 20 filters: all of them
    assert conv2["colour"]["index"] == "activation" and len(conv2["colour"]["values"]) == 8
    page = (tmp_path / "out" / "report.html").read_text()
    assert "colour filters" in page and (tmp_path / "out" / "colour_conv1.png").is_file()


def test_report_renders_in_headless_chromium(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (make setup installs it), so the report's "
                    "rendering is not checked")
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,2000", (report[0] / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    rgb = matplotlib.image.imread(shot)[..., :3]
    assert rgb.shape[:2] == (2000, 1200)
    assert rgb.std() > 0.1
    assert (rgb < 0.9).any(-1).mean() > 0.05  # text, tiles and the heat map, not a blank page
