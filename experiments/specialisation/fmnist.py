"""The Fashion-MNIST half of the study: the shipped convnet specialised to a class subset and
pruned to a few levels of the MACs five ways, then tested on the subset's test images, as
pruned and after the same fine-tuning (median over seeds).

- subset CAR: `cp.global_car_prune(..., classes=...)`, scored on the subset's val images;
- all-class CAR, head trimmed: global CAR scored on all ten classes, then `cp.specialise`;
- Torch-Pruning's global magnitude and Taylor pruning of the specialised network
  (experiments/baselines.py; Taylor's gradients on the subset's val images);
- scratch: the widths subset CAR kept, trained from random weights for the same epochs.

One run of each method goes down to the lowest level; the network is copied the first time its
MACs fall to each level, so every level comes from the same run. MACs are a share of the
specialised (head-trimmed) unpruned network's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import carprune as cp
from carprune.classes import ClassSubset, output_names
from carprune.measure import macs_params

from ..baselines import torch_pruning_global

SUBSETS = {"easy": ("trouser", "sneaker", "bag"),
           "hard": ("t-shirt/top", "pullover", "coat", "shirt")}
PRUNED = ("subset CAR", "all-class CAR, head trimmed", "TP magnitude", "TP Taylor")
SCRATCH = "scratch, same widths"
TP_STEPS = 200
TAYLOR_IMAGES = 512  # the subset's first val images Taylor's gradients are taken on
FINETUNE_LR, SCRATCH_LR = 0.01, 0.05  # carprune prune's and carprune train's defaults


class Snapshots:
    """Copies of a network the first time its `share` of the MACs falls to each level."""

    def __init__(self, levels: list[float], share: Callable[[nn.Module], float]):
        self.left, self.share = sorted(levels, reverse=True), share
        self.taken: dict[float, tuple[nn.Module, float]] = {}

    def __call__(self, model: nn.Module) -> float:
        share = self.share(model)
        for level in [lv for lv in self.left if share <= lv]:
            self.taken[level] = (copy.deepcopy(model).eval(), share)
        self.left = [lv for lv in self.left if share > lv]
        return share


def widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def global_car(model: nn.Module, scoring, target: float, snapshots: Snapshots,
               args: argparse.Namespace, classes=None) -> None:
    """Global CAR of every conv layer down to `target`, feeding every round's network to
    `snapshots`."""
    cp.global_car_prune(
        model, scoring, target, classes=classes,
        approx=cp.Approximation(step=args.step, shortlist=args.shortlist, race=args.race),
        engine=cp.EngineOptions(compensate=args.compensate), progress=args.progress,
        resume=cp.Resume(on_step=lambda progress, pruned: snapshots(pruned)))


def pruned_networks(model: nn.Module, trimmed: nn.Module, data, names: tuple[str, ...],
                    subset_data, args: argparse.Namespace) -> tuple[dict, dict]:
    """Per method of PRUNED, level -> (specialised pruned network, its share of the MACs), and
    each method's seconds; `trimmed` is `model` specialised to `names`."""
    shape, levels, example = data.input_shape, args.levels, data.example(1)
    macs0 = macs_params(trimmed, shape)[0]
    trim_saves = macs_params(model, shape)[0] - macs0  # the head's MACs trimming removes

    def share(net: nn.Module) -> float:
        return macs_params(net, shape)[0] / macs0

    nets, seconds = {}, {}
    began, snaps = time.perf_counter(), Snapshots(levels, share)
    global_car(model, cp.data.first_images(data.val, args.score_samples, "--score-samples"),
               min(levels), snaps, args, classes=list(names))
    nets[PRUNED[0]], seconds[PRUNED[0]] = snaps.taken, time.perf_counter() - began
    began = time.perf_counter()
    snaps = Snapshots(levels, lambda net: (macs_params(net, shape)[0] - trim_saves) / macs0)
    global_car(model, cp.data.first_images(data.val, args.all_samples, "--all-samples"),
               (min(levels) * macs0 + trim_saves) / (macs0 + trim_saves), snaps, args)
    nets[PRUNED[1]] = {level: (cp.specialise(net, names, example), s)
                       for level, (net, s) in snaps.taken.items()}
    seconds[PRUNED[1]] = time.perf_counter() - began
    x, y = subset_data.val.tensors[0][:TAYLOR_IMAGES], subset_data.val.tensors[1][:TAYLOR_IMAGES]
    for name, importance in zip(PRUNED[2:], ("magnitude", "taylor"), strict=True):
        began, snaps = time.perf_counter(), Snapshots(levels, share)
        torch_pruning_global(trimmed, example, min(levels), importance, TP_STEPS, data=(x, y),
                             share=snaps)
        nets[name], seconds[name] = snaps.taken, time.perf_counter() - began
    return nets, seconds


