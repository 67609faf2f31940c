"""Global CAR against Torch-Pruning's own global magnitude pruning, side by side: the same
MACs budget, the same fine-tuning, test accuracy at the end.

    python benchmarks/global_vs_magnitude.py [CHECKPOINT] [--target-macs 0.5]
        [--finetune-epochs 2] [--step 2] [--score-samples 2000]
        [--out runs/global_vs_magnitude.json]

Torch-Pruning: `BasePruner` with `GroupMagnitudeImportance` and `global_pruning=True`, stepped
until the MACs are at or under the target (conv layers only, as global CAR). CAR: carprune's
global CAR (accuracy lost per MAC saved, scored on the val split).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch_pruning as tp
from torch import nn

import carprune as cp
from carprune import io
from carprune.measure import macs_params, speed_report
from carprune.runs import first_images


def magnitude(model: nn.Module, target: float, shape) -> nn.Module:
    model = copy.deepcopy(model).eval()
    example = torch.zeros(1, *shape)
    start = macs_params(model, shape)[0]
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=True, pruning_ratio=0.9, iterative_steps=200,
        ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)])
    while macs_params(model, shape)[0] > target * start:
        pruner.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="convnet-fmnist")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--score-samples", type=int, default=2000,
                        help="val images global CAR scores on (the first N)")
    parser.add_argument("--out", default="runs/global_vs_magnitude.json")
    args = parser.parse_args()
    data = cp.data.fashion_mnist()
    model = cp.load(args.checkpoint)
    shape = data.input_shape
    rows = {}
    scoring = first_images(data.val, args.score_samples, "--score-samples")
    car, _ = cp.global_car_prune(model, scoring, args.target_macs, step=args.step)
    for name, pruned in (("global CAR", car.model),
                         ("Torch-Pruning magnitude", magnitude(model, args.target_macs, shape))):
        before = cp.evaluate(pruned, data.test).accuracy
        cp.fit(pruned, data.train, args.finetune_epochs, lr=0.01, seed=0, desc=name)
        rows[name] = {"test_pruned": before, "test_finetuned": cp.evaluate(pruned, data.test)
                      .accuracy, **speed_report(pruned, shape),
                      "filters": {n: m.out_channels for n, m in pruned.named_modules()
                                  if isinstance(m, nn.Conv2d)}}
    base = speed_report(model, shape)
    io.write_json(args.out, {"checkpoint": args.checkpoint, "target_macs": args.target_macs,
                             "finetune_epochs": args.finetune_epochs, "baseline": base,
                             "baseline_test": cp.evaluate(model, data.test).accuracy,
                             "results": rows})
    print(f"{args.checkpoint}: MACs {base['macs']:,} -> target {args.target_macs:.0%}, "
          f"then {args.finetune_epochs} epochs of the same fine-tuning")
    for name, r in rows.items():
        print(f"  {name:24s} MACs {r['macs'] / base['macs']:.1%}  test {r['test_pruned']:.4f} "
              f"pruned, {r['test_finetuned']:.4f} fine-tuned; latency b64 "
              f"{r['latency_ms_batch64']:.1f} ms (baseline {base['latency_ms_batch64']:.1f}); "
              f"filters {r['filters']}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
