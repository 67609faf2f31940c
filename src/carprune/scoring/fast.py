"""The fast exact engine (docs/engine.md, "The fast engine").

A layer whose channels reach the rest only through one linear consumer is scored there
(consumer.py):

- everything upstream of the consumer is computed once per layer (`head`) and kept; after a
  removal in the layer the cache is sliced instead of recomputed;
- each candidate costs its channels' share of the consumer plus the tail;
- candidates are evaluated together, along a candidate dimension, in chunks that fit the memory
  budget (candidates that feed the consumer different numbers of inputs, blocks of different
  sizes, in separate chunks);
- the tail runs with its BatchNorms folded into their convs (`graph.folded`, made anew for
  each scoring call, since the weights change between calls).

Every other unit (residual stage channels, channels read by several layers or by
squeeze-excitation) is scored through the masked tail (masked.py), exact for any graph.
Models fx cannot trace, compensated scoring of such units, and refits fitted on other images
than those scored use the naive engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..groups import Surgery
from ..layout import arranged
from . import compensation
from .consumer import ConsumerPlan, plan_layer
from .engine import Candidate, EngineOptions
from .graph import folded, pools_into_concats, refresh, trace
from .masked import MaskPlan, plan_masked, score_masked
from .naive import NaiveEngine
from .sets import Scores, ScoringSet

TAIL_BATCH_BYTES = 16 * 2**20


@dataclass
class _Cache:
    scoring: ScoringSet           # the images X is of
    alive: list[int]              # original indices of L's channels when X was computed
    feeds: list[list[int]]        # per channel of L: the consumer input indices it feeds
    removals: int                 # len(surgery.removals) when X was computed
    inputs: list[torch.Tensor]    # X per scoring batch
    sides: list[tuple]            # side inputs per scoring batch


def _columns(plan: ConsumerPlan, x: torch.Tensor, z: torch.Tensor, needed: torch.Tensor | None):
    """Per batch, once: the consumer's input arranged per input index, and its output z (only
    the positions the tail reads) laid out for subtraction. Conv: im2col patches
    (C, B*L, kh*kw) of the input channels `needed` (all when None) and z as (1, B*L, C'), L the
    positions read; linear: its input features (B*L, F) and z as (B*L, F'), L the positions of
    a channels-last input (1 on a flat one). Returns them and z cropped."""
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
    return x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1]), z


def _without(weight: torch.Tensor, cols: torch.Tensor, zl: torch.Tensor, z: torch.Tensor,
             idx: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """The consumer's output without each candidate's input indices (rows of idx, (K, m)):
    z - consumer_i(x_i) for every candidate, as one (K*B, *z.shape[1:]) batch. With q (K, m*kk,
    all columns), the compensated consumer's: z - (x Q_i^T) W_i^T (scoring/compensation.py)."""
    k, m = idx.shape
    b = z.shape[0]
    if cols.ndim == 3:
        # one batched matmul per chunk, z - cols_k @ W_k, laid out (K, B, H', W', C') so the
        # result is already a channels_last batch for the tail (where the network runs so)
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
    return (zl.unsqueeze(0) - contrib).reshape(k * b, *z.shape[1:])


def _head_unchanged(surgery: Surgery, plan: ConsumerPlan, layer: str, cache: _Cache) -> bool:
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


def _needed(plan: ConsumerPlan, idx: torch.Tensor, weight: torch.Tensor,
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

    def __init__(self, options: EngineOptions = EngineOptions()):
        self.memory_budget = options.memory_budget
        self.compensate = options.compensate
        self.ridge = options.ridge
        self.naive = NaiveEngine(options)
        self._surgery: Surgery | None = None  # what the traced graph, plans and caches are of
        self._traced: fx.GraphModule | None = None
        self._plans: dict[str, ConsumerPlan | MaskPlan | None] = {}
        self._caches: dict[tuple[str, int], _Cache] = {}  # by layer and scoring set

    @property
    def reduce(self) -> Callable[[torch.Tensor], None]:
        """How a Gram matrix is summed over the processes; the naive fallback shares it."""
        return self.naive.reduce

    @reduce.setter
    def reduce(self, reduce: Callable[[torch.Tensor], None]) -> None:
        self.naive.reduce = reduce

    def score(self, surgery: Surgery, candidates: Sequence[Candidate], scoring: ScoringSet,
              advance: Callable[[int], None] = lambda n: None,
              fit: ScoringSet | None = None) -> tuple[Scores, Scores]:
        if fit is not None and self.compensate:
            return self.naive.score(surgery, candidates, scoring, advance, fit)
        scoring = scoring.in_layout(surgery.layout)  # the set itself when it is (caches stay)
        rows: dict[str, list[int]] = {}
        for pos, candidate in enumerate(candidates):
            rows.setdefault(candidate.layer, []).append(pos)
        result = Scores.zeros(len(candidates), scoring.num_classes)
        result.total = scoring.total
        base = None
        for layer, positions in rows.items():  # the network's own tallies once, with the first
            layer_base, scores = self._score(surgery, layer, [candidates[p] for p in positions],
                                             scoring, advance, base is None)
            base = base or layer_base
            _place(result, positions, scores)
        if base is None:
            base = self.naive.score(surgery, [], scoring)[0]
        return base, result

    def plan(self, surgery: Surgery, layer: str) -> ConsumerPlan | MaskPlan | None:
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

    def _score(self, surgery: Surgery, layer: str, candidates: Sequence[Candidate],
               scoring: ScoringSet, advance: Callable[[int], None],
               with_base: bool) -> tuple[Scores | None, Scores]:
        """(base, candidates) tallies of one layer's candidates; base only `with_base`."""
        plan = self.plan(surgery, layer)
        if plan is not None:  # removals may have replaced parameters it reads
            refresh(plan.head, surgery.model)
            refresh(plan.tail, surgery.model)
        if isinstance(plan, ConsumerPlan):
            return self._score_layer(surgery, plan, layer, candidates, scoring, advance,
                                     with_base)
        if isinstance(plan, MaskPlan) and not self.compensate:
            chunk = min(TAIL_BATCH_BYTES, self.memory_budget // 8)
            return score_masked(plan, surgery, layer, candidates, scoring, chunk, advance,
                                with_base)
        return self.naive.score(surgery, candidates, scoring, advance)

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
    def _inputs(self, surgery: Surgery, plan: ConsumerPlan, layer: str,
                scoring: ScoringSet) -> _Cache:
        """X and side inputs per batch, sliced from the cache when only L lost channels since
        it was filled or other removals changed no module the head runs, else recomputed."""
        alive = list(surgery.alive[layer])
        feeds = [plan.in_index(c) for c in range(len(alive))]
        cache = self._caches.get((layer, id(scoring)))  # the cache holds scoring: ids stay
        if cache is not None and _head_unchanged(surgery, plan, layer, cache):
            gone = {i for pos, o in enumerate(cache.alive) if o not in alive
                    for i in cache.feeds[pos]}  # X may hold other layers' channels (concat)
            dim = -1 if isinstance(plan.consumer, nn.Linear) else 1  # a Linear's: channels-last
            keep = torch.tensor([i for i in range(cache.inputs[0].shape[dim]) if i not in gone],
                                device=cache.inputs[0].device)
            inputs = [x.index_select(dim, keep) for x in cache.inputs]
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
    def _score_layer(self, surgery: Surgery, plan: ConsumerPlan, layer: str,
                     candidates: Sequence[Candidate], scoring: ScoringSet, advance,
                     with_base: bool) -> tuple[Scores | None, Scores]:
        cache = self._inputs(surgery, plan, layer, scoring)
        feeds = [[i for u in c.units for i in cache.feeds[u.channel]] for c in candidates]
        base = Scores.zeros(1, scoring.num_classes)
        scores = Scores.zeros(len(candidates), scoring.num_classes)
        base.total = scores.total = scoring.total
        full = [plan.full(x) for x in cache.inputs]
        tail = folded(plan.tail)
        p = None
        if self.compensate and compensation.refittable(plan.consumer):
            p = compensation.inverse(sum(compensation.gram(plan.consumer, x)
                                         for x in cache.inputs), self.ridge, self.reduce)
        for z, side, (_, y) in zip(full, cache.sides, scoring.batches, strict=True) \
                if with_base else ():
            logits = tail(z.clone(), *[t.clone() for t in side])  # the tail may work in place
            base.add_logits(slice(0, 1), logits.unsqueeze(0), y)
        for width in dict.fromkeys(map(len, feeds)):  # a chunk's candidates feed alike
            rows = [k for k, f in enumerate(feeds) if len(f) == width]
            alike = self._score_alike(plan, cache, full, tail, [feeds[k] for k in rows], p,
                                      scoring, advance, surgery.layout)
            _place(scores, rows, alike)
        return base if with_base else None, scores

    def _score_alike(self, plan: ConsumerPlan, cache: _Cache, full: list[torch.Tensor],
                     tail: fx.GraphModule, feeds: list[list[int]], p: torch.Tensor | None,
                     scoring: ScoringSet, advance: Callable[[int], None],
                     layout: torch.memory_format) -> Scores:
        """The tallies of candidates that each feed the consumer as many input indices
        (`feeds`), with its refit from P = `p` when compensating; the tail gets its input in
        the network's `layout`."""
        weight = plan.weight()
        idx = torch.tensor(feeds, device=scoring.batches[0][0].device)
        scores = Scores.zeros(len(feeds), scoring.num_classes)
        scores.total = scoring.total
        q = None if p is None else torch.stack(
            [compensation.q_rows(p, compensation.columns(plan.consumer, f)).to(weight.dtype)
             for f in feeds])
        # candidates per pass: about TAIL_BATCH_BYTES of consumer output (small enough to stay
        # in cache through the tail's memory-bound ops), never more than the memory budget
        sample = 4 * full[0][0].numel()
        batch = max(len(y) for _, y in scoring.batches)
        chunk = max(1, min(len(feeds), TAIL_BATCH_BYTES // (sample * batch),
                           self.memory_budget // (6 * sample * batch)))
        needed, idx, weight = _needed(plan, idx, weight, q is None)
        done = 0.0
        for x, z, side, (_, y) in zip(cache.inputs, full, cache.sides, scoring.batches,
                                      strict=True):
            cols, zl, z = _columns(plan, x, z, needed)
            for start in range(0, len(feeds), chunk):
                rows = slice(start, min(start + chunk, len(feeds)))
                k = rows.stop - rows.start
                zc = _without(weight, cols, zl, z, idx[rows], None if q is None else q[rows])
                if isinstance(plan.consumer, nn.Conv2d):
                    zc = arranged(zc, layout)
                reps = [s.repeat(k, *[1] * (s.ndim - 1)) for s in side]
                scores.add_logits(rows, tail(zc, *reps).view(k, len(y), -1), y)
            step = len(feeds) * len(y) / scoring.total
            advance(int(done + step) - int(done))
            done += step
        advance(len(feeds) - int(done))
        return scores


def _place(into: Scores, rows: list[int], scores: Scores) -> None:
    """Write the tallies of some candidates into their rows of all the candidates'."""
    index = torch.tensor(rows, dtype=torch.long)
    into.correct[index] = scores.correct
    into.class_correct[index] = scores.class_correct
    into.loss[index] = scores.loss
