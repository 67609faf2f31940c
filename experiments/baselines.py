"""Torch-Pruning's own global pruning to a MACs target: the baseline that two studies set
global CAR against (experiments/real, experiments/global_vs_magnitude), written once."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

import carprune as cp
from carprune.measure import macs_params

IMPORTANCES = ("magnitude", "taylor")


def macs_share(model: nn.Module, example: torch.Tensor) -> Callable[[nn.Module], float]:
    """The share of `model`'s MACs that a network has left, at `example`'s image shape."""
    shape = example.shape[1:]
    start = macs_params(model, shape)[0]
    return lambda pruned: macs_params(pruned, shape)[0] / start


def torch_pruning_global(model: nn.Module, example: torch.Tensor, target: float,
                         importance: str = "magnitude", steps: int = 100, round_to: int = 1,
                         data: tuple[torch.Tensor, torch.Tensor] | None = None,
                         share: Callable[[nn.Module], float] | None = None) -> nn.Module:
    """A copy of `model` pruned by Torch-Pruning's BasePruner (global_pruning=True, linear
    layers left whole), stepped until `share(model)` (default: its share of the MACs) is at
    most `target`; each step prunes 0.9 / `steps` more of the channels, globally.

    importance: "magnitude" (GroupMagnitudeImportance, p=2) or "taylor" (GroupTaylorImportance,
    with the gradients of the cross-entropy on `data`, images and labels, taken before each
    step). round_to: every pruned layer keeps a multiple of this many channels. `share` is
    called once before every step, so a caller can also measure the network on the way."""
    if importance not in IMPORTANCES or (importance == "taylor" and data is None):
        raise cp.CarpruneError(f"importance must be one of {', '.join(IMPORTANCES)}, and "
                               "taylor needs data; pass one of them")
    model = copy.deepcopy(model).eval()
    share = share or macs_share(model, example)
    pruner = tp.pruner.BasePruner(
        model, example, global_pruning=True, pruning_ratio=0.9, iterative_steps=steps,
        importance=(tp.importance.GroupTaylorImportance() if importance == "taylor" else
                    tp.importance.GroupMagnitudeImportance(p=2)),
        round_to=round_to if round_to > 1 else None,
        ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)])
    for _ in range(steps):
        if share(model) <= target:
            break
        if importance == "taylor":
            model.zero_grad()
            nn.functional.cross_entropy(model(data[0]), data[1]).backward()
        pruner.step()
    model.zero_grad()
    return model
