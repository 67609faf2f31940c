"""Fast against naive CAR, same process, same data: the speed-up and how close to its bound.

Per layer: the first S greedy steps with each engine (picks must be identical), seconds per
candidate, and the lower bound of the fast engine: per candidate and image, the MACs downstream
of the first operation the unit changes (after the consumer, or the masked tail), at the
throughput this machine reaches on the whole network with its BatchNorms folded, as the fast
engine's tails run (median of 3 full passes over the scoring set, right before the layer's
fast engine runs). Per unit kind (plain, residual, depthwise, concat, branch, and NEW_KINDS):
the same, summed.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from .car import Approximation, PruneResult, car_prune, resolve_keep
from .data import IMAGENET_STATS, normalise
from .groups import Surgery, Unit, out_width
from .layout import arrange
from .measure import module_macs
from .scoring import Engine, EngineOptions, FastEngine, ScoringSet, make_engine
from .scoring.graph import inference
from .scoring.naive import full_pass
from .scoring.rule import rank
from .train import evaluate

# Unit kinds added by issue 32 (docs/engine.md): reported by their speed-up over naive; the
# target of at most 2x the bound covers the kinds before them.
NEW_KINDS = ("norm-mixed", "grouped", "linear")

@dataclass
class LayerBench:
    layer: str
    kind: str                # the unit kind (groups.Surgery.kind)
    candidates: int          # candidates scored over the S steps
    naive_seconds: float
    fast_seconds: float
    bound_seconds: float     # lower bound for the fast engine over the same candidates
    picks_naive: list[int]
    picks_fast: list[int]

    @property
    def speedup(self) -> float:
        return self.naive_seconds / self.fast_seconds

    @property
    def fast_over_bound(self) -> float | None:
        return self.fast_seconds / self.bound_seconds if self.bound_seconds else None

    @property
    def identical(self) -> bool:
        return self.picks_naive == self.picks_fast


def tail_macs(surgery: Surgery, layer: str, macs: dict[str, int]) -> int:
    """MACs per image of what a candidate of `layer` recomputes at the least: the fast
    engine's tail (the whole network where it scores naively)."""
    plan = FastEngine().plan(surgery, layer)
    if plan is None:
        return sum(macs.values())
    called = {n.target for n in plan.tail.graph.nodes if n.op == "call_module"}
    return sum(v for k, v in macs.items() if k in called)


def _greedy(engine: Engine, surgery: Surgery, layer: str, scoring: ScoringSet, steps: int,
            progress: bool = True):
    picks, candidates = [], 0
    n = surgery.size(layer)
    bar = tqdm(total=sum(range(n - steps + 1, n + 1)), desc=f"{engine.name} {layer}",
               unit="cand", disable=not progress)
    start = time.perf_counter()
    for _ in range(steps):
        units = [Unit(layer, c) for c in range(surgery.size(layer))]
        candidates += len(units)
        base, scores = engine.score(surgery, units, scoring, bar.update)
        chosen = rank(base, scores, surgery.alive[layer])[0]
        picks += surgery.remove(layer, [chosen])
    seconds = time.perf_counter() - start
    bar.close()
    return picks, candidates, seconds


def throughput(run: nn.Module, scoring: ScoringSet, macs: int, passes: int = 3) -> float:
    """MAC/s of `run` over the scoring set: the median of `passes` full passes after one to
    warm up."""
    seconds = []
    with torch.inference_mode():
        full_pass(run, scoring)
        for _ in range(passes):
            start = time.perf_counter()
            full_pass(run, scoring)
            seconds.append(time.perf_counter() - start)
    return macs * scoring.total / statistics.median(seconds)


