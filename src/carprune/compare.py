"""The paper's experiment: prune one layer at a time (others untouched) by every criterion and
trace test accuracy against filters kept, without and with retraining.

Orders are chosen on the scoring (val) split; accuracies are reported on test. A criterion's
curve comes from one removal order: greedy CAR records its whole order in one pass; the other
criteria rank once. Points on the curve are evaluated by ablation (identical to removal).
"""

from __future__ import annotations

import csv
import io as _io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from . import criteria
from .car import car_prune
from .devices import device_of
from .groups import Surgery, Unit
from .io import atomic_write
from .scoring import ScoringSet
from .train import Recipe, evaluate, fit


@dataclass
class Point:
    layer: str
    criterion: str
    kept: int
    retrained: bool
    val_accuracy: float
    test_accuracy: float
    test_min: float
    test_max: float
    runs: int


def removal_order(model: nn.Module, scoring: ScoringSet, layer: str, criterion: str,
                  down_to: int, seed: int = 0, progress: bool = False) -> list[int]:
    """Original filter indices in the order `criterion` removes them, down to `down_to` kept
    (`progress`: greedy CAR's bar)."""
    if criterion == "car":
        result = car_prune(model, scoring, [layer], keep=down_to, progress=progress)
        return result.layers[layer].removed
    surgery = Surgery(model, scoring.example())
    order = criteria.ranking(criterion, surgery, layer, scoring, seed)
    n = surgery.size(layer)
    return [surgery.alive[layer][p] for p in order[:n - down_to]]


def kept_counts(n: int, keep_grid: Sequence[float]) -> list[int]:
    """The filters a layer of n keeps at each fraction of the grid (half up, at least one),
    largest first, each once."""
    return sorted({max(1, math.floor(k * n + 0.5)) for k in keep_grid}, reverse=True)


def accuracy_without(model: nn.Module, layer: str, removed: list[int],
                     datasets: list[TensorDataset]) -> list[float]:
    surgery = Surgery(model, datasets[0].tensors[0][:1].to(device_of(model)))
    with surgery.ablated([Unit(layer, c) for c in removed]):
        return [evaluate(surgery.model, d).accuracy for d in datasets]


def retrained_accuracy(model: nn.Module, layer: str, removed: list[int], train: TensorDataset,
                       test: TensorDataset, epochs: int, seed: int) -> float:
    surgery = Surgery(model, test.tensors[0][:1].to(device_of(model)))
    surgery.remove(layer, removed)
    fit(surgery.model, train, epochs, Recipe(lr=0.01, seed=seed), progress=False)
    return evaluate(surgery.model, test).accuracy


def compare(model: nn.Module, data, layers: list[str], criteria_names: list[str],
            keep_grid: list[float], retrain_epochs: int = 0, retrain_keep: float = 0.5,
            seeds: int = 3, scoring=None, train: TensorDataset | None = None,
            known: dict[tuple[str, str], list[int]] | None = None,
            progress: bool = True) -> list[Point]:
    """Every (layer, criterion, kept) point; random is averaged over `seeds` seeds (min/max
    kept) and retrained points over `seeds` fine-tuning seeds. `known` holds removal orders
    already computed on the same scoring set, by (layer, criterion), e.g. a prune run's first
    layer, so greedy CAR is not run twice."""
    scoring = ScoringSet.from_any(scoring if scoring is not None else data.val,
                                  data.num_classes).to(device_of(model))
    surgery = Surgery(model, scoring.example())
    sizes = {name: surgery.size(name) for name in layers}
    points = []
    jobs = [(layer, c) for layer in layers for c in criteria_names]
    bar = tqdm(jobs, desc="compare", unit="curve", disable=not progress)
    for layer, name in bar:
        bar.set_postfix(layer=layer, criterion=name)
        n = sizes[layer]
        counts = kept_counts(n, keep_grid)
        runs = list(range(seeds)) if name == "random" else [0]
        recorded = (known or {}).get((layer, name))
        if recorded is not None and len(recorded) >= n - counts[-1]:
            orders = [recorded]
        else:
            orders = [removal_order(model, scoring, layer, name, counts[-1], seed)
                      for seed in runs]
        for kept in counts:
            accs = [accuracy_without(model, layer, order[:n - kept], [data.val, data.test])
                    for order in orders]
            tests = [a[1] for a in accs]
            points.append(Point(layer, name, kept, False, sum(a[0] for a in accs) / len(accs),
                                sum(tests) / len(tests), min(tests), max(tests), len(tests)))
        if retrain_epochs > 0:
            kept = max(1, math.floor(retrain_keep * n + 0.5))
            tests = [retrained_accuracy(model, layer, orders[s % len(orders)][:n - kept],
                                        train if train is not None else data.train,
                                        data.test, retrain_epochs, seed=s)
                     for s in range(seeds)]
            points.append(Point(layer, name, kept, True, float("nan"), sum(tests) / len(tests),
                                min(tests), max(tests), len(tests)))
    return points


