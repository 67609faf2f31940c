"""Global CAR against Torch-Pruning's own global magnitude pruning, side by side: the same
MACs budget, the same fine-tuning, test accuracy at the end.

    python -m experiments.global_vs_magnitude [CHECKPOINT] [--target-macs 0.5]
        [--finetune-epochs 2] [--seeds 1] [--step 2] [--screen M] [--score-samples 2000]
        [--round-to N] [--compensate] [--out runs/global_vs_magnitude.json]

Torch-Pruning: `BasePruner` with `GroupMagnitudeImportance` and `global_pruning=True`, stepped
until the MACs are at or under the target (conv layers only, as global CAR; the one helper both
studies use, experiments/baselines.py). CAR: carprune's
global CAR (accuracy lost per MAC saved, scored on the val split). With --seeds N each pruned
network is fine-tuned N times (seeds 0..N-1): median and range of the test accuracy.
--round-to N leaves every layer a multiple of N filters in both (Torch-Pruning's `round_to`).
--compensate: global CAR scores and removes with least-squares refits of the consumers.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

import carprune as cp
from carprune.measure import speed_report

from ..baselines import torch_pruning_global

TP_STEPS = 200


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="convnet-fmnist")
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds (default 1)")
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--screen", type=int, default=None,
                        help="re-score only the M first units each round (an approximation)")
    parser.add_argument("--score-samples", type=int, default=2000,
                        help="val images global CAR scores on (the first N)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="keep a multiple of N filters per layer in both (default 1)")
    parser.add_argument("--compensate", action="store_true",
                        help="global CAR refits consumers by least squares")
    parser.add_argument("--out", default="runs/global_vs_magnitude.json")
    return parser.parse_args(argv)


def pruned_both(model: nn.Module, scoring, shape, args: argparse.Namespace) -> dict:
    """The network pruned to `target_macs` by global CAR (scored on `scoring`) and by
    Torch-Pruning's global magnitude pruning, both under the same `round_to`."""
    car, _ = cp.global_car_prune(
        model, scoring, args.target_macs, budget=cp.Budget(round_to=args.round_to),
        approx=cp.Approximation(step=args.step, screen=args.screen),
        engine=cp.EngineOptions(compensate=args.compensate))
    return {"global CAR": car.model,
            "Torch-Pruning magnitude": torch_pruning_global(
                model, torch.zeros(1, *shape), args.target_macs, "magnitude", TP_STEPS,
                args.round_to)}


def compared(pruned: dict, data, args: argparse.Namespace) -> dict:
    """Per method: test accuracy as pruned and after the same fine-tuning (median over
    `seeds`), speed and filters kept."""
    rows = {}
    for name, model in pruned.items():
        finetuned = []
        for seed in range(args.seeds):
            tuned = copy.deepcopy(model)
            cp.fit(tuned, data.train, args.finetune_epochs, cp.Recipe(lr=0.01, seed=seed),
                   desc=f"{name} seed {seed}")
            finetuned.append(cp.evaluate(tuned, data.test).accuracy)
        rows[name] = {"test_pruned": cp.evaluate(model, data.test).accuracy,
                      "test_finetuned": statistics.median(finetuned),
                      "test_finetuned_seeds": finetuned,
                      **speed_report(model, data.input_shape),
                      "filters": {n: m.out_channels for n, m in model.named_modules()
                                  if isinstance(m, nn.Conv2d)}}
    return rows


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    data = cp.data.fashion_mnist()
    model = cp.load(args.checkpoint)
    scoring = cp.data.first_images(data.val, args.score_samples, "--score-samples")
    rows = compared(pruned_both(model, scoring, data.input_shape, args), data, args)
    base = speed_report(model, data.input_shape)
    base_test = cp.evaluate(model, data.test).accuracy
    cp.io.write_json(args.out, {"checkpoint": args.checkpoint, "target_macs": args.target_macs,
                                "finetune_epochs": args.finetune_epochs, "seeds": args.seeds,
                                "round_to": args.round_to, "compensate": args.compensate,
                                "baseline": base, "baseline_test": base_test, "results": rows})
    print(f"{args.checkpoint}: test {base_test:.4f}, MACs {base['macs']:,} -> target "
          f"{args.target_macs:.0%}, then {args.finetune_epochs} epochs of the same fine-tuning "
          f"({args.seeds} seeds: median, min-max)")
    for name, r in rows.items():
        seeds = r["test_finetuned_seeds"]
        print(f"  {name:24s} MACs {r['macs'] / base['macs']:.1%}  test {r['test_pruned']:.4f} "
              f"pruned, {r['test_finetuned']:.4f} ({min(seeds):.4f}-{max(seeds):.4f}) "
              f"fine-tuned; latency b1 {r['latency_ms_batch1']:.2f} ms, b64 "
              f"{r['latency_ms_batch64']:.1f} ms (baseline {base['latency_ms_batch1']:.2f}, "
              f"{base['latency_ms_batch64']:.1f}); filters {r['filters']}")
    print(f"written to {args.out}")
    return 0
