"""Does CAR drop colour filters first? The controlled case: Fashion-MNIST tinted with random
colours independent of the class, and the convnet trained on it (`convnet-fmnist-colour`).

    python -m experiments.colour [--first 20] [--out runs/colour.json]

For conv1 it counts the colour-selective filters (weight colour index above the report's
threshold, see cp.interpret.colour) among the first N filters each criterion removes,
against the layer's share: greedy CAR (scored on val), l1, and random (mean of 20 seeds).
"""

from __future__ import annotations

import argparse
import statistics

from torch import nn
from torch.utils.data import Dataset

import carprune as cp
from carprune.criteria import ranking
from carprune.interpret.colour import WEIGHT_THRESHOLD, colour_selectivity

LAYER = "conv1"
SEEDS = 20


def counts(model: nn.Module, scoring: Dataset, first: int) -> dict:
    """The colour-selective filters of LAYER among the first `first` that greedy CAR (scored on
    `scoring`), l1 and random orders (SEEDS) remove, and, threshold-free, those from the more
    colour-selective half of the layer."""
    index = colour_selectivity(model.get_submodule(LAYER).weight)
    colour = {i for i, v in enumerate(index) if v > WEIGHT_THRESHOLD}
    n = len(index)
    upper = set(sorted(range(n), key=lambda i: -index[i])[:n // 2])
    car = cp.car_prune(model, scoring, [LAYER], keep=n - first).layers[LAYER].removed
    scoring_set = cp.ScoringSet.from_any(scoring)
    surgery = cp.Surgery(model, scoring_set.example())
    l1 = ranking("l1", surgery, LAYER, scoring_set)[:first]
    random_orders = [ranking("random", surgery, LAYER, scoring_set, seed)[:first]
                     for seed in range(SEEDS)]
    randoms = [len(colour & set(order)) for order in random_orders]
    upper_randoms = [len(upper & set(order)) for order in random_orders]
    return {"threshold": WEIGHT_THRESHOLD, "first": first, "filters": n,
            "colour_filters": len(colour), "expected_at_share": len(colour) * first / n,
            "car": len(colour & set(car)), "l1": len(colour & set(l1)),
            "random_mean": statistics.mean(randoms), "random_min": min(randoms),
            "random_max": max(randoms), "upper_half": {
                "car": len(upper & set(car)), "l1": len(upper & set(l1)),
                "random_mean": statistics.mean(upper_randoms),
                "expected_at_share": first / 2},
            "car_order": car, "colour_index": index.tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=20)
    parser.add_argument("--out", default="runs/colour.json")
    args = parser.parse_args(argv)
    data = cp.data.fashion_mnist_colour()
    model = cp.load("convnet-fmnist-colour")
    result = {**counts(model, data.val, args.first),
              "test_accuracy": cp.evaluate(model, data.test).accuracy}
    cp.io.write_json(args.out, result)
    first, half = args.first, result["upper_half"]
    print(f"{LAYER}: {result['colour_filters']} of {result['filters']} filters are "
          f"colour-selective (weight colour index > {WEIGHT_THRESHOLD}); at the layer's share, "
          f"{result['expected_at_share']:.1f} of the first {first} removed would be")
    print(f"colour filters among the first {first} removed: CAR {result['car']}, "
          f"l1 {result['l1']}, random {result['random_mean']:.1f} "
          f"(min {result['random_min']}, max {result['random_max']}, {SEEDS} seeds)")
    print(f"threshold-free: of the first {first} removed, from the more colour-selective "
          f"half of the layer: CAR {half['car']}, l1 {half['l1']}, random "
          f"{half['random_mean']:.1f} (share {first / 2:.0f})")
    print(f"written to {args.out}")
    return 0