def bench_layers(model: nn.Module, scoring: ScoringSet, layers: list[str], steps: int,
                 progress=print) -> tuple[list[LayerBench], float]:
    """Returns the per-layer figures and the median of the network's throughputs (MAC/s), each
    measured right before a layer's fast engine runs, so that a layer's bound and its fast
    seconds are taken under the same load of this shared machine."""
    model = copy.deepcopy(model).eval()
    example = scoring.example()
    scoring = scoring.in_layout(arrange(model, example))  # as engines run it
    macs = module_macs(model, example)
    total = sum(macs.values())
    run = inference(model)  # the whole network as fast as the tails run: BatchNorms folded
    rows, speeds = [], []
    for layer in layers:
        naive_s = Surgery(model, example)
        fast_s = Surgery(model, example)
        progress(f"bench {layer}: naive engine, {steps} steps ...")
        picks_n, cands, t_naive = _greedy(make_engine(EngineOptions("naive")), naive_s, layer,
                                          scoring, steps)
        speeds.append(throughput(run, scoring, total))
        bound_per_cand = tail_macs(fast_s, layer, macs) * scoring.total / speeds[-1]
        progress(f"bench {layer}: fast engine, {steps} steps ...")
        picks_f, _, t_fast = _greedy(make_engine(EngineOptions("fast")), fast_s, layer,
                                     scoring, steps)
        rows.append(LayerBench(layer, fast_s.kind(layer), cands, t_naive, t_fast,
                               bound_per_cand * cands, picks_n, picks_f))
    return rows, statistics.median(speeds)


def reference_networks(fmnist, images: int):
    """The networks `carprune bench --kinds` measures, each with its scoring set and the unit
    kinds sampled in it (None: every kind): the shipped convnet; resnet20, the depthwise
    mobilenet and the concatenating inception of the zoo, trained one short epoch on
    Fashion-MNIST (3 000 images: far from good, but their filters differ), on the first
    `images` val images; torchvision's resnet18 at 64 px, random weights, on 64 windows of the
    packages' photographs labelled by its own predictions. For NEW_KINDS, their kinds only, at
    64 px, random weights, on 16 such windows (the naive engine runs them at a few GMAC/s
    here): timm's convnext_atto with nn.Linear MLPs (norm-mixed, linear) and regnetx_002
    (grouped). Yields (name, model, scoring set, kinds)."""
    import timm
    import torchvision

    from . import io
    from .models import create_model
    from .train import fit

    val = ScoringSet.from_any(TensorDataset(*[t[:images] for t in fmnist.val.tensors]), 10)
    yield "convnet-fmnist", io.load("convnet-fmnist"), val, None
    for name in ("resnet20", "mobilenet", "inception"):
        torch.manual_seed(0)
        model = create_model(name)
        fit(model, TensorDataset(*[t[:3000] for t in fmnist.train.tensors]), 1, progress=False)
        yield name, model.eval(), val, None
    for name, make, windows, kinds in (
            ("torchvision resnet18", torchvision.models.resnet18, 64, None),
            ("timm convnext_atto", lambda: timm.create_model(
                "convnext_atto", pretrained=False, conv_mlp=False), 16, NEW_KINDS),
            ("timm regnetx_002", lambda: timm.create_model(
                "regnetx_002", pretrained=False), 16, NEW_KINDS)):
        torch.manual_seed(0)
        model = make().eval()
        yield f"{name} (64 px)", model, _photo_scoring(model, windows), kinds


def _photo_scoring(model: nn.Module, windows: int) -> ScoringSet:
    """`windows` windows of 64 px of the packages' photographs, labelled by `model`'s
    predictions."""
    from .data import package_photos, photo_windows

    x, _ = photo_windows(package_photos(), per_photo=32, size=64)
    x = normalise(x[:windows], *IMAGENET_STATS)
    with torch.inference_mode():
        y = model(x).argmax(1)
    return ScoringSet.from_any(TensorDataset(x, y), 1000)


def sample_layers(surgery: Surgery, widest: int = 256, kinds=None) -> list[str]:
    """Per unit kind (of `kinds`, or every kind), its first layer and its last of at most
    `widest` units."""
    by_kind: dict[str, list[str]] = {}
    layers = surgery.prunable_layers()
    for name in layers:
        if (name == layers[0] or surgery.size(name) <= widest) and \
                (kinds is None or surgery.kind(name) in kinds):
            by_kind.setdefault(surgery.kind(name), []).append(name)
    return [n for names in by_kind.values() for n in dict.fromkeys((names[0], names[-1]))]


