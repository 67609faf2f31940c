"""Fine-tuning streams an image folder from disk: peak resident memory for a generated folder of
20 000 images read at 224 px (issue target: under 3 GB), against what decoding them all into
memory would need.

    python benchmarks/folder_memory.py [--images 20000] [--size 224] [--workers 2]

The folder (small JPEGs of random colours and sizes, two classes) is written to a temporary
directory and removed afterwards; the network is a small convnet, so that the time goes to
reading files, not to arithmetic. Prints one table and writes runs/bench/folder_memory.json.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import carprune as cp
from carprune import io
from carprune.data import image_folder, preprocess_for


def write_folder(root: Path, images: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for i in range(images):
        width, height = (int(v) for v in rng.integers(32, 96, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        Image.new("RGB", (width, height), colour).save(root / "ab"[i % 2] / f"{i}.jpg")


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))


def peak_mib() -> tuple[float, float]:
    """Peak resident set of this process and of its largest child (a DataLoader worker)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/folder_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        start = time.perf_counter()
        write_folder(root, args.images)
        written = time.perf_counter() - start
        data = image_folder(root, preprocess_for(None, args.size), val_fraction=0.01,
                            test_fraction=0.01, workers=args.workers)
        model = small_net()
        start = time.perf_counter()
        cp.fit(model, data.train, 1, cp.Recipe(lr=0.01, shift_and_flip=False,
                                              workers=data.workers), desc="fine-tune (streamed)")
        seconds = time.perf_counter() - start
    main_mib, worker_mib = peak_mib()
    total = main_mib + args.workers * worker_mib
    in_memory = len(data.train) * 4 * 3 * args.size**2 / 2**20
    report = {"images": len(data.train), "size": args.size, "workers": args.workers,
              "seconds": seconds, "images_per_second": len(data.train) / seconds,
              "peak_mib": {"main": main_mib, "largest_worker": worker_mib, "bound": total},
              "decoded_in_memory_mib": in_memory, "torch_threads": torch.get_num_threads(),
              "folder_written_seconds": written}
    io.write_json(args.out, report)
    print(f"fine-tuned 1 epoch on {len(data.train)} files at {args.size} px in {seconds:.0f} s "
          f"({len(data.train) / seconds:.0f} images/s, {args.workers} workers)")
    print(f"peak resident: main {main_mib:.0f} MiB, largest worker {worker_mib:.0f} MiB; bound "
          f"main + {args.workers} x worker = {total:.0f} MiB (target: under 3072 MiB)")
    print(f"decoding them all into memory as float32 would take {in_memory:.0f} MiB")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
