"""Global CAR on an ImageNet-class network on two cores: torchvision's resnet18 at 112 px (random
weights: no pretrained ones can be had here) to 0.7 of its MACs, scored on 256 windows of the
packages' photographs labelled by the network's own predictions, in the approximate
--shortlist mode (issue target: under 30 minutes; one exact round alone is over an hour).
Also checks the printed estimate of an exact round against the measured time of at least 100
candidates of each unit kind.

    python benchmarks/big_global.py [--size 112] [--images 256] [--target 0.7]
                                    [--shortlist 64] [--step 32] [--skip-estimate]

Prints the run's figures and writes runs/bench/big_global.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch.utils.data import TensorDataset

from carprune import io
from carprune.car import Approximation, global_car_prune
from carprune.car.ranking import group_leaders
from carprune.data import IMAGENET_STATS, normalise, package_photos, photo_windows
from carprune.estimate import layer_costs, round_seconds
from carprune.groups import Surgery, Unit
from carprune.measure import macs_params
from carprune.scoring import FastEngine, ScoringSet
from carprune.train import evaluate


def windows(model, size: int, images: int, seed: int) -> TensorDataset:
    x, _ = photo_windows(package_photos(), per_photo=images, size=size, seed=seed)
    x = normalise(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
                    [:images]], *IMAGENET_STATS)
    with torch.inference_mode():
        y = torch.cat([model(b).argmax(1) for b in x.split(64)])
    return TensorDataset(x, y)


def estimate_check(model, scoring: ScoringSet, minimum: int = 100) -> list[dict]:
    """Per unit kind: the estimate of scoring whole layers of that kind (at least `minimum`
    candidates) against the measured time of doing it."""
    surgery = Surgery(model, scoring.example())
    engine = FastEngine()
    leaders = group_leaders(surgery, surgery.conv_layers())
    rows = []
    for kind in dict.fromkeys(surgery.kind(n) for n in leaders):
        chosen, count = [], 0
        for name in (n for n in leaders if surgery.kind(n) == kind):
            if count >= minimum:
                break
            chosen.append(name)
            count += surgery.size(name)
        sizes = {n: surgery.size(n) for n in chosen}
        estimate = round_seconds(layer_costs(engine, surgery, chosen, scoring), sizes)
        start = time.perf_counter()
        for name in chosen:
            engine.score(surgery, [Unit(name, c) for c in range(sizes[name])], scoring)
        measured = time.perf_counter() - start
        rows.append({"kind": kind, "layers": chosen, "candidates": count,
                     "estimate_seconds": estimate, "measured_seconds": measured,
                     "error": estimate / measured - 1})
        print(f"{kind}: {count} candidates in {', '.join(chosen)}: estimated {estimate:.0f} s, "
              f"measured {measured:.0f} s ({100 * (estimate / measured - 1):+.0f}%)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--shortlist", type=int, default=64)
    parser.add_argument("--step", type=int, default=32)
    parser.add_argument("--skip-estimate", action="store_true")
    parser.add_argument("--out", default="runs/bench/big_global.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(memory_format=torch.channels_last)
    scoring, test = (windows(model, args.size, args.images, seed) for seed in (0, 1))
    shape = (3, args.size, args.size)
    checks = [] if args.skip_estimate else estimate_check(model, ScoringSet.from_any(scoring))
    start = time.perf_counter()
    result, steps = global_car_prune(model, scoring, args.target,
                                     approx=Approximation(step=args.step,
                                                          shortlist=args.shortlist))
    seconds = time.perf_counter() - start
    before, after = macs_params(model, shape)[0], macs_params(result.model, shape)[0]
    agreement = evaluate(result.model, test).accuracy
    units = sum(r.filters_before for r in result.layers.values())
    print(f"resnet18 at {args.size} px, {args.images} scoring images, {units} units: global CAR "
          f"--shortlist {args.shortlist} --step {args.step} to {args.target} of the MACs took "
          f"{seconds / 60:.1f} min; MACs {before / 1e9:.3f}G -> {after / 1e9:.3f}G; "
          f"{sum(len(s.removed) for s in steps)} units removed; agreement with the original "
          f"on {len(test)} other windows {agreement:.3f}")
    io.write_json(args.out, {"size": args.size, "images": args.images, "units": units,
                             "target": args.target, "shortlist": args.shortlist,
                             "step": args.step, "seconds": seconds, "macs_before": before,
                             "macs_after": after, "agreement": agreement,
                             "estimate_check": checks,
                             "filters": {n: [r.filters_before, r.filters_after]
                                         for n, r in result.layers.items()}})


if __name__ == "__main__":
    main()
