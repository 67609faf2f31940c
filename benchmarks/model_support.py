"""Which torchvision and timm networks carprune prunes: for each, Torch-Pruning's dependency
graph, its prunable layers (and how many the fast engine scores without the naive path), one
CAR removal in the first and the middle prunable layer, and a save/reload with identical
outputs. Random weights at 64 px (nothing is downloaded).

    python benchmarks/model_support.py [--size 64] [--out runs/bench/model_support.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.data import TensorDataset

import carprune as cp
from carprune import io
from carprune.commands.common import table
from carprune.groups import Surgery
from carprune.scoring import FastEngine, ScoringSet

MODELS = ["torchvision.models:resnet18", "torchvision.models:resnet50",
          "torchvision.models:mobilenet_v2", "torchvision.models:mobilenet_v3_small",
          "timm:efficientnet_b0", "torchvision.models:vgg11_bn", "torchvision.models:alexnet",
          "torchvision.models:convnext_tiny", "torchvision.models:regnet_y_400mf"]


def check(name: str, size: int) -> dict:
    torch.manual_seed(0)
    model = cp.create_model(name).eval()
    model.carprune_spec = {"arch": {"name": name, "kwargs": {}}, "input_shape": [3, size, size]}
    x = torch.randn(4, 3, size, size)
    with torch.inference_mode():
        y = model(x).argmax(1)
    scoring = ScoringSet.from_any(TensorDataset(x, y), 1000)
    surgery = Surgery(model, scoring.example())
    layers = surgery.conv_layers()
    engine = FastEngine()
    fast = sum(engine.plan(surgery, n) is not None for n in layers)
    chosen = [layers[0], layers[len(layers) // 2]]
    start = time.perf_counter()
    pruned = cp.car_prune(model, scoring, chosen, keep=0.9, approx=cp.Approximation(step=64),
                          progress=False).model
    with tempfile.TemporaryDirectory() as tmp:
        io.save(pruned, tmp)
        again = cp.load(tmp)
    with torch.inference_mode():
        same = torch.equal(pruned(x), again(x))
    return {"model": name, "prunable_layers": len(layers), "fast_engine_layers": fast,
            "pruned": chosen, "reload_identical": same, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="runs/bench/model_support.json")
    args = parser.parse_args()
    rows = []
    for name in MODELS:
        try:
            rows.append(check(name, args.size))
        except Exception as exc:  # noqa: BLE001 - report every failure, go on with the next
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
    print(table([[r["model"], r.get("prunable_layers", "-"), r.get("fast_engine_layers", "-"),
                  "yes" if r.get("reload_identical") else r.get("error", "NO")] for r in rows],
                ["model", "prunable layers", "fast-engine layers", "prune + reload identical"]))
    io.write_json(args.out, {"size": args.size, "models": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
