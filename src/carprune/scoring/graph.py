"""The traced network and its two halves at a unit: the head (what no candidate changes,
computed once) and the tail (what each candidate changes, run batched over candidates); and
either, or the whole network, with its BatchNorms folded into their convs for inference."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..groups import NORMS
from ..layout import arranged, layout_for


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every conv, linear and norm one call (timm's BatchNormAct2d
    too), so that each module that makes a unit's channel is one node of the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, *NORMS)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """The model as an fx graph over its own modules, or None where fx cannot trace it."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the naive engine
        return None
    return fx.GraphModule(tracer.root, graph)


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _channel_cat(node) -> bool:
    """A torch.cat of several tensors along the channel dimension."""
    if not isinstance(node, fx.Node) or node.op != "call_function" \
            or node.target not in (torch.cat, torch.concat):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim == 1 and isinstance(node.args[0], (list, tuple))


def pools_into_concats(traced: fx.GraphModule) -> fx.GraphModule:
    """Rewrite pool(cat(xs) along channels) as cat(pool(x) for x in xs), in place: a pool
    reads each channel alone (equal up to rounding: an average may sum in another order).
    Split at a unit, the branches no candidate changes are then pooled once per image in the
    head, not once per candidate in the tail (an Inception block's other branches, 4x to 49x
    smaller)."""
    graph, modules = traced.graph, dict(traced.named_modules())
    for node in list(graph.nodes):
        pool = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(pool, _POOLS) or getattr(pool, "return_indices", False) \
                or len(node.args) != 1 or node.kwargs or not _channel_cat(node.args[0]) \
                or len(node.args[0].users) != 1:
            continue
        cat = node.args[0]
        with graph.inserting_before(node):
            parts = [graph.call_module(node.target, (x,)) for x in cat.args[0]]
            joined = graph.call_function(torch.cat, (parts,), {"dim": 1})
        node.replace_all_uses_with(joined)
        graph.erase_node(node)
        graph.erase_node(cat)
    graph.lint()
    traced.recompile()
    return traced


def closure(node: fx.Node, neighbours) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for other in neighbours(stack.pop()):
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return seen


def descendants(node: fx.Node) -> set[fx.Node]:
    return closure(node, lambda n: n.users)


def ancestors(node: fx.Node) -> set[fx.Node]:
    return closure(node, lambda n: n.all_input_nodes)


def module_node(graph: fx.Graph, name: str) -> fx.Node | None:
    """The one call of module `name`, or None when it is called never or more than once."""
    found = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    return found[0] if len(found) == 1 else None


def boundary(graph: fx.Graph, tail: Iterable[fx.Node],
             skip: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """What the tail nodes read from outside the tail (less `skip`): per-image values (the
    head's outputs) and values no image changes (parameters, computed inside the tail)."""
    inside = set(tail)
    per_image = set().union(*(descendants(n) for n in graph.nodes if n.op == "placeholder"))
    sides, constants = [], []
    for n in tail:
        for a in n.all_input_nodes:
            if a not in inside and a not in skip and a not in sides and a not in constants:
                (sides if a in per_image else constants).append(a)
    return sides, constants


def head_module(traced: fx.GraphModule, tail: set[fx.Node],
                outputs: list[fx.Node]) -> fx.GraphModule:
    """Everything outside the tail, returning `outputs`."""
    graph, env = fx.Graph(), {}
    for n in traced.graph.nodes:
        if n.op != "output" and n not in tail:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[o] for o in outputs))
    head = fx.GraphModule(traced, graph)
    head.graph.eliminate_dead_code()
    head.recompile()
    return head


def tail_graph(graph: fx.Graph, inputs: list[fx.Node], constants: list[fx.Node],
               tail: list[fx.Node], extra: int = 0, wrap=None) -> fx.Graph:
    """The tail as a graph of its own: one placeholder per input (then `extra` more), what the
    constants need, then the tail nodes. `wrap(graph, node, value, extras)` may replace the
    value an input or tail node gives its users."""
    out = fx.Graph()
    env = {n: out.placeholder(f"input_{i}") for i, n in enumerate(inputs)}
    extras = [out.placeholder(f"extra_{i}") for i in range(extra)]
    if wrap is not None:
        env = {n: wrap(out, n, v, extras) for n, v in env.items()}
    fixed = set().union(*(ancestors(c) for c in constants))
    for n in graph.nodes:
        if n in fixed:
            env[n] = out.node_copy(n, env.__getitem__)
    for n in tail:
        env[n] = out.node_copy(n, env.__getitem__)
        if wrap is not None:
            env[n] = wrap(out, n, env[n], extras)
    return out


def _after_norm(norm: nn.Module) -> nn.Module | None:
    """What is left of a norm once its affine map is folded away: nothing for BatchNorm, its
    dropout and activation for timm's BatchNormAct2d; None for norms that cannot be folded."""
    if not isinstance(norm, _BatchNorm) or norm.training or norm.running_var is None:
        return None
    if type(norm) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return nn.Identity()
    if type(norm).__name__ == "BatchNormAct2d":
        return nn.Sequential(norm.drop, norm.act)
    return None


def folded(module: fx.GraphModule) -> fx.GraphModule:
    """The same function with each eval BatchNorm folded into the conv that alone feeds it
    (torch's fuse_conv_bn_eval): equal up to rounding, and a third faster on a MobileNet's
    tail on CPU. The folded convs are copies of the weights as they are now, so build it anew
    after any change to them."""
    graph = copy.deepcopy(module.graph)
    root = {n.target: module.get_submodule(n.target) if n.op == "call_module" else
            _attribute(module, n.target) for n in graph.nodes
            if n.op in ("call_module", "get_attr")}
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        conv = node.args[0] if node.op == "call_module" and node.args else None
        rest = _after_norm(root[node.target]) if conv is not None else None
        if rest is None or not isinstance(conv, fx.Node) or conv.op != "call_module" \
                or not isinstance(root[conv.target], nn.Conv2d) or len(conv.users) != 1 \
                or calls[conv.target] != 1 or calls[node.target] != 1:
            continue
        root[conv.target] = fuse_conv_bn_eval(root[conv.target], root[node.target])
        root[node.target] = rest
        if isinstance(rest, nn.Identity):
            node.replace_all_uses_with(conv)
            graph.erase_node(node)
    return fx.GraphModule(root, graph)


def refresh(module: fx.GraphModule, model: nn.Module) -> None:
    """Point every attribute the graph reads (get_attr) at `model`'s own, in place: a pruned
    parameter that belongs to no conv, linear or norm (ConvNeXt's layer scales) is replaced
    by a new one, which a graph made before the removal would still hold."""
    for node in module.graph.nodes:
        if node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, name,
                    _attribute(model, node.target))


def _attribute(module: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def inference(model: nn.Module, traced: fx.GraphModule | None = None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` as its weights are now, for inference only: BatchNorms folded into their convs
    (`folded`) and images fed in the model's layout (channels_last where it works, layout.py),
    about 3x faster for a MobileNet on CPU; the model itself where fx cannot trace it. Build it
    anew after any change to the weights. `traced`: the model's `trace`, where the caller keeps
    one (its structure unchanged since)."""
    traced = trace(model) if traced is None else traced
    run = model if traced is None else folded(traced)
    return lambda x: run(arranged(x, layout_for(model, x[:1])))
