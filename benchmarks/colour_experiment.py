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
    car = cp.car_prune(model, data.val, ["conv1"], keep=n - args.first).layers["conv1"].removed
    scoring = ScoringSet.from_any(data.val, 10)
    surgery = Surgery(copy.deepcopy(model), scoring.example())
    l1 = ranking("l1", surgery, "conv1", scoring)[:args.first]
    randoms = [len(colour & set(ranking("random", surgery, "conv1", scoring, seed)[:args.first]))
               for seed in range(20)]
    result = {"threshold": WEIGHT_THRESHOLD, "first": args.first, "filters": n,
              "colour_filters": len(colour), "expected_at_share": len(colour) * args.first / n,
              "car": len(colour & set(car)), "l1": len(colour & set(l1)),
              "random_mean": statistics.mean(randoms), "random_min": min(randoms),
              "random_max": max(randoms), "car_order": car, "colour_index": index.tolist(),
              "test_accuracy": cp.evaluate(model, data.test).accuracy}
    io.write_json(args.out, result)
    print(f"conv1: {len(colour)} of {n} filters are colour-selective (weight colour index > "
          f"{WEIGHT_THRESHOLD}); at the layer's share, {result['expected_at_share']:.1f} of the "
          f"first {args.first} removed would be")
    print(f"colour filters among the first {args.first} removed: CAR {result['car']}, "
          f"l1 {result['l1']}, random {result['random_mean']:.1f} "
          f"(min {min(randoms)}, max {max(randoms)}, 20 seeds)")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
