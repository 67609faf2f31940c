"""The fast exact engine (DESIGN.md, "The fast engine").

For a layer L whose channels reach the rest of the network only through one linear consumer
(a conv or an FC layer), across per-channel operations only (its BatchNorm, activations, pools,
the depthwise conv of an expand-depthwise-project block), the network without channel i of L is

    tail( consumer(X) - consumer_i(X_i) , side inputs )

where X is the consumer's input, consumer_i the consumer restricted to the input channel(s) of
unit i, and tail everything after the consumer. So:

- everything upstream of the consumer is computed once per layer (`head`) and kept; after a
  removal in L the cache is sliced instead of recomputed;
- each candidate costs one channel's share of the consumer plus the tail;
- candidates are evaluated together, along a candidate dimension, in chunks that fit the memory
  budget.
- the tail runs with its BatchNorms folded into their convs (`graph.folded`, made anew for
  each scoring call, since the weights change between calls).

Every other unit (residual stage channels, channels read by several layers or by
squeeze-excitation) is scored through the masked tail (masked.py), exact for any graph.
Models fx cannot trace, and compensated scoring of such units, use the naive engine.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from .. import compensation
from ..groups import Surgery, Unit, is_depthwise
from ._common import Scores, ScoringSet
from .graph import (
    boundary,
    descendants,
    folded,
    head_module,
    module_node,
    pools_into_concats,
    tail_graph,
    trace,
)
from .masked import MaskPlan, plan_masked, score_masked
from .naive import NaiveEngine

DEFAULT_MEMORY_BUDGET = 2 * 2**30
TAIL_BATCH_BYTES = 16 * 2**20


@dataclass
class _Plan:
    """How to score one layer fast: head (inputs -> X, side inputs) and tail (Z, side -> logits)."""

    head: fx.GraphModule
    tail: fx.GraphModule
    consumer: nn.Module
    norm: _BatchNorm | None               # a BatchNorm right after the consumer, folded in
    in_index: Callable[[int], list[int]]  # unit channel -> consumer input indices
    pool: nn.Module | None                # a pool that alone reads the consumer's output

    def used(self, height: int, width: int) -> tuple[int, int]:
        """The rows and columns of the consumer's output that reach the tail: a pool without
        padding or ceil mode never reads the remainder beyond its last window."""
        if self.pool is None:
            return height, width
        k, s = (_pair(self.pool.kernel_size), _pair(self.pool.stride or self.pool.kernel_size))
        return tuple((n - k[i]) // s[i] * s[i] + k[i] for i, n in enumerate((height, width)))

    def full(self, x: torch.Tensor) -> torch.Tensor:
        z = self.consumer(x)
        return self.norm(z) if self.norm is not None else z

    def weight(self) -> torch.Tensor:
        """The consumer's weight with the folded BatchNorm's per-channel scale applied."""
        w = self.consumer.weight
        if self.norm is None:
            return w
        scale = torch.rsqrt(self.norm.running_var + self.norm.eps)
        if self.norm.weight is not None:
            scale = scale * self.norm.weight
        return w * scale.view(-1, *[1] * (w.ndim - 1))


@dataclass
class _Cache:
    scoring: ScoringSet           # the images X is of
    alive: list[int]              # original indices of L's channels when X was computed
    feeds: list[list[int]]        # per channel of L: the consumer input indices it feeds
    removals: int                 # len(surgery.removals) when X was computed
    inputs: list[torch.Tensor]    # X per scoring batch
    sides: list[tuple]            # side inputs per scoring batch


_ZERO_KEEPING = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU,
                 nn.Tanh, nn.Mish, nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ZERO_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardtanh,
                   torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   torch.flatten, torch.cat, getattr}
_ZERO_METHODS = {"relu", "flatten", "view", "reshape", "contiguous", "size"}


def _per_channel(node: fx.Node, modules: dict[str, nn.Module], makers: set[str]) -> bool:
    """An operation that carries each channel alone and keeps a zeroed channel zero: the
    unit's own (ablated) norms and depthwise convs, activations with f(0) = 0, pools, reshapes."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _BatchNorm) or is_depthwise(m):
            return node.target in makers and isinstance(getattr(m, "act", nn.Identity()),
                                                         _ZERO_KEEPING)
        return isinstance(m, _ZERO_KEEPING)
    if node.op == "call_function" and node.target is operator.getitem:  # of a size, not of
        source = node.args[0]                                            # a tensor's channels
        return isinstance(source, fx.Node) and source.target in ("size", getattr)
    if node.op == "call_function":
        return node.target in _ZERO_FUNCTIONS
    return node.op == "call_method" and node.target in _ZERO_METHODS


