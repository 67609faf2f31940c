"""Is Torch-Pruning's removal of a unit the network without the unit? Torch-Pruning removes a
group's channels from every layer its dependency graph links, but not the sizes a network
keeps in its own code: a `torch.split`'s sizes (timm's MixNet), a reshape's (EdgeNeXt's
attention), a slice's end (GhostNet's `[:, :out_chs]`), a split into branches (SKNet, CSPNet);
nor can carprune score a removal through an operation that mixes channels in a way it does
not know (norms.py knows the norms). There the pruned network fails, or computes something
other than the network without the unit, and no score of the unit is the score of its
removal: carprune refuses such layers.

The trial runs on two float64 copies of the network on the CPU: units are removed from the
first, and its outputs on the example input are compared with those of the second, in which the
same units are ablated (groups.py). Layers that make the same channels share one trial; one
unit of every layer is removed at once first, and only when that fails is each layer tried in
turn (docs/engine.md, "Scoring equals removal")."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from .dependency import dependency_graph
from .layout import first_line
from .units import Unit

TOLERANCE = 1e-6  # relative difference of the outputs; float64 rounding is about 1e-14
ATTRIBUTE = "carprune_trials"  # on the caller's model: layer -> why it failed its trial, or None
WHY = ("cannot be removed cleanly: Torch-Pruning's removal of one of its units gives a "
       "network that {what}, as the network's own code keeps a size of it or mixes its "
       "channels in a way that neither Torch-Pruning nor carprune follows (a split, a "
       "reshape, a slice, a norm across channels)")


class Surgery(Protocol):
    """What a trial uses of groups.Surgery (groups imports this module, not the reverse)."""

    model: nn.Module
    layout: torch.memory_format
    example_inputs: torch.Tensor
    alive: Mapping[str, list[int]]

    def size(self, layer: str) -> int: ...
    def producing(self, layer: str, unit: int) -> dict[str, list[int]]: ...
    def remove(self, layer: str, units: Sequence[int]) -> list[int]: ...
    def ablated(self, units: Sequence[Unit]) -> AbstractContextManager[None]: ...


def verdicts(model: nn.Module) -> dict[str, str | None]:
    """The trials already decided for `model`, kept on it (and on copies made after them) as
    its memory layout is (layout.py): a network's code does not change between runs."""
    if not isinstance(getattr(model, ATTRIBUTE, None), dict):
        setattr(model, ATTRIBUTE, {})
    return getattr(model, ATTRIBUTE)


def refusals(surgery: Surgery, layers: Sequence[str]) -> dict[str, str]:
    """Layer -> why, for each of `layers` whose unit's removal is not the network without it.
    Layers that make the same channels (a residual stage) share one trial; a first trial of
    all of them at once spares the layer-by-layer ones when it passes."""
    shared: dict[frozenset, list[str]] = {}
    for layer in layers:
        if surgery.size(layer) > 1:
            shared.setdefault(frozenset(surgery.producing(layer, 0)), []).append(layer)
    todo = [group[0] for group in shared.values()]
    if not todo:
        return {}
    x = surgery.example_inputs[:1].to("cpu", torch.float64)
    whole = _copy(surgery, x)
    if _trial(_copy(surgery, x), whole, todo, [], x) is None:
        return {}
    found: dict[str, str] = {}
    pruned, gone = None, []
    for layer in todo:
        pruned = pruned or _copy(surgery, x)
        why = _trial(pruned, whole, [layer], gone, x)
        if why:
            found[layer] = why
            pruned, gone = None, []  # the pruned copy is spoilt: a fresh one for the next
    return {n: found[group[0]] for group in shared.values() if group[0] in found for n in group}


def _copy(surgery: Surgery, x: torch.Tensor) -> Surgery:
    model = copy.deepcopy(surgery.model).to("cpu", torch.float64)
    with torch.inference_mode(False), torch.enable_grad():  # Torch-Pruning traces autograd
        return type(surgery).adopt(dependency_graph(model, x), x)


def _trial(pruned: Surgery, whole: Surgery, layers: Sequence[str], gone: list[Unit],
           x: torch.Tensor) -> str | None:
    """Remove one unit of each of `layers` from `pruned`, adding it to `gone` (the units
    removed so far, numbered as in `whole`); why `pruned`'s outputs are not those of `whole`
    without `gone`, or None."""
    try:
        for layer in layers:
            unit = min(1, pruned.size(layer) - 1)
            if unit > 0:  # coupled layers' trials may have left one unit: none to remove
                gone.append(Unit(layer, pruned.alive[layer][unit]))
                pruned.remove(layer, [unit])
        with torch.no_grad():
            got = pruned.model(x.contiguous(memory_format=pruned.layout))
    except Exception as exc:  # noqa: BLE001 - whatever the pruned network's code raises
        return WHY.format(what=f"fails ({type(exc).__name__}: {first_line(exc)})")
    with torch.no_grad(), whole.ablated(gone):
        want = whole.model(x.contiguous(memory_format=whole.layout))
    if got.shape != want.shape:
        return WHY.format(what=f"has {tuple(got.shape)} outputs, not {tuple(want.shape)}")
    gap = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
    if gap > TOLERANCE:
        return WHY.format(what=f"computes other outputs than the network without the unit "
                               f"(relative difference {gap:.0e})")
    return None