def finetuned(net: nn.Module, train, test, args: argparse.Namespace, teacher: nn.Module,
              desc: str) -> list[float]:
    """Test accuracy of copies of `net` after `args.epochs` epochs on `train`, one per seed
    (with --distill, towards `teacher`'s outputs too)."""
    out = []
    for seed in range(args.seeds):
        tuned = copy.deepcopy(net)
        recipe = cp.Recipe(lr=FINETUNE_LR, batch_size=args.finetune_batch, seed=seed,
                           shift_and_flip=args.augment, teacher=teacher if args.distill else None)
        cp.fit(tuned, train, args.epochs, recipe, desc=f"{desc} seed {seed}",
               progress=args.progress)
        out.append(cp.evaluate(tuned, test).accuracy)
    return out


def from_scratch(widths_of: list[int], classes: int, train, test,
                 args: argparse.Namespace) -> list[float]:
    """Test accuracy of the zoo convnet with these conv widths, trained from random weights
    (seeded) for `args.epochs` epochs, one per seed."""
    out = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        net = cp.create_model("convnet", num_classes=classes, widths=tuple(widths_of))
        recipe = cp.Recipe(lr=SCRATCH_LR, batch_size=args.finetune_batch, seed=seed,
                           shift_and_flip=args.augment)
        cp.fit(net, train, args.epochs, recipe, desc=f"scratch seed {seed}",
               progress=args.progress)
        out.append(cp.evaluate(net, test).accuracy)
    return out


def row(test_pruned: float | None, seeds: list[float], share: float,
        kept: list[int]) -> dict:
    return {"test_pruned": test_pruned, "test_finetuned": statistics.median(seeds),
            "test_finetuned_seeds": seeds, "macs": share, "widths": kept}


def subset_study(model: nn.Module, data, key: str, args: argparse.Namespace) -> dict:
    """Every method at every level on one subset of SUBSETS: the JSON entry of
    docs/specialise.md."""
    names = SUBSETS[key]
    subset = ClassSubset.resolve(names, output_names(model), len(data.classes))
    sub = subset.data(data)
    train = cp.data.first_images(sub.train, args.train_samples, "--train-samples")
    teacher = cp.specialise(model, names, data.example(1))
    unpruned = cp.evaluate(teacher, sub.test).accuracy
    nets, seconds = pruned_networks(model, teacher, data, names, sub, args)
    levels: dict[str, dict] = {}
    began = time.perf_counter()
    for level in args.levels:
        at = levels[str(level)] = {}
        for name in PRUNED:
            net, share = nets[name][level]
            at[name] = row(cp.evaluate(net, sub.test).accuracy,
                           finetuned(net, train, sub.test, args, teacher, name), share,
                           widths(net))
        car_widths = at[PRUNED[0]]["widths"]
        at[SCRATCH] = row(None, from_scratch(car_widths, len(names), train, sub.test, args),
                          at[PRUNED[0]]["macs"], car_widths)
    return {"classes": list(subset.names), "indices": list(subset.indices),
            "unpruned_test": unpruned, "test_images": len(sub.test),
            "scoring_images": {
                "subset CAR": len(subset.dataset(cp.data.first_images(
                    data.val, args.score_samples, "--score-samples"))),
                "all-class CAR": len(cp.data.first_images(data.val, args.all_samples,
                                                          "--all-samples"))},
            "train_images": len(train), "levels": levels,
            "seconds": {"prune": {k: round(v, 1) for k, v in seconds.items()},
                        "finetune_and_scratch": round(time.perf_counter() - began, 1)}}