def plan_layer(surgery: Surgery, layer: str,
               traced: fx.GraphModule | None = None) -> _Plan | None:
    """The head/tail split for `layer` at its one linear consumer, or None where the channels
    reach the rest otherwise (the masked tail then applies)."""
    consumers = surgery.consumers(layer, 0)
    if surgery.coupled(layer, depthwise=False) or len(consumers) != 1:
        return None
    cname = consumers[0][0]
    consumer = surgery.modules[cname]
    if type(consumer) not in (nn.Conv2d, nn.Linear) or isinstance(consumer, nn.Conv2d) and (
            consumer.groups != 1 or consumer.padding_mode != "zeros"):
        return None
    traced = traced or trace(surgery.model)
    if traced is None:
        return None
    graph = traced.graph
    lnode, cnode = module_node(graph, layer), module_node(graph, cname)
    if lnode is None or cnode is None or len(cnode.all_input_nodes) != 1:
        return None
    below_c = descendants(cnode)
    chain = descendants(lnode) - below_c
    modules = dict(traced.named_modules())
    makers = set(surgery.producing(layer, 0))
    if cnode.all_input_nodes[0] not in chain \
            or any(u not in chain and u is not cnode for n in chain for u in n.users) \
            or not all(_per_channel(n, modules, makers) for n in chain if n is not lnode) \
            or not makers <= {n.target for n in chain if n.op == "call_module"}:
        return None
    norm_node = next(iter(cnode.users)) if len(cnode.users) == 1 else None
    norm = modules.get(norm_node.target) if norm_node is not None and \
        norm_node.op == "call_module" else None
    if type(norm) not in (nn.BatchNorm1d, nn.BatchNorm2d) or norm.training \
            or norm.running_var is None:
        norm, norm_node = None, None
    out_node = norm_node or cnode
    tail_nodes = [n for n in graph.nodes if n in below_c and n not in (cnode, norm_node)]
    sides, constants = boundary(graph, tail_nodes, {out_node})
    head = head_module(traced, below_c, [cnode.all_input_nodes[0], *sides])
    tail = fx.GraphModule(traced, tail_graph(graph, [out_node, *sides], constants, tail_nodes))
    _pool_before_relu(tail)
    crop = _cropping_pool(tail)
    _window_max_pools(tail)

    def in_index(channel: int) -> list[int]:
        return surgery.consumers(layer, channel)[0][1]

    return _Plan(head, tail, consumer, norm, in_index, crop)


def _cropping_pool(tail: fx.GraphModule) -> nn.Module | None:
    """The tail's pool when it is the only reader of the consumer's output and has no padding,
    dilation or ceil mode (so the rows and columns past its last window are never read)."""
    modules = dict(tail.named_modules())
    out = next(n for n in tail.graph.nodes if n.op == "placeholder")
    if len(out.users) != 1:
        return None
    user = next(iter(out.users))
    pool = modules.get(user.target) if user.op == "call_module" else None
    if not isinstance(pool, nn.MaxPool2d | nn.AvgPool2d) or not _windows_only(pool) \
            or user.args[0] is not out:
        return None
    return pool


def _windows_only(pool: nn.Module) -> bool:
    """A pool without padding, dilation or ceil mode: it reads nothing past its last window."""
    return not pool.ceil_mode and _pair(pool.padding) == (0, 0) \
        and _pair(getattr(pool, "dilation", 1)) == (1, 1)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    return node.op == "call_function" and node.target in (torch.relu, F.relu)


def _pool_before_relu(tail: fx.GraphModule) -> None:
    """Rewrite relu -> maxpool as maxpool -> relu: the same numbers exactly (max commutes with a
    non-decreasing function), with the relu on the pooled, 4x smaller tensor."""
    modules = dict(tail.named_modules())
    for relu in list(tail.graph.nodes):
        if not _is_relu(relu, modules) or len(relu.users) != 1:
            continue
        pool = next(iter(relu.users))
        if not (pool.op == "call_module" and isinstance(modules.get(pool.target), nn.MaxPool2d)
                and pool.args[0] is relu):
            continue
        users = list(pool.users)
        pool.args = (relu.args[0], *pool.args[1:])
        pool.append(relu)
        relu.args = (pool, *relu.args[1:])
        for user in users:
            user.replace_input_with(pool, relu)
    tail.graph.lint()
    tail.recompile()


