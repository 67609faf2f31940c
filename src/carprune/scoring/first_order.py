"""A first-order estimate of what each unit's absence costs, for every unit of every layer in
one pass: the shortlist of the approximate `--shortlist` mode of global CAR.

Ablating a unit zeroes the outputs of its mask points (masked.py) at the unit's channels. Put a
multiplicative mask of ones on each point, per image and channel: the loss gradient with
respect to it is, per image, the sum over pixels of activation times gradient there, and a
unit's first-order change of that image's loss is minus the sum of those over its channels.
A norm that mixes channels is masked the same way: its other channels' change with the
statistics is left out of the estimate. A
unit's estimate sums its absolute value over the images, so that images a removal helps do not
cancel images it hurts. Only the masks' gradients are computed (no parameter gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..groups import Surgery, Unit
from ..norms import channel_dim
from .graph import trace
from .masked import mask_points
from .sets import ScoringSet


def _points(surgery: Surgery, layers: Sequence[str],
            traced: fx.GraphModule | None) -> dict[str, list[str]]:
    """Per layer, the modules whose outputs its units zero (every producer where fx cannot
    trace the model: an estimate either way)."""
    out = {}
    for layer in layers:
        found = mask_points(traced, surgery, layer) if traced is not None else None
        out[layer] = [found[0][n] for n in found[1]] if found else list(surgery.makers(layer, 0))
    return out


def _map(surgery: Surgery, layer: str, point: str, width: int) -> torch.Tensor:
    """(point's `width` channels, layer channels) 0/1: which of them each unit zeroes."""
    rows = [surgery.makers(layer, c)[point] for c in range(surgery.size(layer))]
    out = torch.zeros(width, len(rows))
    for c, idxs in enumerate(rows):
        out[idxs, c] = 1
    return out


def first_order(surgery: Surgery, layers: Sequence[str], scoring: ScoringSet,
                traced: fx.GraphModule | None = None) -> dict[Unit, float]:
    """Per unit of `layers`: the summed absolute first-order change of each image's loss.
    `traced`: the model's `trace`, where the caller keeps one (removals leave it valid)."""
    points = _points(surgery, layers, trace(surgery.model) if traced is None else traced)
    maps: dict[tuple[str, str], torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        dim = channel_dim(module) % output.ndim
        mask = torch.ones(len(output), output.shape[dim], device=output.device,
                          requires_grad=True)
        masks[surgery.names[module]] = mask
        shape = [len(output)] + [1] * (output.ndim - 1)
        shape[dim] = -1
        return output * mask.view(shape)

    handles = [surgery.modules[p].register_forward_hook(hook)
               for p in dict.fromkeys(p for ps in points.values() for p in ps)]
    totals = {layer: torch.zeros(surgery.size(layer), dtype=torch.float64) for layer in layers}
    try:
        for x, y in scoring.batches:
            masks.clear()
            with torch.enable_grad():
                loss = F.cross_entropy(surgery.model(x), y, reduction="sum")
                grads = dict(zip(masks, torch.autograd.grad(loss, list(masks.values())),
                                 strict=True))
            for layer, ps in points.items():
                for p in ps:
                    if (layer, p) not in maps:
                        maps[layer, p] = _map(surgery, layer, p, grads[p].shape[1])
                change = sum(grads[p].cpu() @ maps[layer, p] for p in ps)
                totals[layer] += change.abs().sum(0).double()
    finally:
        for h in handles:
            h.remove()
    return {Unit(layer, c): float(v) for layer, t in totals.items() for c, v in enumerate(t)}
