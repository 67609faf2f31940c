"""Distributed CAR: identical picks with 1, 2 and 4 processes, measured scoring time, and a
paper estimate for 8 GPUs on an ImageNet-size scoring set.

    python benchmarks/dist_scaling.py [--layer conv2] [--procs 1 2 4] [--gpu-tmacs 150]
        [--picks convnet-fmnist resnet20] [--out runs/dist.json]

One scoring pass = every filter of the layer scored with the fast engine over the 5 000 val
images. Picks: `carprune prune` of two layers of each network (300 scoring images, keep 0.875,
no fine-tuning; resnet20 trained briefly here) under torchrun with each process count; the
removed filters and the saved weights must equal one process's. The estimate takes the MACs
the fast engine cannot avoid per candidate and image, scales them to ResNet-50 on 50 000
images, divides by 8 GPUs at an assumed sustained throughput (--gpu-tmacs, tera-MAC/s, stated
in the output) times the share of its bound the engine reaches here, and adds the all-reduced
bytes per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(layer: str) -> None:
    import carprune as cp
    from carprune import dist
    from carprune.bench import tail_macs
    from carprune.groups import Surgery, Unit
    from carprune.measure import module_macs
    from carprune.scoring import FastEngine, ScoringSet
    from carprune.scoring.naive import full_pass
    from carprune.scoring.sharded import Sharded

    dist.init_from_env()
    data = cp.data.fashion_mnist()
    model = cp.load("convnet-fmnist")
    scoring = ScoringSet.from_any(data.val, 10)
    surgery = Surgery(model, scoring.example())
    macs = module_macs(surgery.model, scoring.example())
    start = time.perf_counter()
    full_pass(surgery.model, scoring)
    throughput = sum(macs.values()) * scoring.total / (time.perf_counter() - start)
    engine = Sharded(FastEngine()) if dist.active() else FastEngine()
    units = [Unit(layer, c) for c in range(surgery.size(layer))]
    engine.score(surgery, units, scoring)  # fills the layer cache, as the first greedy step does
    start = time.perf_counter()
    _, scores = engine.score(surgery, units, scoring)
    seconds = time.perf_counter() - start
    if dist.is_main():
        bound = tail_macs(surgery, layer, macs) * scoring.total * len(units) / throughput
        print(json.dumps({"seconds": seconds, "bound_seconds": bound, "candidates": len(units),
                          "classes": scoring.num_classes, "correct": scores.correct.tolist()}))


def launcher(nproc: int) -> list[str]:
    return [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}"]


def env_for(nproc: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))


def run(nproc: int, layer: str) -> dict:
    out = subprocess.run([*launcher(nproc), __file__, "--worker", "--layer", layer],
                         env=env_for(nproc), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkpoint_for(name: str, tmp: Path) -> str:
    """A shipped checkpoint, or for a zoo architecture without one (resnet20) the network
    trained one short epoch on 2 000 images and saved: enough for filters to differ."""
    import carprune as cp

    if name not in cp.models.list_models():
        return name
    data = cp.data.fashion_mnist()
    torch.manual_seed(0)
    model = cp.create_model(name)
    small = torch.utils.data.TensorDataset(*[t[:2000] for t in data.train.tensors])
    cp.fit(model, small, 1, cp.Recipe(lr=0.05), progress=False)
    model.carprune_spec = {"arch": {"name": name, "kwargs": {}}, "input_shape": [1, 28, 28],
                           "data": data.describe()}
    cp.save(model.eval(), tmp / name)
    return str(tmp / name)


def picks(nproc: int, checkpoint: str, out: Path) -> tuple[dict, bytes]:
    """Removed filters per layer and the saved weights of a short prune run: the last layer
    the fast engine handles, and the first layer of a residual group (the naive path) or else
    the first layer."""
    import carprune as cp
    from carprune.groups import Surgery

    model = cp.load(checkpoint)
    surgery = Surgery(model, torch.zeros(1, *model.carprune_spec["input_shape"]))
    layers = surgery.conv_layers()
    plain = [n for n in layers if not surgery.coupled(n)]
    chosen = [plain[-1], ([n for n in layers if surgery.coupled(n)] or plain)[0]]
    subprocess.run([*launcher(nproc), "-m", "carprune", "prune", checkpoint, "--layers", *chosen,
                    "--keep", "0.875", "--score-samples", "300", "--finetune-epochs", "0",
                    "--out", str(out)], env=env_for(nproc), capture_output=True, text=True,
                   check=True)
    result = json.loads((out / "result.json").read_text())
    return ({name: rec["removed"] for name, rec in result["layers"].items()},
            (out / "model.safetensors").read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="conv2")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--picks", nargs="*", default=["convnet-fmnist", "resnet20"],
                        help="checkpoints (or zoo architectures, briefly trained here) whose "
                             "prune runs must pick the same under every process count")
    parser.add_argument("--gpu-tmacs", type=float, default=150.0,
                        help="assumed sustained tera-MAC/s of one GPU for the estimate")
    parser.add_argument("--out", default="runs/dist.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.layer)
        return
    from carprune import io

    report = {"cores": os.cpu_count(), "layer": args.layer, "scoring_seconds": {},
              "picks": {}}
    timed = {n: run(n, args.layer) for n in args.procs}
    one = timed[args.procs[0]]
    same_counts = all(t["correct"] == one["correct"] for t in timed.values())
    k, c = one["candidates"], one["classes"]
    step_bytes = 8 * ((k + 1) * (c + 2) + 2)
    print(f"scoring pass, {args.layer}, {k} candidates, 5 000 images (fast engine, "
          f"{os.cpu_count()} cores shared by the processes):")
    for n, t in timed.items():
        report["scoring_seconds"][n] = t["seconds"]
        print(f"  {n} process{'es' if n > 1 else ''}: {t['seconds']:.2f} s  (speed-up "
              f"{one['seconds'] / t['seconds']:.2f})")
    print(f"  identical counts: {'yes' if same_counts else 'NO'}; all-reduced per step: "
          f"{step_bytes} bytes")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.picks:
            checkpoint = checkpoint_for(name, Path(tmp))
            runs = {n: picks(n, checkpoint, Path(tmp) / f"{name}-{n}") for n in args.procs}
            base = runs[args.procs[0]]
            same = {n: r[0] == base[0] and r[1] == base[1] for n, r in runs.items()}
            report["picks"][name] = {"removed": base[0], "identical": same}
            print(f"  {name}: picks and weights identical to 1 process with "
                  + ", ".join(f"{n}: {'yes' if ok else 'NO'}" for n, ok in same.items()))
    # ResNet-50 on ImageNet: 4.1 GMAC an image; for a middle-stage conv the fast engine still
    # runs about half the network per candidate (everything after the consumer), at the share
    # of the machine's throughput it reaches here (its measured bound over its measured time)
    efficiency = one["bound_seconds"] / one["seconds"]
    tail, images, candidates = 2.0e9, 50_000, 256
    compute = candidates * images * tail / (8 * args.gpu_tmacs * 1e12 * efficiency)
    comm_bytes = 8 * ((candidates + 1) * (1000 + 2) + 2)
    report["estimate"] = {"gpus": 8, "gpu_tmacs": args.gpu_tmacs, "efficiency": efficiency,
                          "seconds_per_step": compute, "allreduce_bytes_per_step": comm_bytes}
    print(f"estimate, 8 GPUs, ResNet-50, 50 000 images, a 256-filter layer, at an assumed "
          f"{args.gpu_tmacs:.0f} TMAC/s per GPU and the {efficiency:.0%} of peak the engine "
          f"reaches here: {compute:.0f} s of compute per greedy step, "
          f"{comm_bytes / 2**20:.1f} MiB all-reduced per step (milliseconds on NVLink)")
    io.write_json(args.out, report)
    print(f"written to {args.out}")
    if not same_counts or not all(all(p["identical"].values())
                                  for p in report["picks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
