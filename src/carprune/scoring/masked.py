"""The masked tail: exact CAR for a unit of any kind (docs/engine.md, "The fast engine").

Ablating a unit zeroes the parameters of every module that makes its channels (conv and linear
rows, the depthwise convs and per-channel norms of its group), so each such module's output is
exactly zero at the unit's indices, and the norms that mix channels compute without them
(norms.py). The network without unit i therefore equals the network with those outputs zeroed
and those norms masked, which is what this tail computes: everything that does not depend on
the masked outputs (the head) runs once per scoring batch, and the rest (the tail) runs once
per candidate, many candidates stacked along the batch dimension, each with its own mask. A
residual stage's tail starts at the stage's first producer; squeeze-excitation,
concatenations and any other op that reads the masked values are computed as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..groups import Surgery, is_depthwise
from ..norms import Mask, channel_dim, is_mixing, without
from .engine import Candidate
from .graph import boundary, descendants, head_module, module_node, tail_graph
from .sets import Scores, ScoringSet


def _zeroed(x: torch.Tensor, mask: Mask, dim: int) -> torch.Tensor:
    """x holds k candidates' batches one after another, channels in dimension `dim` (1 or the
    last); zero channel cols[j] of candidate rows[j], in place (x is the tail's own value)."""
    k, rows, cols = mask
    if len(rows):
        v = x.view(k, x.shape[0] // k, *x.shape[1:])
        if dim == 1:
            v[rows, :, cols] = 0
        else:
            v[rows, ..., cols] = 0
    return x


@dataclass
class MaskPlan:
    """How to score one layer's units through a masked tail."""

    head: fx.GraphModule        # images -> the tail's inputs
    tail: fx.GraphModule        # (inputs stacked per candidate, one mask per point) -> logits
    points: list[str]           # the modules whose outputs are masked, in mask order


def _carried(node: fx.Node, makers: dict[fx.Node, str], modules: dict[str, nn.Module]) -> bool:
    """A maker whose only reader is another maker that overwrites the channel (a BatchNorm
    after a conv, a norm after a depthwise conv, a norm that mixes channels, which computes
    without it): masking that reader's output is enough."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    m = modules.get(user.target) if user in makers else None
    return isinstance(m, _BatchNorm) or is_depthwise(m) or is_mixing(m)


def mask_points(traced: fx.GraphModule, surgery: Surgery,
                layer: str) -> tuple[dict[fx.Node, str], list[fx.Node]] | None:
    """The nodes of the modules whose outputs `layer`'s units change (node -> name), and
    those a mask must zero or, for norms that mix channels, recompute; None where such a module
    is not called exactly once. Units may change different modules (a GhostNet residual: some
    channels come from a primary conv, the others from its cheap depthwise one): all count."""
    makers = {}
    for name in dict.fromkeys(n for u in range(surgery.size(layer))
                              for n in surgery.makers(layer, u)):
        node = module_node(traced.graph, name)
        if node is None:
            return None
        makers[node] = name
    modules = dict(traced.named_modules())
    return makers, [n for n in makers if not _carried(n, makers, modules)]


def plan_masked(traced: fx.GraphModule, surgery: Surgery, layer: str) -> MaskPlan | None:
    """The masked tail of `layer`, or None where a module that makes its channels is not
    called exactly once in the graph."""
    graph = traced.graph
    found = mask_points(traced, surgery, layer)
    if found is None:
        return None
    makers, points = found
    modules = dict(traced.named_modules())
    mixing = {p for p in points if is_mixing(modules[p.target])}
    changed = set().union(*(descendants(p) - ({p} - mixing) for p in points))
    tail = [n for n in graph.nodes if n in changed]
    sides, constants = boundary(graph, tail, set())
    order = [makers[p] for p in points]

    def wrap(out: fx.Graph, node: fx.Node, value: fx.Node, masks: list[fx.Node]) -> fx.Node:
        if node not in makers or makers[node] not in order:
            return value
        mask = masks[order.index(makers[node])]
        if node not in mixing:
            return out.call_function(_zeroed, (value, mask, channel_dim(modules[node.target])))
        masked = out.call_function(without, (out.get_attr(node.target), value.args[0], mask))
        out.erase_node(value)  # the norm's own call, replaced
        return masked

    tail_module = fx.GraphModule(traced, tail_graph(graph, sides, constants, tail,
                                                    extra=len(order), wrap=wrap))
    return MaskPlan(head_module(traced, changed, sides), tail_module, order)


def _masks(surgery: Surgery, layer: str, points: list[str], candidates: Sequence[Candidate],
           device: torch.device) -> list[Mask]:
    """Per point: (candidates, candidate rows, channels) to mask, for `candidates` in order (a
    block masks the channels of all its units)."""
    out = []
    for name in points:
        rows, cols = [], []
        for k, candidate in enumerate(candidates):
            for unit in candidate.units:
                idxs = surgery.makers(layer, unit.channel).get(name, [])
                rows += [k] * len(idxs)
                cols += idxs
        out.append((max(1, len(candidates)), torch.tensor(rows, device=device, dtype=torch.long),
                    torch.tensor(cols, device=device, dtype=torch.long)))
    return out


def _stacked(t: torch.Tensor, k: int) -> torch.Tensor:
    """k copies of a batch, one after another, in the batch's own memory layout."""
    if k == 1:
        return t.clone()
    return torch.cat([t] * k)


@torch.inference_mode()
def score_masked(plan: MaskPlan, surgery: Surgery, layer: str, candidates: Sequence[Candidate],
                 scoring: ScoringSet, chunk_bytes: int, advance: Callable[[int], None],
                 with_base: bool = True) -> tuple[Scores | None, Scores]:
    """(base, candidates) tallies through the masked tail, `chunk_bytes` of tail inputs a pass;
    base only `with_base`."""
    device = scoring.batches[0][0].device
    base = Scores.zeros(1, scoring.num_classes)
    scores = Scores.zeros(len(candidates), scoring.num_classes)
    base.total = scores.total = scoring.total
    inputs = [plan.head(x) for x, _ in scoring.batches]
    per_image = sum(4 * t[0].numel() for t in inputs[0])
    batch = max(len(y) for _, y in scoring.batches)
    chunk = max(1, min(len(candidates), chunk_bytes // (per_image * batch)))
    parts = [(slice(start, min(start + chunk, len(candidates))),
              _masks(surgery, layer, plan.points, candidates[start:start + chunk], device))
             for start in range(0, len(candidates), chunk)]
    unmasked = _masks(surgery, layer, plan.points, [], device)
    done = 0.0
    for sides, (_, y) in zip(inputs, scoring.batches, strict=True):
        if with_base:
            logits = plan.tail(*[t.clone() for t in sides], *unmasked)
            base.add_logits(slice(0, 1), logits.unsqueeze(0), y)
        for rows, masks in parts:
            k = rows.stop - rows.start
            logits = plan.tail(*[_stacked(t, k) for t in sides], *masks)
            scores.add_logits(rows, logits.view(k, len(y), -1), y)
        step = len(candidates) * len(y) / scoring.total
        advance(int(done + step) - int(done))
        done += step
    advance(len(candidates) - int(done))
    return base if with_base else None, scores
