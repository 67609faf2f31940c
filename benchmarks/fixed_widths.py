"""Which filters, or how many per layer? Prunes a network to the same widths with CAR and with
other criteria, fine-tunes each the same way, and prints test accuracy before and after: if the
criteria end level, the widths (the global allocation) decide the fine-tuned accuracy.

    python benchmarks/fixed_widths.py [CHECKPOINT] --widths conv1=20 conv2=43 conv3=55
        [--widths ...] [--criteria car l2 random] [--finetune-epochs 2] [--seed 0]
        [--score-samples 2000] [--out runs/fixed_widths.json]

Each --widths is one allocation (conv layers pruned in the order given, CAR greedy with step 2).
"""

from __future__ import annotations

import argparse

import carprune as cp
from carprune import io
from carprune.car import Approximation, car_prune
from carprune.config import layer_value
from carprune.criteria import criterion_prune
from carprune.data import first_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="convnet-fmnist")
    parser.add_argument("--widths", nargs="+", action="append", type=layer_value(int),
                        required=True,
                        help="LAYER=COUNT ...; repeat the option for another allocation")
    parser.add_argument("--criteria", nargs="+", default=["car", "l2", "random"])
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-samples", type=int, default=2000)
    parser.add_argument("--out", default="runs/fixed_widths.json")
    args = parser.parse_args()
    data = cp.data.fashion_mnist()
    base = cp.load(args.checkpoint)
    scoring = first_images(data.val, args.score_samples, "--score-samples")
    rows = []
    for parts in args.widths:
        widths = dict(parts)
        for criterion in args.criteria:
            model = base
            for layer, keep in widths.items():
                model = (car_prune(model, scoring, [layer], keep=keep,
                                   approx=Approximation(step=2))
                         if criterion == "car" else
                         criterion_prune(model, scoring, [layer], criterion, keep=keep,
                                         seed=args.seed)).model
            pruned = cp.evaluate(model, data.test).accuracy
            cp.fit(model, data.train, args.finetune_epochs, cp.Recipe(lr=0.01, seed=args.seed),
                   desc=f"{criterion} {widths}")
            rows.append({"widths": widths, "criterion": criterion, "test_pruned": pruned,
                         "test_finetuned": cp.evaluate(model, data.test).accuracy})
            print(f"  {widths}  {criterion:8s} test {pruned:.4f} pruned, "
                  f"{rows[-1]['test_finetuned']:.4f} after {args.finetune_epochs} epochs")
    io.write_json(args.out, {"checkpoint": args.checkpoint, "seed": args.seed,
                             "finetune_epochs": args.finetune_epochs, "results": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
