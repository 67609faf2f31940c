"""The traced network and its two halves at a unit: the head (what no candidate changes,
computed once) and the tail (what each candidate changes, run batched over candidates)."""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
from torch import nn

from ..groups import NORMS


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
