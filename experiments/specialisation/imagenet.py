"""The ImageNet half of the study: torchvision's pretrained MobileNetV2 (its weights ship in a
package, experiments/real/networks.py) specialised to the classes it predicts most often on
windows of the photographs that ship in packages, labels its own predictions (as `--labels
model`), pruned to a few levels of the MACs without fine-tuning:

- subset CAR: global CAR in block mode with least-squares refits (make real's post-training
  setting, experiments/real/study.py), `classes=` the subset, scored on the subset's windows;
- all-class CAR, head trimmed: the same on windows of every predicted class, then
  `cp.specialise`;
- Torch-Pruning's global magnitude and Taylor pruning of the specialised network.

The figure is agreement on test windows the unpruned network puts in the subset: the share on
which the pruned specialised network's best logit is the unpruned network's class (the
specialised unpruned network agrees on all of them). Scoring and test windows are two seeded
draws from the same photographs (a camera's task sees the same scenes), so they may overlap.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch import nn
from torch.utils.data import TensorDataset

import carprune as cp
from carprune.classes import ClassSubset
from carprune.measure import macs_params

from ..baselines import torch_pruning_global
from ..real.networks import Network
from ..real.splits import agreement, normalised
from ..real.study import BLOCK_RIDGE, MIN_KEEP
from .fmnist import PRUNED, TP_STEPS, Snapshots

NETWORK = "mobilenet_v2"
BLOCK_FRACTION, BLOCKS_PER_ROUND = 0.25, 8


def windows(net: Network, count: int, seed: int) -> TensorDataset:
    """`count` windows of every package photograph here (with their mirror images), as the
    network reads them, labelled by its own predictions."""
    photos = cp.data.package_photos([name for name, _, _ in cp.data.photos.PACKAGE_PHOTOS])
    per_photo = max(1, count // (2 * len(photos)))
    pixels, _ = cp.data.photo_windows(photos, per_photo, seed=seed, size=net.size,
                                      min_side=net.size // 2, max_fraction=0.9)
    x = normalised(net, pixels).contiguous(memory_format=torch.channels_last)
    run = cp.inference(net.model)
    with torch.no_grad():
        y = torch.cat([run(b).argmax(1) for b in x.split(64)])
    return TensorDataset(x, y)


def block_car(model: nn.Module, scoring: TensorDataset, target: float, snapshots: Snapshots,
              args: argparse.Namespace, classes=None) -> None:
    """make real's block CAR with refits down to `target`, residual layers left whole, every
    round's network fed to `snapshots`."""
    surgery = cp.Surgery(model, scoring.tensors[0][:1])
    layers = [n for n in surgery.conv_layers() if surgery.kind(n) != "residual"]
    cp.global_car_prune(
        model, scoring, target, layers=layers, classes=classes,
        budget=cp.Budget(min_keep=MIN_KEEP),
        approx=cp.Approximation(blocks=BLOCK_FRACTION, step=BLOCKS_PER_ROUND),
        engine=cp.EngineOptions(compensate=True, ridge=BLOCK_RIDGE), progress=args.progress,
        resume=cp.Resume(on_step=lambda progress, pruned: snapshots(pruned)))


def imagenet_study(args: argparse.Namespace) -> dict:
    """The JSON entry of docs/specialise.md for the pretrained network."""
    net = Network.shipped(NETWORK)
    began = time.perf_counter()
    scoring_all, test_all = windows(net, args.windows, 0), windows(net, args.windows, 1)
    counts = Counter(scoring_all.tensors[1].tolist())
    kept = sorted(c for c, _ in counts.most_common(args.imagenet_classes))
    subset = ClassSubset(tuple(kept), tuple(net.classes[c] for c in kept), len(net.classes))
    per_class = -(-args.imagenet_images // len(kept))  # each kept class's first windows
    labels = scoring_all.tensors[1].tolist()
    mine = sorted(i for c in kept for i in [j for j, y in enumerate(labels) if y == c][:per_class])
    chosen = TensorDataset(*(t[mine] for t in scoring_all.tensors))
    scoring, test = subset.dataset(chosen), subset.dataset(test_all)  # relabelled 0..K-1
    example, shape = scoring.tensors[0][:1], scoring.tensors[0].shape[1:]
    trimmed = cp.specialise(net.model, kept, example, net.classes)
    macs0 = macs_params(trimmed, shape)[0]
    trim_saves = macs_params(net.model, shape)[0] - macs0
    levels, lowest = args.imagenet_levels, min(args.imagenet_levels)
    nets, seconds = {}, {}

    def timed(name: str, snaps: Snapshots, prune) -> None:
        start = time.perf_counter()
        prune(snaps)
        nets[name], seconds[name] = snaps.taken, round(time.perf_counter() - start, 1)

    def share(model: nn.Module) -> float:
        return macs_params(model, shape)[0] / macs0

    timed(PRUNED[0], Snapshots(levels, share),
          lambda s: block_car(net.model, chosen, lowest, s, args, classes=kept))
    everything = TensorDataset(*(t[:len(chosen)] for t in scoring_all.tensors))
    timed(PRUNED[1], Snapshots(levels, lambda m: (macs_params(m, shape)[0] - trim_saves) / macs0),
          lambda s: block_car(net.model, everything, (lowest * macs0 + trim_saves) /
                              (macs0 + trim_saves), s, args))
    nets[PRUNED[1]] = {lv: (cp.specialise(m, kept, example, net.classes), s)
                       for lv, (m, s) in nets[PRUNED[1]].items()}
    for name, importance in zip(PRUNED[2:], ("magnitude", "taylor"), strict=True):
        timed(name, Snapshots(levels, share), lambda s, imp=importance: torch_pruning_global(
            trimmed, example, lowest, imp, TP_STEPS, data=tuple(scoring.tensors), share=s))
    return {"network": net.description, "classes": list(subset.names), "indices": kept,
            "scoring_windows": len(scoring), "all_class_scoring_windows": len(everything),
            "test_windows": len(test), "unpruned_agreement": agreement(trimmed, test)["top1"],
            "levels": {str(lv): {name: {"agreement": agreement(nets[name][lv][0], test)["top1"],
                                        "macs": nets[name][lv][1]} for name in PRUNED}
                       for lv in levels},
            "seconds": {"prune": seconds, "all": round(time.perf_counter() - began, 1)}}
