"""Filter-importance criteria behind one interface, so every criterion ranks the same units of
the same layer and pruning by any of them goes through the same removal path (`groups.py`).

Where Torch-Pruning has the criterion we use its class: magnitude (`l1`, `l2`:
`GroupMagnitudeImportance`), first-order Taylor (`taylor`: `GroupTaylorImportance`, Molchanov
et al.), geometric median (`fpgm`: `FPGMImportance`) and `random` (`RandomImportance`). The
activation statistics `mean-activation` and `apoz` (average percentage of zeros, Hu et al.) are
measured here on the channel as its consumer reads it. CAR itself lives in `car/` (greedy)
and here as `car-oneshot` (the ranking rule on one scoring pass). `criterion_prune` prunes by
any of them.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .car.records import LayerRecord, PruneResult
from .car.run import check_layers, open_surgery, record_history
from .car.settings import resolve_keep
from .classes import ClassSubset, narrowed, output_names, outputs_of, trimmed
from .errors import CarpruneError
from .groups import Surgery, Unit
from .scoring import EngineOptions, ScoringSet, make_engine
from .scoring.rule import importance as car_importance

CRITERIA = ["car", "car-oneshot", "l1", "l2", "taylor", "fpgm", "mean-activation", "apoz",
            "random"]


def _per_unit(surgery: Surgery, layer: str, importance: tp.importance.Importance
              ) -> torch.Tensor:
    """A Torch-Pruning importance of the layer's whole group, per unit: the mean over the
    unit's channels (one of each channel group), as Torch-Pruning's pruners average it."""
    scores = importance(surgery.group(layer, range(surgery.width(layer))))
    return scores.view(surgery.channel_groups(layer), -1).mean(0)


def _tp_scores(importance: tp.importance.Importance) -> Callable:
    def scores(surgery: Surgery, layer: str, scoring: ScoringSet, seed: int) -> torch.Tensor:
        return _per_unit(surgery, layer, importance)
    return scores


def _taylor(surgery: Surgery, layer: str, scoring: ScoringSet, seed: int) -> torch.Tensor:
    model = surgery.model
    model.zero_grad(set_to_none=True)
    for x, y in scoring.batches:
        F.cross_entropy(model(x), y, reduction="sum").div(scoring.total).backward()
    scores = _per_unit(surgery, layer, tp.importance.GroupTaylorImportance(
        group_reduction="first", normalizer=None))
    model.zero_grad(set_to_none=True)
    return scores


def _random(surgery: Surgery, layer: str, scoring: ScoringSet, seed: int) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _per_unit(surgery, layer, tp.importance.RandomImportance())


def _activation_stats(surgery: Surgery, layer: str, scoring: ScoringSet):
    """Per unit: mean activation and share of zeros, as the unit's first consumer reads its
    channels (after the layer's BatchNorm, ReLU and pooling; a Linear reads them in the last
    dimension)."""
    consumer, _ = surgery.consumers(layer, 0)[0]
    last = isinstance(surgery.modules[consumer], nn.Linear)
    feeds = [surgery.consumers(layer, c)[0][1] for c in range(surgery.size(layer))]
    sums = zeros = count = None

    def hook(module, inputs):
        nonlocal sums, zeros, count
        x = inputs[0].detach()
        per_index = x.reshape(-1, x.shape[-1]).T if last else x.transpose(0, 1).reshape(
            x.shape[1], -1)
        s, z = per_index.double().sum(1), (per_index == 0).double().sum(1)
        sums, zeros = (s, z) if sums is None else (sums + s, zeros + z)
        count = per_index.shape[1] + (count or 0)

    handle = surgery.modules[consumer].register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for x, _ in scoring.batches:
                surgery.model(x)
    finally:
        handle.remove()
    mean = torch.stack([sums[f].sum() / (count * len(f)) for f in feeds])
    apoz = torch.stack([zeros[f].sum() / (count * len(f)) for f in feeds])
    return mean, apoz


def _mean_activation(surgery, layer, scoring, seed) -> torch.Tensor:
    return _activation_stats(surgery, layer, scoring)[0]


def _apoz(surgery, layer, scoring, seed) -> torch.Tensor:
    return 1.0 - _activation_stats(surgery, layer, scoring)[1]


def _car_oneshot(surgery, layer, scoring, seed) -> torch.Tensor:
    """Images lost without each filter, from one scoring pass, ordered by the ranking rule (a
    filter whose removal costs less is less important)."""
    units = [Unit(layer, c) for c in range(surgery.size(layer))]
    base, scores = make_engine().score(surgery, units, scoring)
    return car_importance(base, scores, surgery.alive[layer])


_SCORES = {
    "car-oneshot": _car_oneshot,
    "l1": _tp_scores(tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first",
                                                            normalizer=None)),
    "l2": _tp_scores(tp.importance.GroupMagnitudeImportance(p=2, group_reduction="first",
                                                            normalizer=None)),
    "taylor": _taylor,
    "fpgm": _tp_scores(tp.importance.FPGMImportance(p=2, group_reduction="first",
                                                    normalizer=None)),
    "mean-activation": _mean_activation,
    "apoz": _apoz,
    "random": _random,
}


def importance(criterion: str, surgery: Surgery, layer: str, scoring: ScoringSet,
               seed: int = 0) -> torch.Tensor:
    """One score per current unit of `layer`; higher means more important."""
    if criterion not in _SCORES:
        raise CarpruneError(f"unknown criterion {criterion!r}; choose from "
                            f"{', '.join(CRITERIA)}")
    scoring = scoring.in_layout(surgery.layout)
    return _SCORES[criterion](surgery, layer, scoring, seed).detach().double().flatten()


def ranking(criterion: str, surgery: Surgery, layer: str, scoring: ScoringSet,
            seed: int = 0) -> list[int]:
    """Current unit positions, least important first (ties: lower original index)."""
    scores = importance(criterion, surgery, layer, scoring, seed).tolist()
    alive = surgery.alive[layer]
    return sorted(range(len(scores)), key=lambda i: (scores[i], alive[i]))


class CARImportance(tp.importance.Importance):
    """CAR as a Torch-Pruning importance, for `tp.pruner.BasePruner(..., importance=...)`.

    A channel's importance is the scoring images lost without it, ordered by the ranking rule
    (scoring/rule.py), so Torch-Pruning removes first what costs least. `data`: any iterable
    of (images, labels) batches, a DataLoader or a TensorDataset. Groups rooted at anything but
    a prunable conv or linear layer get None (Torch-Pruning then leaves them alone). A unit of
    several channels (docs/engine.md, "Units") gives each of them its importance, which
    Torch-Pruning's per-group mean returns.

    classes: score the accuracy on these classes only (names or output indices, classes.py),
    on their images, reading their logits only: the classifier is narrowed to them while a
    group is scored and restored after, so the network keeps its head and every engine gives
    what it gives on the trimmed network.
    """

    def __init__(self, data, num_classes: int | None = None, engine: str = "fast",
                 classes: Sequence[str | int] | None = None):
        self.scoring = ScoringSet.from_any(data, num_classes)
        self.engine = engine
        self.classes, self.names = classes, getattr(data, "classes", None)
        self._task: tuple[str, ClassSubset, ScoringSet] | None = None
        self._prunable: tuple[weakref.ref, set[str]] | None = None  # (the model, its layers)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        root = group[0].dep.target.module
        if not isinstance(root, (nn.Conv2d, nn.Linear)):
            return None
        surgery = Surgery.adopt(group._DG, self.scoring.example())
        name = surgery.names[root]
        if self._prunable is None or self._prunable[0]() is not surgery.model:
            self._prunable = weakref.ref(surgery.model), set(surgery.prunable_layers())
        if name not in self._prunable[1]:
            return None
        size = surgery.size(name)
        channels = [int(i) for i in group[0].root_idxs]
        positions = sorted({c % size for c in channels})  # a unit: one channel of each group
        units = [Unit(name, u) for u in positions]
        scoring, head = self.scoring, contextlib.nullcontext()
        if self.classes is not None:
            classifier, subset, scoring = self._subset(surgery.model)
            head = narrowed(surgery.model.get_submodule(classifier), subset.indices)
        with head:
            base, scores = make_engine(EngineOptions(engine=self.engine)).score(
                surgery, units, scoring)
        per_unit = car_importance(base, scores, positions)
        return per_unit[[positions.index(c % size) for c in channels]]

    def _subset(self, model: nn.Module) -> tuple[str, ClassSubset, ScoringSet]:
        """The classifier, the class subset and its scoring images, found at the first call."""
        if self._task is None:
            example = self.scoring.example()
            subset = ClassSubset.resolve(self.classes, output_names(model, self.names),
                                         outputs_of(model, example))
            self._task = (trimmed(model, subset, example)[0], subset,
                          subset.scoring(self.scoring.classified_by(model)))
        return self._task


def criterion_prune(model: nn.Module, data, layers: Sequence[str], criterion: str,
                    keep: float = 0.5, seed: int = 0) -> PruneResult:
    """Prune a copy of `model` by any criterion but greedy CAR: rank once per layer, remove
    the lowest."""
    start = time.perf_counter()
    scoring, surgery = open_surgery(model, data)
    check_layers(surgery, layers)
    targets = {name: resolve_keep(keep, surgery.size(name), name) for name in layers}
    records = {}
    for name in layers:
        n = surgery.size(name)
        doomed = ranking(criterion, surgery, name, scoring, seed)[:n - targets[name]]
        records[name] = LayerRecord(n, targets[name], [surgery.alive[name][p] for p in doomed])
        surgery.remove(name, doomed)
    record_history(surgery)
    return PruneResult(surgery.model, records, float("nan"), float("nan"),
                       time.perf_counter() - start, criterion)
