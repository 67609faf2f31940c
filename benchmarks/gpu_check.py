"""Every GPU check in one short run (under 8 minutes on one GPU): fast against naive engine on
the shipped convnet and on torchvision's resnet18 at 224 px (identical counts, speed-up), a
one-process torchrun prune on cuda, and resnet18's throughput. Without CUDA it says so and
exits 0.

    python benchmarks/gpu_check.py [--out runs/gpu_check.json]

The convnet part needs Fashion-MNIST's IDX files (Debian's path or $CARPRUNE_DATA); without
them it is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import TensorDataset

import carprune as cp
from carprune import io
from carprune.groups import Surgery, Unit
from carprune.scoring import FastEngine, NaiveEngine, ScoringSet


def engines(model, scoring: ScoringSet, layer: str, candidates: int) -> dict:
    """Naive and fast tallies of the first `candidates` units of `layer`, timed on the GPU."""
    surgery = Surgery(model, scoring.example())
    units = [Unit(layer, c) for c in range(min(candidates, surgery.size(layer)))]
    times, tallies = {}, {}
    for name, engine in (("naive", NaiveEngine()), ("fast", FastEngine())):
        engine.score(surgery, units[:1], scoring)  # warm-up: kernels, caches
        torch.cuda.synchronize()
        start = time.perf_counter()
        tallies[name] = engine.score(surgery, units, scoring)[1]
        torch.cuda.synchronize()
        times[name] = time.perf_counter() - start
    same = torch.equal(tallies["naive"].correct, tallies["fast"].correct) and \
        torch.equal(tallies["naive"].class_correct, tallies["fast"].class_correct)
    return {"layer": layer, "candidates": len(units), "images": scoring.total,
            "naive_s": times["naive"], "fast_s": times["fast"],
            "speedup": times["naive"] / times["fast"], "identical": same}


def convnet_check(device) -> dict | None:
    try:
        data = cp.data.fashion_mnist()
    except cp.CarpruneError as exc:
        print(f"convnet: skipped ({exc})")
        return None
    model = cp.load("convnet-fmnist").to(device)
    scoring = ScoringSet.from_any(TensorDataset(*[t[:2000] for t in data.val.tensors]),
                                  10).to(device)
    return engines(model, scoring, "conv2", 64)


def resnet18_check(device, images: int = 256) -> tuple[dict, float]:
    torch.manual_seed(0)
    model = cp.create_model("torchvision.models:resnet18").eval().to(device)
    x = torch.randn(images, 3, 224, 224, device=device)
    with torch.inference_mode():
        y = torch.cat([model(x[i:i + 64]).argmax(1) for i in range(0, images, 64)])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            for i in range(0, images, 64):
                model(x[i:i + 64])
        torch.cuda.synchronize()
        throughput = 5 * images / (time.perf_counter() - start)
    scoring = ScoringSet.from_any(TensorDataset(x.cpu(), y.cpu()), 1000).to(device)
    return engines(model, scoring, "layer1.0.conv1", 16), throughput


def torchrun_check() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m",
             "carprune", "prune", "convnet-fmnist", "--layers", "conv3", "--keep", "60",
             "--score-samples", "500", "--finetune-epochs", "1", "--train-samples", "2000",
             "--device", "cuda", "--out", os.path.join(tmp, "run")],
            capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
        result = io.read_json(os.path.join(tmp, "run", "result.json")) \
            if proc.returncode == 0 else {}
    if proc.returncode:
        print(proc.stderr[-2000:])
    return {"returncode": proc.returncode, "seconds": seconds,
            "removed": result.get("layers", {}).get("conv3", {}).get("removed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible here (torch.cuda.is_available() is False): nothing to "
              "check; run this on a GPU machine")
        return
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    report = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "convnet": convnet_check(device)}
    report["resnet18_224"], report["resnet18_images_per_second"] = resnet18_check(device)
    report["torchrun_1_process"] = torchrun_check() if report["convnet"] else None
    for key in ("convnet", "resnet18_224"):
        r = report[key]
        if r:
            print(f"{key}: {r['layer']}, {r['candidates']} candidates x {r['images']} images: "
                  f"naive {r['naive_s']:.2f} s, fast {r['fast_s']:.2f} s, "
                  f"{r['speedup']:.1f}x, identical counts: {'yes' if r['identical'] else 'NO'}")
    print(f"resnet18 at 224 px: {report['resnet18_images_per_second']:.0f} images/s "
          "(inference, batch 64)")
    if report["torchrun_1_process"]:
        t = report["torchrun_1_process"]
        print(f"torchrun, 1 process on cuda: exit {t['returncode']} in {t['seconds']:.0f} s, "
              f"conv3 removed first {t['removed'][:6] if t['removed'] else None}")
    io.write_json(args.out, report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
