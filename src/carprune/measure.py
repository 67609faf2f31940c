"""Size and speed of a network: parameters, MACs (Torch-Pruning's counter) and real latency."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from .devices import device_of
from .errors import CarpruneError
from .groups import NORMS, Surgery, is_depthwise
from .layout import arrange, arranged


def macs_params(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Multiply-accumulates for one image, and parameter count."""
    example = torch.zeros(1, *input_shape, device=device_of(model))
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def module_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs per image of every conv and linear layer, by name (hooks on one forward pass)."""
    macs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, inp, out, name=name):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                macs[name] = out[0].numel() * k
        elif isinstance(m, nn.Linear):  # on a flat input, or at every position of a 4-D one
            def hook(mod, inp, out, name=name):
                macs[name] = out[0].numel() * mod.in_features
        else:
            continue
        hooks.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        model.eval()(example[:1])
    for h in hooks:
        h.remove()
    return macs


def unit_costs(surgery: Surgery, layers: Sequence[str],
               kind: str = "macs") -> dict[str, list[float]]:
    """Per layer of `layers`, what removing each of its units saves: MACs per image or
    parameters, summed over the unit's whole dependency group (its producers' output channels
    and its consumers' inputs, for each of its channels). The MACs are counted once for all
    layers."""
    if kind not in ("macs", "params"):
        raise CarpruneError(f"unknown cost {kind!r}; use macs, params or latency")
    macs = module_macs(surgery.model, surgery.example_inputs) if kind == "macs" else {}
    return {n: [_unit_cost(surgery, n, c, kind, macs) for c in range(surgery.size(n))]
            for n in layers}


def _unit_cost(surgery: Surgery, layer: str, channel: int, kind: str,
               macs: dict[str, int]) -> float:
    total = 0.0
    for dep, idxs in surgery.unit_group(layer, channel):
        m = dep.target.module
        if isinstance(m, NORMS) and kind == "params":
            total += 2 * len(idxs)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        produces = surgery.dg.is_out_channel_pruning_fn(dep.handler) or is_depthwise(m)
        width = m.weight.shape[0] if produces else m.weight.shape[1] * getattr(m, "groups", 1)
        share = len(idxs) / width
        if kind == "macs":
            total += macs[surgery.names[m]] * share
        else:
            total += m.weight.numel() * share
            total += len(idxs) if produces and m.bias is not None else 0
    return total


def latency_costs(surgery: Surgery, layers: Sequence[str], repeats: int = 50) -> dict[str, float]:
    """Measured milliseconds (batch 1) that removing one unit of each layer saves: the latency
    of the network minus that of a copy without half the layer's units, per unit removed
    (at least a nanosecond, so that no layer is free)."""
    shape = surgery.example_inputs.shape[1:]
    now = latency_ms(surgery.model, shape, repeats=repeats)
    costs = {}
    for name in layers:
        half = surgery.size(name) // 2
        saved = 0.0
        if half:
            trial = Surgery(surgery.model, surgery.example_inputs)
            trial.remove(name, list(range(half)))
            saved = max(now - latency_ms(trial.model, shape, repeats=repeats), 0.0) / half
        costs[name] = saved or 1e-6
    return costs


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1,
               repeats: int = 50, warmup: int = 5) -> float:
    """Median time of one forward pass (ms) on the model's device, in eval mode and the layout
    carprune computes it in (channels_last where it works, layout.py), measured on a copy: wall
    time on this machine's CPU threads, CUDA events on a GPU."""
    model = copy.deepcopy(model).eval()
    device = device_of(model)
    x = torch.randn(batch_size, *input_shape, device=device)
    x = arranged(x, arrange(model, x[:1]))
    for _ in range(warmup):
        model(x)
    times = [_timed(model, x, device) for _ in range(repeats)]
    return 1000 * statistics.median(times)


def _timed(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Seconds of one forward pass."""
    if device.type != "cuda":
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    model(x)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def speed_report(model: nn.Module, input_shape: Sequence[int]) -> dict:
    macs, params = macs_params(model, input_shape)
    return {"macs": macs, "params": params,
            "latency_ms_batch1": latency_ms(model, input_shape, 1),
            "latency_ms_batch64": latency_ms(model, input_shape, 64, repeats=20),
            "threads": torch.get_num_threads(), "device": str(device_of(model))}
