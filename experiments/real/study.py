"""What `make real` measures on one network, without retraining:

- per layer (the paper's experiment): the first two prunable conv layers, one at a time, by
  every criterion of `cp.criteria`, agreement on test over a keep grid;
- post-training global pruning to a MACs target: global CAR in block mode with least-squares
  compensation, against Torch-Pruning's global magnitude and Taylor pruning at the same MACs
  (experiments/baselines.py), no fine-tuning;
- colour: the first layer's colour-selective filters (weight colour index above
  `WEIGHT_THRESHOLD`) among the first filters each criterion removes, against the layer's share,
  with the exact permutation p-value (hypergeometric: random order draws without replacement);
- diversity of the kept first-layer bank (and, in report.py, class importance).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

import carprune as cp
from carprune.compare import kept_counts, removal_order
from carprune.criteria import CRITERIA
from carprune.interpret.colour import WEIGHT_THRESHOLD, colour_selectivity, diversity_comparison
from carprune.measure import macs_params

from ..baselines import torch_pruning_global
from .networks import Network
from .splits import Split, agreement, device_of

FIRST_COLOUR = 20
MIN_KEEP = 0.1
BLOCK_RIDGE = 1e-2  # block CAR refits on a few windows: a ridge 100x --compensate's
CURVE_MACS = (0.9, 0.7)  # global runs also measure agreement where they pass these MACs


def per_layer(model: nn.Module, split: Split, layer: str, args: argparse.Namespace,
              num_classes: int) -> tuple[dict, dict[str, list[list[int]]]]:
    """Agreement on test of `layer` pruned by every criterion at every keep of the grid (random:
    the mean of `random_seeds` seeds), and the removal orders (scored on the scoring split).
    Criteria that remove the same filters share one evaluation."""
    scoring = cp.ScoringSet.from_any(split.scoring, num_classes).to(device_of(model))
    surgery = cp.Surgery(model, scoring.example())
    n = surgery.size(layer)
    counts = kept_counts(n, args.keep_grid)
    table, orders, seen = {}, {}, {}

    def without(removed: list[int]) -> dict:
        key = frozenset(removed)
        if key not in seen:
            with surgery.ablated([cp.Unit(layer, c) for c in removed]):
                seen[key] = agreement(surgery.model, split.test)
        return seen[key]

    for name in tqdm(CRITERIA, desc=f"per layer {layer}", unit="criterion",
                     disable=not args.progress):
        seeds = range(args.random_seeds) if name == "random" else [args.seed]
        orders[name] = [removal_order(model, scoring, layer, name, counts[-1], s, args.progress)
                        for s in seeds]
        table[name] = {str(kept): _mean([without(o[:n - kept]) for o in orders[name]])
                       for kept in counts}
    return table, orders


def _mean(results: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


class Curve:
    """A global run's agreement on test the first time its MACs fall to each level of
    CURVE_MACS (one point per level, so that runs line up), and the seconds the curve took
    apart from the run to the target (its evaluations, and block CAR's runs to each level)."""

    def __init__(self, test: TensorDataset, start: float):
        self.test, self.start = test, start
        self.left, self.points, self.seconds = list(CURVE_MACS), [], 0.0

    def __call__(self, model: nn.Module) -> float:
        """The model's share of the starting MACs, its agreement kept if it passed a level."""
        share = macs_params(model, self.test.tensors[0].shape[1:])[0] / self.start
        passed = [level for level in self.left if share <= level]
        if passed:
            began = time.perf_counter()
            kept = agreement(model, self.test)
            self.points += [{"level": level, "macs": share, **kept} for level in passed]
            self.left = self.left[len(passed):]
            self.seconds += time.perf_counter() - began
        return share


def block_car(model: nn.Module, data: TensorDataset, args: argparse.Namespace,
              target: float) -> tuple[nn.Module, list[str]]:
    """Global CAR in block mode with least-squares compensation, down to `target` of the MACs:
    every round each layer offers the `block_fraction` of its filters that the first-order
    estimate ranks least needed, scored jointly (refit on half the images, judged on the other
    half), and the `blocks_per_round` best per MAC saved go, the last round only as many as
    the target needs. Residual-stage layers stay whole (under compensation they score on the
    naive path). Returns the pruned network and the residual layers left whole."""
    surgery = cp.Surgery(model, data.tensors[0][:1].to(device_of(model)))
    residual = [n for n in surgery.conv_layers() if surgery.kind(n) == "residual"]
    result, _ = cp.global_car_prune(
        model, data, target=target, layers=[n for n in surgery.conv_layers() if n not in residual],
        budget=cp.Budget(kind="macs", min_keep=MIN_KEEP),
        approx=cp.Approximation(blocks=args.block_fraction, step=args.blocks_per_round),
        engine=cp.EngineOptions(compensate=True, ridge=BLOCK_RIDGE), progress=args.progress)
    return result.model, residual


def block_car_curve(model: nn.Module, data: TensorDataset, args: argparse.Namespace,
                    curve: Curve) -> tuple[nn.Module, list[str]]:
    """Block CAR asked for each level of CURVE_MACS above `target_macs` (one run each, onto
    `curve`), then for `target_macs`, whose run it returns: a round removes several blocks, so
    a curve taken after every round would meet each level up to a round's worth of MACs below
    it, where Torch-Pruning's many small steps meet it within one step."""
    for level in [lv for lv in CURVE_MACS if lv > args.target_macs]:
        began = time.perf_counter()
        pruned, _ = block_car(model, data, args, level)
        curve.seconds += time.perf_counter() - began
        curve(pruned)
    return block_car(model, data, args, args.target_macs)


def global_pruning(model: nn.Module, split: Split, args: argparse.Namespace) -> dict:
    """Post-training global pruning to `target_macs`: block CAR with compensation (on the
    first `global_images` scoring windows), then Torch-Pruning's global magnitude and Taylor
    pruning down to the MACs block CAR reached; agreement on test, at the end and on the way
    (CURVE_MACS: where Torch-Pruning's steps first pass each level, and block CAR asked for
    it)."""
    start = macs_params(model, split.test.tensors[0].shape[1:])[0]
    data = TensorDataset(*(t[:args.global_images] for t in split.scoring.tensors))
    x, y = (t.to(device_of(model)) for t in data.tensors)
    x = x.contiguous(memory_format=torch.channels_last)  # a fifth faster gradients on CPU
    results, target = {}, args.target_macs
    for name in ("car-compensate", "tp-magnitude", "tp-taylor"):
        began, curve = time.perf_counter(), Curve(split.test, start)
        if name == "car-compensate":
            pruned, residual = block_car_curve(model, data, args, curve)
        else:
            pruned = torch_pruning_global(model, x[:1], target, name[3:], args.tp_steps,
                                          data=(x, y), share=curve)
        seconds, share = time.perf_counter() - began - curve.seconds, curve(pruned)
        if name == "car-compensate":
            target = share  # Torch-Pruning goes down to the MACs block CAR reached
        results[name] = {"seconds": round(seconds, 1), **agreement(pruned, split.test),
                         "macs": share, "curve": curve.points}
    return {"methods": results, "images": len(data), "ignored_residual_layers": residual,
            "block_fraction": args.block_fraction, "blocks_per_round": args.blocks_per_round}


def colour_tail(n: int, colour: int, first: int, observed: int) -> float:
    """P(at least `observed` colour filters among the first `first` of a uniformly random order
    of `n` filters, `colour` of them colour-selective): the permutation p-value, exactly."""
    ways = sum(math.comb(colour, j) * math.comb(n - colour, first - j)
               for j in range(observed, min(colour, first) + 1))
    return ways / math.comb(n, first)


def colour_counts(weight: torch.Tensor, orders: dict[str, list[list[int]]]) -> dict | None:
    """Colour-selective filters among the first FIRST_COLOUR removed (the first half for layers
    under twice that), per criterion (random: the mean over its seeds), the layer's share, and
    each criterion's p-value against random order. None unless the layer reads RGB."""
    index = colour_selectivity(weight)
    if index is None:
        return None
    n = len(index)
    selective = {i for i, v in enumerate(index) if v > WEIGHT_THRESHOLD}
    first = FIRST_COLOUR if n >= 2 * FIRST_COLOUR else n // 2
    counts = {name: float(np.mean([len(selective & set(o[:first])) for o in runs]))
              for name, runs in orders.items()}
    return {**counts, "share": len(selective) / n, "first": first, "filters": n,
            "colour_filters": len(selective), "threshold": WEIGHT_THRESHOLD,
            "expected_at_share": len(selective) * first / n,
            "p_value": {name: colour_tail(n, len(selective), first, int(c))
                        for name, c in counts.items() if name != "random"},
            "index": [float(v) for v in index]}


def run_network(net: Network, split: Split, args: argparse.Namespace) -> tuple[dict, dict]:
    """Everything the experiment measures on one network: its JSON entry (the layout of
    docs/real.md), and the removal orders per layer and criterion (for the report)."""
    began = time.perf_counter()
    per, curves, orders = {}, {}, {}
    halves = {layer: kept_counts(net.model.get_submodule(layer).out_channels, [0.5])[0]
              for layer in net.layers}
    for layer in net.layers:
        curves[layer], orders[layer] = per_layer(net.model, split, layer, args, len(net.classes))
        per[layer] = {name: points[str(halves[layer])]["top1"]
                      for name, points in curves[layer].items()}
    first = net.model.get_submodule(net.layers[0])
    car_half = orders[net.layers[0]]["car"][0][:first.out_channels - halves[net.layers[0]]]
    result = {
        "network": net.description, "layers": list(net.layers), "per_layer": per,
        "per_layer_curves": curves,
        "colour": colour_counts(first.weight, orders[net.layers[0]]),
        "diversity": diversity_comparison(first.weight, car_half, args.seed),
        "split": split.info, "unpruned": agreement(net.model, split.test),
        "removal_orders": {layer: {name: runs[0] for name, runs in by.items()}
                           for layer, by in orders.items()}}
    details = global_pruning(net.model, split, args)
    result["global_half_macs"] = {name: m["top1"] for name, m in details["methods"].items()}
    result["global"] = details
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result, orders
