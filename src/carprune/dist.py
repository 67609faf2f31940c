"""More than one process: the torch.distributed process group and its primitives.

Launch with torchrun. Backend: nccl on GPUs (each process on cuda:LOCAL_RANK), gloo on the CPU.
Rank 0 alone shows progress and writes files. How scoring is shared among the processes is
scoring/sharded.py.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import CarpruneError

TIMEOUT_ENV = "CARPRUNE_DIST_TIMEOUT"


def init_from_env(device: torch.device | None = None) -> None:
    """Join the process group torchrun describes in the environment (no-op when alone): nccl
    with this process on `device` (cuda:LOCAL_RANK) when it is a GPU, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (rank 0 may have changed files the others are about to read)."""
    if active():
        dist.barrier()


def all_reduce_tensor(tensor: torch.Tensor) -> None:
    """Sum a tensor over all processes, in place."""
    try:
        dist.all_reduce(tensor)
    except RuntimeError as exc:
        raise CarpruneError(f"a peer process stopped or timed out during scoring ({exc}); "
                            "re-run the same command, it resumes from the last saved step") \
            from None
