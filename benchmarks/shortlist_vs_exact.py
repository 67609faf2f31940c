"""The approximate --shortlist mode of global CAR (with or without --race) against exact
greedy (step 1, every unit every round) on the same scoring set: seconds, speed-up, the units
both removed, and test accuracy before fine-tuning and after one epoch (each run fine-tuned with
the same seeds, for its seed range). Issue targets: >= 10x faster, within 1 point of exact
before fine-tuning, within exact's seed range after. Each mode is SHORTLIST/STEP[/RACE].

    python benchmarks/shortlist_vs_exact.py convnet-fmnist --images 2000 --target 0.5 \
        --modes 64/4/250 24/2/250
    python benchmarks/shortlist_vs_exact.py resnet20-fmnist --images 128 --target 0.8 \
        --modes 16/1 24/2

Prints one table and writes runs/bench/shortlist_vs_exact-CHECKPOINT.json.
"""

from __future__ import annotations

import argparse
import copy

from torch.utils.data import TensorDataset

import carprune as cp
from carprune import io
from carprune.car import Approximation, global_car_prune
from carprune.commands.common import table
from carprune.data import load_data
from carprune.train import Recipe, evaluate, fit


def first(ds: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*[t[:n] for t in ds.tensors])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--modes", nargs="+", default=["32/4"],
                        help="approximate modes, each SHORTLIST/STEP or SHORTLIST/STEP/RACE")
    parser.add_argument("--train-samples", type=int, default=10000)
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per run")
    args = parser.parse_args()
    data = load_data("fashion-mnist")
    model = cp.load(args.checkpoint)
    scoring, train = first(data.val, args.images), first(data.train, args.train_samples)
    runs = {"exact": {}}
    for mode in args.modes:
        values = dict(zip(("shortlist", "step", "race"), map(int, mode.split("/")), strict=False))
        runs[" ".join(f"--{k} {v}" for k, v in values.items())] = values
    rows, report = [], {}
    for name, kwargs in runs.items():
        result, steps = global_car_prune(model, scoring, args.target,
                                         approx=Approximation(**kwargs))
        tuned = []
        for seed in range(args.seeds):
            net = copy.deepcopy(result.model)
            fit(net, train, 1, Recipe(lr=0.01, seed=seed), progress=False)
            tuned.append(evaluate(net, data.test).accuracy)
        report[name] = {"seconds": result.seconds, "removed": {n: r.removed for n, r in
                                                               result.layers.items()},
                        "test_pruned": evaluate(result.model, data.test).accuracy,
                        "test_finetuned": tuned, "rounds": len(steps)}
    exact = report["exact"]
    for name, r in report.items():
        same = sum(len(set(r["removed"][n]) & set(exact["removed"][n])) for n in r["removed"])
        rows.append([name, f"{r['seconds']:.0f}", f"{exact['seconds'] / r['seconds']:.1f}x",
                     f"{same}/{sum(map(len, exact['removed'].values()))}",
                     f"{100 * r['test_pruned']:.2f}",
                     " ".join(f"{100 * t:.2f}" for t in r["test_finetuned"])])
    print(f"{args.checkpoint}, global CAR to {args.target} of the MACs on {args.images} "
          "scoring images")
    print(table(rows, ["mode", "seconds", "faster", "exact's removals", "test % pruned",
                       "test % after 1 epoch (seeds)"]))
    io.write_json(f"runs/bench/shortlist_vs_exact-{args.checkpoint}.json",
                  {"args": vars(args), "runs": report})


if __name__ == "__main__":
    main()