def to_csv(points: list[Point]) -> str:
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["layer", "criterion", "kept", "retrained", "val_accuracy", "test_accuracy",
                     "test_min", "test_max", "runs"])
    for p in points:
        writer.writerow([p.layer, p.criterion, p.kept, int(p.retrained),
                         "" if math.isnan(p.val_accuracy) else f"{p.val_accuracy:.6f}",
                         f"{p.test_accuracy:.6f}", f"{p.test_min:.6f}", f"{p.test_max:.6f}",
                         p.runs])
    return buf.getvalue()


def oneshot_gaps(points: list[Point]) -> dict[str, dict[int, float]]:
    """Per layer and filters kept (no retraining): car's test accuracy minus car-oneshot's,
    what re-scoring after every removal buys."""
    acc = {(p.layer, p.criterion, p.kept): p.test_accuracy for p in points if not p.retrained}
    gaps: dict[str, dict[int, float]] = {}
    for (layer, criterion, kept), value in acc.items():
        if criterion == "car" and (layer, "car-oneshot", kept) in acc:
            gaps.setdefault(layer, {})[kept] = value - acc[(layer, "car-oneshot", kept)]
    return gaps


def margins(points: list[Point], kept_fraction: float, sizes: dict[str, int],
            retrained: bool = False) -> dict[str, dict]:
    """Per layer at the given keep: each criterion's test accuracy and CAR's margin over the
    best other criterion."""
    out = {}
    for layer, n in sizes.items():
        kept = max(1, math.floor(kept_fraction * n + 0.5))
        at = {p.criterion: p for p in points
              if p.layer == layer and p.kept == kept and p.retrained == retrained}
        if "car" not in at:
            continue
        others = {c: p.test_accuracy for c, p in at.items() if not c.startswith("car")}
        best = max(others, key=others.get) if others else None
        out[layer] = {"kept": kept, "accuracy": {c: p.test_accuracy for c, p in at.items()},
                      "spread": {c: [p.test_min, p.test_max] for c, p in at.items()},
                      "best_other": best,
                      "margin": at["car"].test_accuracy - others[best] if best else None}
    return out


def plot(points: list[Point], layer: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    names = list(dict.fromkeys(p.criterion for p in points if p.layer == layer))
    for name in names:
        pts = sorted((p for p in points if p.layer == layer and p.criterion == name
                      and not p.retrained), key=lambda p: p.kept)
        xs = [p.kept for p in pts]
        style = {"linewidth": 2.4, "color": "black"} if name == "car" else {"linewidth": 1.3}
        line, = ax.plot(xs, [100 * p.test_accuracy for p in pts], marker="o", markersize=3,
                        label=name, **style)
        if name == "random":
            ax.fill_between(xs, [100 * p.test_min for p in pts],
                            [100 * p.test_max for p in pts], color=line.get_color(), alpha=0.2)
        for p in points:
            if p.layer == layer and p.criterion == name and p.retrained:
                ax.errorbar([p.kept], [100 * p.test_accuracy],
                            yerr=[[100 * (p.test_accuracy - p.test_min)],
                                  [100 * (p.test_max - p.test_accuracy)]],
                            marker="*", markersize=10, color=line.get_color(), capsize=3)
    ax.set_xlabel(f"filters kept in {layer}")
    ax.set_ylabel("test accuracy (%)")
    retrained = any(p.retrained for p in points if p.layer == layer)
    ax.set_title(f"{layer}: pruning one layer by each criterion"
                 + (" (stars: after retraining)" if retrained else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
