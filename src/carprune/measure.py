"""Size and speed of a network: parameters, MACs (Torch-Pruning's counter) and real latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn


def macs_params(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Multiply-accumulates for one image, and parameter count."""
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_shape))
    return int(macs), int(params)


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1,
               repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time of one forward pass (ms) on this machine's CPU threads."""
    model = model.eval().to(memory_format=torch.channels_last)  # the fast layout on CPU
    x = torch.randn(batch_size, *input_shape).contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def speed_report(model: nn.Module, input_shape: Sequence[int]) -> dict:
    macs, params = macs_params(model, input_shape)
    return {"macs": macs, "params": params,
            "latency_ms_batch1": latency_ms(model, input_shape, 1),
            "latency_ms_batch64": latency_ms(model, input_shape, 64, repeats=20),
            "threads": torch.get_num_threads()}