def by_kind(rows: list[LayerBench]) -> list[dict]:
    """The per-layer figures summed per unit kind."""
    out = []
    for kind in dict.fromkeys(r.kind for r in rows):
        mine = [r for r in rows if r.kind == kind]
        naive, fast, bound = (sum(getattr(r, f) for r in mine)
                              for f in ("naive_seconds", "fast_seconds", "bound_seconds"))
        out.append({"kind": kind, "layers": len(mine),
                    "candidates": sum(r.candidates for r in mine), "naive_seconds": naive,
                    "fast_seconds": fast, "bound_seconds": bound, "speedup": naive / fast,
                    "fast_over_bound": fast / bound if bound else None,
                    "identical": all(r.identical for r in mine), "new": kind in NEW_KINDS})
    return out


def whole_run(model: nn.Module, scoring: ScoringSet, layers: list[str], keep: float,
              progress: bool = True) -> tuple[PruneResult, dict[str, int]]:
    """Exact fast CAR of every layer to `keep` (its seconds are the run's), and candidates
    scored per layer."""
    result = car_prune(model, scoring, layers, keep=keep, progress=progress)
    cands = {name: sum(len(s.candidates) for s in rec.steps)
             for name, rec in result.layers.items()}
    return result, cands


def approximations(model: nn.Module, scoring: ScoringSet, test, exact: PruneResult,
                   layers: list[str], keep: float, step: int, screen: int) -> list[dict]:
    """The opt-in approximate modes against the exact run: seconds, the share of the exact
    run's removed filters they also removed, and their scoring and test accuracy minus the
    exact run's."""
    exact_test = evaluate(exact.model, test).accuracy
    rows = []
    for mode, approx in ((f"--step {step}", Approximation(step=step)),
                         (f"--screen {screen}", Approximation(screen=screen))):
        result = car_prune(model, scoring, layers, keep=keep, approx=approx)
        same = sum(len(set(rec.removed) & set(exact.layers[name].removed))
                   for name, rec in result.layers.items())
        total = sum(len(rec.removed) for rec in exact.layers.values())
        rows.append({"mode": mode, "seconds": result.seconds, "speedup": exact.seconds
                     / result.seconds, "identical_picks": same / total,
                     "val_diff": result.val_after - exact.val_after,
                     "test_diff": evaluate(result.model, test).accuracy - exact_test})
    return rows


def run_candidates(model: nn.Module, layers: list[str], keep: float) -> dict[str, int]:
    """Candidates exact greedy CAR scores taking each layer to `keep`: n + (n-1) + ... down to
    one above the target."""
    sizes = {name: out_width(m) for name, m in model.named_modules() if name in layers}
    return {name: sum(range(resolve_keep(keep, n, name) + 1, n + 1))
            for name, n in sizes.items()}


def overall_speedup(rows: list[LayerBench], candidates: dict[str, int],
                    run_seconds: float | None = None) -> float:
    """Naive time of a whole run (its candidates at the naive per-candidate cost measured per
    layer) over the fast engine's: measured for that run when `run_seconds` is given, else
    its candidates at the fast per-candidate cost measured per layer."""
    naive = sum(r.naive_seconds / r.candidates * candidates[r.layer] for r in rows)
    fast = run_seconds if run_seconds is not None else \
        sum(r.fast_seconds / r.candidates * candidates[r.layer] for r in rows)
    return naive / fast


def to_json(rows: list[LayerBench], throughput: float, run_seconds: float | None,
            overall: float | None, scoring_images: int, steps: int,
            approximate: list[dict] | None = None) -> dict:
    return {"scoring_images": scoring_images, "steps": steps, "approximate": approximate,
            "throughput_gmacs": throughput / 1e9, "threads": torch.get_num_threads(),
            "layers": [dict(asdict(r), speedup=r.speedup, identical=r.identical,
                            fast_over_bound=r.fast_over_bound) for r in rows],
            "kinds": by_kind(rows),
            "whole_run_seconds": run_seconds, "overall_speedup": overall,
            "identical_picks": all(r.identical for r in rows)}