def _plain_max_pool(pool: nn.Module | None) -> bool:
    """A max pool whose windows tile the input: stride = kernel, no padding or dilation."""
    return isinstance(pool, nn.MaxPool2d) and _windows_only(pool) and not pool.return_indices \
        and _pair(pool.stride or pool.kernel_size) == _pair(pool.kernel_size)


def _window_max(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """max_pool2d with windows that tile the input, as elementwise maxima over a channels_last
    view: the same numbers (max is exact), about 3x faster on CPU than max_pool2d, which also
    computes the arg-max indices. Other layouts and sizes go to max_pool2d."""
    kh, kw = kernel
    n, c, h, w = x.shape
    if h % kh or w % kw or not x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, kernel)
    v = x.permute(0, 2, 3, 1).view(n, h // kh, kh, w // kw, kw, c)
    rows = v[:, :, 0]
    for i in range(1, kh):
        rows = torch.maximum(rows, v[:, :, i])
    out = rows[:, :, :, 0]
    for j in range(1, kw):
        out = torch.maximum(out, rows[:, :, :, j])
    return out.permute(0, 3, 1, 2)


def _window_max_pools(tail: fx.GraphModule) -> None:
    """Run the tail's tiling max pools as `_window_max`."""
    modules = dict(tail.named_modules())
    for node in tail.graph.nodes:
        pool = modules.get(node.target) if node.op == "call_module" else None
        if _plain_max_pool(pool) and len(node.args) == 1 and not node.kwargs:
            node.op, node.target = "call_function", _window_max
            node.args = (node.args[0], _pair(pool.kernel_size))
    tail.graph.lint()
    tail.recompile()


def _columns(plan: _Plan, x: torch.Tensor, z: torch.Tensor, needed: torch.Tensor | None):
    """Per batch, once: the consumer's input arranged per input index, and its output z (only
    the positions the tail reads) laid out for subtraction. Conv: im2col patches
    (C, B*L, kh*kw) of the input channels `needed` (all when None) and z as (1, B*L, C'), L the
    positions read; linear: the flattened features (B, F) and z itself. Returns them and z
    cropped."""
    consumer = plan.consumer
    if isinstance(consumer, nn.Conv2d):
        kh, kw = consumer.kernel_size
        b, _, height, width = z.shape
        h, w = plan.used(height, width)
        z = z[:, :, :h, :w]
        x = x if needed is None else x[:, needed]
        cols = F.unfold(x, (kh, kw), consumer.dilation, consumer.padding, consumer.stride)
        cols = cols.view(b, -1, kh * kw, height, width)[..., :h, :w]
        cols = cols.permute(1, 0, 3, 4, 2).reshape(-1, b * h * w, kh * kw)
        return cols, z.permute(0, 2, 3, 1).reshape(1, b * h * w, z.shape[1]), z
    return x.reshape(x.shape[0], -1), z, z


def _without(weight: torch.Tensor, cols: torch.Tensor, zl: torch.Tensor, z: torch.Tensor,
             idx: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """The consumer's output without each candidate's input indices (rows of idx, (K, m)):
    z - consumer_i(x_i) for every candidate, as one (K*B, *z.shape[1:]) batch. With q (K, m*kk,
    all columns), the compensated consumer's: z - (x Q_i^T) W_i^T (compensation.py)."""
    k, m = idx.shape
    b = z.shape[0]
    if cols.ndim == 3:
        # one batched matmul per chunk, z - cols_k @ W_k, laid out (K, B, H', W', C') so the
        # result is already a channels_last batch for the tail
        positions, kk = cols.shape[1:]
        if q is None:
            ck = cols[idx.reshape(-1)]                                       # (K*m, B*L, kk)
            if m > 1:
                ck = ck.view(k, m, positions, kk).transpose(1, 2).reshape(k, positions, m * kk)
        else:                                                                # (K, B*L, m*kk)
            ck = torch.einsum("cpt,kjct->kpj", cols, q.view(k, m * kk, -1, kk))
        c_out = weight.shape[0]
        w = weight[:, idx.reshape(-1)].reshape(c_out, k, m * kk).permute(1, 2, 0).contiguous()
        # (K, B*L, C') = z - ck @ w, written once into a contiguous batch; a product of rank
        # one (a 1x1 consumer, one channel a unit) as an elementwise outer product, which BLAS
        # does 3-10x slower (and elementwise kernels 5x slower again on a strided w)
        ck, out = ck.view(k, positions, m * kk), zl.new_empty(k, positions, c_out)
        if m * kk == 1:
            torch.addcmul(zl, ck, w, value=-1, out=out)
        else:
            torch.baddbmm(zl, ck, w, alpha=-1, out=out)
        return out.view(k * b, *z.shape[2:], c_out).permute(0, 3, 1, 2)
    taken = cols[:, idx] if q is None else torch.einsum("bf,kmf->bkm", cols, q)
    contrib = torch.einsum("bkm,ckm->kbc", taken, weight[:, idx])
    return (z.unsqueeze(0) - contrib).reshape(k * b, -1)


def _head_unchanged(surgery: Surgery, plan: _Plan, layer: str, cache: _Cache) -> bool:
    """Whether every removal since the cache was filled was in `layer` itself (the cache is
    then sliced) or changed no module the head calls or reads parameters of, nor any module
    inside one (a root parameter, named "", counts as inside every module)."""
    others = [changed for name, _, changed in surgery.removals[cache.removals:] if name != layer]
    if not others:
        return True
    runs = {n.target if n.op == "call_module" else n.target.rpartition(".")[0]
            for n in plan.head.graph.nodes if n.op in ("call_module", "get_attr")}
    return not any(c == r or c.startswith(f"{r}.") or not r
                   for changed in others for c in changed for r in runs)


def _needed(plan: _Plan, idx: torch.Tensor, weight: torch.Tensor,
            uncompensated: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """When a conv consumer reads more channels than the candidates feed (a shortlist), the
    input channels they feed, the candidates' indices among them and the consumer's weight on
    them, so that im2col unfolds only those; else (None, idx, weight). The compensated
    consumer reads every channel."""
    needed = torch.unique(idx)
    if not uncompensated or not isinstance(plan.consumer, nn.Conv2d) \
            or len(needed) == weight.shape[1]:
        return None, idx, weight
    return needed, torch.searchsorted(needed, idx), weight[:, needed]


class FastEngine:
    """Exact CAR scores, same interface and same answers as NaiveEngine, much less work."""

    name = "fast"

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET, compensate: bool = False):
        self.memory_budget = memory_budget
        self.compensate = compensate
        self.naive = NaiveEngine(compensate)
        self._surgery: Surgery | None = None  # what the traced graph, plans and caches are of
        self._traced: fx.GraphModule | None = None
        self._plans: dict[str, _Plan | MaskPlan | None] = {}
        self._caches: dict[tuple[str, int], _Cache] = {}  # by layer and scoring set

    def score(self, surgery: Surgery, units: Sequence[Unit], scoring: ScoringSet,
              advance: Callable[[int], None] = lambda n: None) -> tuple[Scores, Scores]:
        rows: dict[str, list[int]] = {}
        for pos, unit in enumerate(units):
            rows.setdefault(unit.layer, []).append(pos)
        result = Scores.zeros(len(units), scoring.num_classes)
        result.total = scoring.total
        base = None
        for layer, positions in rows.items():  # the network's own tallies once, with the first
            layer_base, scores = self._score(surgery, layer, [units[p] for p in positions],
                                             scoring, advance, base is None)
            base = base or layer_base
            index = torch.tensor(positions)
            result.correct[index] = scores.correct
            result.class_correct[index] = scores.class_correct
            result.loss[index] = scores.loss
        if base is None:
            base = self.naive.score(surgery, [], scoring)[0]
        return base, result

    def plan(self, surgery: Surgery, layer: str) -> _Plan | MaskPlan | None:
        """How `layer` is scored: at its linear consumer, through a masked tail, or (None)
        naively. Plans depend on the graph only, so each is made once per surgery."""
        if surgery is not self._surgery:
            traced = trace(surgery.model)
            self._surgery = surgery
            self._traced = None if traced is None else pools_into_concats(traced)
            self._plans, self._caches = {}, {}
        if layer not in self._plans:
            traced = self._traced
            self._plans[layer] = None if traced is None else \
                plan_layer(surgery, layer, traced) or plan_masked(traced, surgery, layer)
        return self._plans[layer]

    def _score(self, surgery: Surgery, layer: str, units: Sequence[Unit], scoring: ScoringSet,
               advance: Callable[[int], None], with_base: bool) -> tuple[Scores | None, Scores]:
        """(base, candidates) tallies of one layer's units; base only `with_base`."""
        plan = self.plan(surgery, layer)
        if isinstance(plan, _Plan):
            return self._score_layer(surgery, plan, layer, units, scoring, advance, with_base)
        if isinstance(plan, MaskPlan) and not self.compensate:
            chunk = min(TAIL_BATCH_BYTES, self.memory_budget // 8)
            return score_masked(plan, surgery, layer, units, scoring, chunk, advance,
                                with_base)
        return self.naive.score(surgery, units, scoring, advance)

    @torch.inference_mode()
    def cache_bytes(self, surgery: Surgery, layer: str, scoring: ScoringSet) -> int:
        """Memory the layer's scoring holds: its consumer's input and output per image, or the
        masked tail's inputs."""
        plan = self.plan(surgery, layer)
        if isinstance(plan, MaskPlan):
            return 4 * scoring.total * sum(t.numel() for t in plan.head(scoring.example()))
        if plan is None:
            return 0
        x = plan.head(scoring.example())[0]
        return 4 * scoring.total * (x.numel() + plan.full(x).numel())

    @torch.inference_mode()
    def _inputs(self, surgery: Surgery, plan: _Plan, layer: str,
                scoring: ScoringSet) -> _Cache:
        """X and side inputs per batch, sliced from the cache when only L lost channels since
        it was filled or other removals changed no module the head runs, else recomputed."""
        alive = list(surgery.alive[layer])
        feeds = [plan.in_index(c) for c in range(len(alive))]
        cache = self._caches.get((layer, id(scoring)))  # the cache holds scoring: ids stay
        if cache is not None and _head_unchanged(surgery, plan, layer, cache):
            gone = {i for pos, o in enumerate(cache.alive) if o not in alive
                    for i in cache.feeds[pos]}  # X may hold other layers' channels (concat)
            keep = [i for i in range(cache.inputs[0].shape[1]) if i not in gone]
            inputs = [x[:, keep] for x in cache.inputs]
            sides = cache.sides
        else:
            inputs, sides = [], []
            for x, _ in scoring.batches:
                out = plan.head(x)
                inputs.append(out[0])
                sides.append(tuple(out[1:]))
        cache = _Cache(scoring, alive, feeds, len(surgery.removals), inputs, sides)
        others = [k for k in self._caches if k[0] == layer and k[1] != id(scoring)]
        for key in [*others[:-1], (layer, id(scoring))]:  # the last two scoring sets' caches,
            self._caches.pop(key, None)                    # the latest last
        self._caches[layer, id(scoring)] = cache
        return cache

    @torch.inference_mode()
    def _score_layer(self, surgery: Surgery, plan: _Plan, layer: str, units: Sequence[Unit],
                     scoring: ScoringSet, advance,
                     with_base: bool) -> tuple[Scores | None, Scores]:
        cache = self._inputs(surgery, plan, layer, scoring)
        idx = torch.tensor([cache.feeds[u.channel] for u in units],
                           device=scoring.batches[0][0].device)
        base = Scores.zeros(1, scoring.num_classes)
        scores = Scores.zeros(len(units), scoring.num_classes)
        base.total = scores.total = scoring.total
        full = [plan.full(x) for x in cache.inputs]
        weight, tail = plan.weight(), folded(plan.tail)
        q = None
        if self.compensate and compensation.refittable(plan.consumer):
            p = compensation.inverse(sum(compensation.gram(plan.consumer, x)
                                         for x in cache.inputs))
            q = torch.stack([compensation.q_rows(p, compensation.columns(plan.consumer, feeds))
                             .to(weight.dtype) for feeds in idx.tolist()])
        for z, side, (_, y) in zip(full, cache.sides, scoring.batches, strict=True) \
                if with_base else ():
            logits = tail(z.clone(), *[t.clone() for t in side])  # the tail may work in place
            base.add_logits(slice(0, 1), logits.unsqueeze(0), y)
        # candidates per pass: about TAIL_BATCH_BYTES of consumer output (small enough to stay
        # in cache through the tail's memory-bound ops), never more than the memory budget
        sample = 4 * full[0][0].numel()
        batch = max(len(y) for _, y in scoring.batches)
        chunk = max(1, min(len(units), TAIL_BATCH_BYTES // (sample * batch),
                           self.memory_budget // (6 * sample * batch)))
        needed, idx, weight = _needed(plan, idx, weight, q is None)
        done = 0.0
        for x, z, side, (_, y) in zip(cache.inputs, full, cache.sides, scoring.batches,
                                      strict=True):
            cols, zl, z = _columns(plan, x, z, needed)
            for start in range(0, len(units), chunk):
                rows = slice(start, min(start + chunk, len(units)))
                k = rows.stop - rows.start
                zc = _without(weight, cols, zl, z, idx[rows], None if q is None else q[rows])
                reps = [s.repeat(k, *[1] * (s.ndim - 1)) for s in side]
                scores.add_logits(rows, tail(zc, *reps).view(k, len(y), -1), y)
            step = len(units) * len(y) / scoring.total
            advance(int(done + step) - int(done))
            done += step
        advance(len(units) - int(done))
        return base if with_base else None, scores
