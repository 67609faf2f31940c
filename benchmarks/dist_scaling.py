"""Distributed CAR scoring: measured time with 1 and 2 processes on this machine, and a paper
estimate for 8 GPUs on an ImageNet-size scoring set.

    python benchmarks/dist_scaling.py [--layer conv2] [--gpu-tmacs 150]

One scoring pass = every filter of the layer scored with the fast engine over the 5 000 val
images. The estimate takes the MACs the fast engine cannot avoid per candidate and image,
scales them to ResNet-50 on 50 000 images, divides by 8 GPUs at an assumed sustained throughput
(--gpu-tmacs, tera-MAC/s, stated in the output) and adds the all-reduced bytes per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(layer: str) -> None:
    import copy

    import carprune as cp
    from carprune import dist
    from carprune.groups import Surgery, Unit
    from carprune.scoring import FastEngine, ScoringSet

    dist.init_from_env()
    data = cp.data.fashion_mnist()
    model = cp.load("convnet-fmnist")
    scoring = ScoringSet.from_any(data.val, 10)
    surgery = Surgery(copy.deepcopy(model), scoring.example())
    engine = dist.ShardedEngine(FastEngine()) if dist.active() else FastEngine()
    shard = dist.shard(scoring)
    units = [Unit(layer, c) for c in range(surgery.size(layer))]
    engine.score(surgery, units, shard)  # fills the layer cache, as the first greedy step does
    start = time.perf_counter()
    _, scores = engine.score(surgery, units, shard)
    seconds = time.perf_counter() - start
    if dist.is_main():
        print(json.dumps({"seconds": seconds, "candidates": len(units),
                          "classes": scoring.num_classes, "correct": scores.correct.tolist()}))


def run(nproc: int, layer: str) -> dict:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, os.cpu_count() // nproc)))
    out = subprocess.run([*launcher, __file__, "--worker", "--layer", layer], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="conv2")
    parser.add_argument("--gpu-tmacs", type=float, default=150.0,
                        help="assumed sustained tera-MAC/s of one GPU for the estimate")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.layer)
        return
    one, two = run(1, args.layer), run(2, args.layer)
    assert one["correct"] == two["correct"], "2 processes counted differently from 1"
    k, c = one["candidates"], one["classes"]
    step_bytes = 8 * ((k + 1) * (c + 2) + 2)
    print(f"scoring pass, {args.layer}, {k} candidates, 5 000 images (fast engine):")
    print(f"  1 process : {one['seconds']:.2f} s")
    print(f"  2 processes: {two['seconds']:.2f} s  (ratio {one['seconds'] / two['seconds']:.2f}; "
          f"this machine has {os.cpu_count()} cores, so the processes share them)")
    print(f"  identical counts: yes; all-reduced per step: {step_bytes} bytes")
    # ResNet-50 on ImageNet: 4.1 GMAC an image; for a middle-stage conv the fast engine still
    # runs about half the network per candidate (everything after the consumer)
    tail_macs, images, candidates = 2.0e9, 50_000, 256
    compute = candidates * images * tail_macs / (8 * args.gpu_tmacs * 1e12)
    comm_bytes = 8 * ((candidates + 1) * (1000 + 2) + 2)
    print(f"estimate, 8 GPUs, ResNet-50, 50 000 images, a 256-filter layer, at an assumed "
          f"{args.gpu_tmacs:.0f} TMAC/s per GPU: {compute:.0f} s of compute per greedy step, "
          f"{comm_bytes / 2**20:.1f} MiB all-reduced per step (milliseconds on NVLink)")


if __name__ == "__main__":
    main()
