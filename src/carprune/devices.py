"""Where the work runs: `--device auto|cpu|cuda|cuda:N`, checked before anything starts.

Under torchrun each process on a CUDA machine takes `cuda:LOCAL_RANK` (nccl), on a CPU machine
the CPU (gloo); see dist.py."""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import CarpruneError


def resolve_device(text: str = "auto") -> torch.device:
    """auto: this process's GPU if CUDA can see one, else the CPU."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise CarpruneError(f"--device {text} is not a device; use auto, cpu, cuda or cuda:N") \
            from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise CarpruneError(f"--device {text}: carprune runs on cpu or cuda; use auto, cpu, "
                            "cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CarpruneError(f"--device {text}: no CUDA GPU is visible here "
                            "(torch.cuda.is_available() is False); use --device cpu or auto")
    index = device.index
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise CarpruneError(f"--device {text}: this machine has {torch.cuda.device_count()} "
                            f"CUDA GPU(s), numbered from 0; choose one of them")
    return torch.device("cuda", index)


def check_float32(model: nn.Module) -> None:
    """carprune scores, refits and fine-tunes in float32 (its images are float32): refuse a
    network whose floating-point weights are another type, before anything runs."""
    other = {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32}
    if other:
        raise CarpruneError(f"the network's weights are {', '.join(sorted(map(str, other)))}, "
                            "and carprune prunes float32 networks; convert it with "
                            "model.float() first (and back after pruning if you need to)")


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
