"""Does CAR drop colour filters first in a real pretrained RGB network? MTCNN's ONet (the face
detector's last stage, weights from facenet-pytorch's wheel), scored label-free on photographs
that ship inside packages.

    make rgb        # installs facenet-pytorch (--no-deps) and scikit-image, then runs this
    python -m experiments.rgb [--first 10] [--draws 3] [--images 200] [--out runs/rgb/rgb.json]

Scoring sets: square windows of every package photo (cp.data.package_photos()), each with
its mirror image, resized to 48 x 48 as MTCNN does, labelled by the unpruned ONet's own decision
(face / non-face, as `--labels model`), then drawn with a fixed seed so that up to half are
windows ONet calls faces (random windows rarely are). CAR is then the loss of agreement with the
unpruned network. Each draw has its own windows (seeds seed, seed + 1, ...).

For conv1 it counts the colour-selective filters (weight colour index above the report's
threshold, see cp.interpret.colour) among the first N filters each criterion removes,
against the layer's share: greedy CAR (once per draw), l1, and random (20 seeds); and the
agreement left after zeroing those N filters.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

import carprune as cp
from carprune.criteria import ranking
from carprune.interpret.colour import WEIGHT_THRESHOLD, colour_selectivity

from .onet import ONET_STATS, pretrained_onet

LAYER = "conv1"
SEEDS = 20


@torch.inference_mode()
def model_labels(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own decisions on images x (CAR is then the loss of agreement)."""
    return torch.cat([model.eval()(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])


def scoring_images(model: torch.nn.Module, images: int, per_photo: int, seed: int):
    """The label-free scoring set: package photo windows and their mirrors, labelled by the
    model, up to half of them windows it calls faces (seeded draw); and a description."""
    photos = cp.data.package_photos()
    pixels, origin = cp.data.photo_windows(photos, per_photo, seed=seed)
    x = cp.data.normalise(pixels, *ONET_STATS)
    y = model_labels(model, x)
    rng = np.random.default_rng(seed)
    faces, others = np.flatnonzero(y.numpy() == 1), np.flatnonzero(y.numpy() == 0)
    n_faces = min(len(faces), images // 2)
    n_others = min(len(others), images - n_faces)
    pick = np.sort(np.concatenate([rng.choice(faces, n_faces, replace=False),
                                   rng.choice(others, n_others, replace=False)]))
    per = {name: sum(origin[i]["photo"] == name for i in pick) for name in photos}
    info = {"photos": {name: list(photo.shape) for name, photo in photos.items()},
            "windows_per_photo": per_photo, "pool": len(x), "pool_faces": int(len(faces)),
            "images": len(pick), "faces": n_faces, "non_faces": n_others,
            "images_per_photo": per, "seed": seed}
    return TensorDataset(x[pick], y[pick]), info


def agreement_without(model: torch.nn.Module, data: TensorDataset, filters) -> float:
    """Share of scoring images on which the model with `filters` of conv1 zeroed keeps its
    decision (zeroing equals removal: PReLU(0) = 0 and max pooling keeps zeros)."""
    ablated = copy.deepcopy(model)
    with torch.no_grad():
        ablated.conv1.weight[list(filters)] = 0
        ablated.conv1.bias[list(filters)] = 0
    return cp.evaluate(ablated, data).accuracy


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=10,
                        help="filters removed from ONet's conv1 (of 32) to look at")
    parser.add_argument("--draws", type=int, default=3,
                        help="independent scoring sets (window seeds seed, seed+1, ...)")
    parser.add_argument("--images", type=int, default=200, help="scoring images per draw")
    parser.add_argument("--windows-per-photo", type=int, default=150,
                        help="windows drawn from each photo per draw (each also mirrored)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/rgb/rgb.json")
    return parser.parse_args(argv)


def check(args: argparse.Namespace, n: int) -> None:
    """Refuse sizes the study cannot run with (n: conv1's filters), each in one sentence."""
    if not 0 < args.first < n:
        raise cp.CarpruneError(f"--first must be between 1 and {n - 1}, got {args.first}")
    if args.draws < 1 or args.images < 2 or args.windows_per_photo < 1:
        raise cp.CarpruneError("--draws, --images and --windows-per-photo must be positive "
                               "(--images at least 2)")


def measure(model: torch.nn.Module, draws: list, args: argparse.Namespace) -> dict:
    """The colour counts and agreements of CAR (per draw), l1 and random orders (SEEDS)."""
    n = model.conv1.out_channels
    index = colour_selectivity(model.conv1.weight)
    colour = {i for i, v in enumerate(index) if v > WEIGHT_THRESHOLD}
    scoring = cp.ScoringSet.from_any(draws[0][0], 2)
    surgery = cp.Surgery(model, scoring.example())
    l1 = ranking("l1", surgery, LAYER, scoring)[:args.first]
    random_orders = [ranking("random", surgery, LAYER, scoring, seed)[:args.first]
                     for seed in range(SEEDS)]
    randoms = [len(colour & set(order)) for order in random_orders]
    per_draw = []
    for data, info in draws:
        car = cp.car_prune(model, data, [LAYER], keep=n - args.first,
                           progress=False).layers[LAYER].removed
        per_draw.append({
            "car": len(colour & set(car)), "car_order": car, "scoring": info,
            "agreement_after": {
                "car": agreement_without(model, data, car),
                "l1": agreement_without(model, data, l1),
                "random_mean": statistics.mean(agreement_without(model, data, order)
                                               for order in random_orders)}})
    cars = [d["car"] for d in per_draw]

    def mean_agreement(key: str) -> float:
        return statistics.mean(d["agreement_after"][key] for d in per_draw)

    return {
        "network": "MTCNN ONet (facenet-pytorch 2.6.0 data/onet.pt), face/non-face head",
        "layer": LAYER, "threshold": WEIGHT_THRESHOLD, "first": args.first, "filters": n,
        "colour_filters": len(colour), "expected_at_share": len(colour) * args.first / n,
        "car_mean": statistics.mean(cars), "car_per_draw": cars, "l1": len(colour & set(l1)),
        "random_mean": statistics.mean(randoms), "random_min": min(randoms),
        "random_max": max(randoms), "random_seeds": SEEDS,
        "agreement_after": {key: mean_agreement(key) for key in ("car", "l1", "random_mean")},
        "l1_order": l1, "colour_index": index.tolist(), "draws": per_draw,
        "photos": draws[0][1]["photos"], "seconds": 0.0,
    }


def summary(result: dict, args: argparse.Namespace) -> list[str]:
    agree, first, n = result["agreement_after"], args.first, result["filters"]
    images = sum(d["scoring"]["images"] for d in result["draws"])
    faces = sum(d["scoring"]["faces"] for d in result["draws"])
    cars = result["car_per_draw"]
    return [
        f"ONet {LAYER}: {result['colour_filters']} of {n} filters are colour-selective (weight "
        f"colour index > {WEIGHT_THRESHOLD}); at the layer's share, "
        f"{result['expected_at_share']:.1f} of the first {first} removed would be",
        f"scored label-free on {args.draws} draws of {args.images} windows of "
        f"{', '.join(result['photos'])} and their mirrors ({images} images, {faces} of them "
        "faces to ONet)",
        f"colour filters among the first {first} removed: CAR {result['car_mean']:.1f} "
        f"(per draw {', '.join(map(str, cars))}), l1 {result['l1']}, random "
        f"{result['random_mean']:.1f} (min {result['random_min']}, max {result['random_max']}, "
        f"{SEEDS} seeds)",
        f"agreement with the unpruned ONet without them: CAR {agree['car']:.3f}, "
        f"l1 {agree['l1']:.3f}, random {agree['random_mean']:.3f} (mean)",
        f"written to {args.out} in {result['seconds']:.0f} s"]


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    start = time.perf_counter()
    try:
        model = pretrained_onet()
        check(args, model.conv1.out_channels)
        draws = [scoring_images(model, args.images, args.windows_per_photo, args.seed + d)
                 for d in range(args.draws)]
    except cp.CarpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = measure(model, draws, args)
    result["seconds"] = round(time.perf_counter() - start, 1)
    cp.io.write_json(args.out, result)
    print("\n".join(summary(result, args)))
    return 0
