"""Does CAR drop colour filters first? The controlled case: Fashion-MNIST tinted with random
colours independent of the class, and the convnet trained on it (`convnet-fmnist-colour`).

    python benchmarks/colour_experiment.py [--first 20] [--out runs/colour.json]

For conv1 it counts the colour-selective filters (weight colour index above the report's
threshold, see carprune.interpret.colour) among the first N filters each criterion removes,
against the layer's share: greedy CAR (scored on val), l1, and random (mean of 20 seeds).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import carprune as cp
from carprune import io
from carprune.criteria import ranking
from carprune.groups import Surgery
from carprune.interpret.colour import WEIGHT_THRESHOLD, colour_selectivity
from carprune.scoring import ScoringSet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=20)
    parser.add_argument("--out", default="runs/colour.json")
    args = parser.parse_args()
    data = cp.data.fashion_mnist_colour()
    model = cp.load("convnet-fmnist-colour")
    index = colour_selectivity(model.conv1.weight)
    colour = {i for i, v in enumerate(index) if v > WEIGHT_THRESHOLD}
    n = model.conv1.out_channels
    # threshold-free: the more colour-selective half of the layer
    upper = set(sorted(range(n), key=lambda i: -index[i])[:n // 2])
    car = cp.car_prune(model, data.val, ["conv1"], keep=n - args.first).layers["conv1"].removed
    scoring = ScoringSet.from_any(data.val, 10)
    surgery = Surgery(copy.deepcopy(model), scoring.example())
    l1 = ranking("l1", surgery, "conv1", scoring)[:args.first]
    random_orders = [ranking("random", surgery, "conv1", scoring, seed)[:args.first]
                     for seed in range(20)]
    randoms = [len(colour & set(order)) for order in random_orders]
    upper_randoms = [len(upper & set(order)) for order in random_orders]
    result = {"threshold": WEIGHT_THRESHOLD, "first": args.first, "filters": n,
              "colour_filters": len(colour), "expected_at_share": len(colour) * args.first / n,
              "car": len(colour & set(car)), "l1": len(colour & set(l1)),
              "random_mean": statistics.mean(randoms), "random_min": min(randoms),
              "random_max": max(randoms), "upper_half": {
                  "car": len(upper & set(car)), "l1": len(upper & set(l1)),
                  "random_mean": statistics.mean(upper_randoms),
                  "expected_at_share": args.first / 2},
              "car_order": car, "colour_index": index.tolist(),
              "test_accuracy": cp.evaluate(model, data.test).accuracy}
    io.write_json(args.out, result)
    print(f"conv1: {len(colour)} of {n} filters are colour-selective (weight colour index > "
          f"{WEIGHT_THRESHOLD}); at the layer's share, {result['expected_at_share']:.1f} of the "
          f"first {args.first} removed would be")
    print(f"colour filters among the first {args.first} removed: CAR {result['car']}, "
          f"l1 {result['l1']}, random {result['random_mean']:.1f} "
          f"(min {min(randoms)}, max {max(randoms)}, 20 seeds)")
    half = result["upper_half"]
    print(f"threshold-free: of the first {args.first} removed, from the more colour-selective "
          f"half of the layer: CAR {half['car']}, l1 {half['l1']}, random "
          f"{half['random_mean']:.1f} (share {args.first / 2:.0f})")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
