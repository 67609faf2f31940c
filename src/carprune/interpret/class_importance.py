"""Class-specific CAR: which classes need each filter (Abbasi-Asl & Yu, class-specific CAR).

Entry (f, c) of the matrix is the accuracy on the images of class c with filter f minus the
accuracy on them without it, as fractions: positive means class c needs the filter. It comes
from the same engine pass as the CAR index (the engines count correct images per class), so the
class-count-weighted mean of a row is exactly the filter's CAR index.
"""

from __future__ import annotations

import copy
import csv
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Data
from ..devices import device_of
from ..errors import CarpruneError
from ..groups import Surgery, Unit
from ..scoring import EngineOptions, ScoringSet, make_engine
from ..scoring.rule import rank


@dataclass
class ClassImportance:
    """Filters x classes accuracy reduction of one layer, plus each filter's CAR index.

    Filter numbers are channel positions in the model that was scored. Classes without images in
    the scoring set have NaN columns (their accuracy is undefined) and are never ranked.
    """

    layer: str
    classes: list[str]
    matrix: np.ndarray          # (F, C) class accuracy with minus without the filter
    car: np.ndarray             # (F,) overall accuracy with minus without the filter
    base_accuracy: float
    class_accuracy: np.ndarray  # (C,) the unpruned network's accuracy per class
    class_totals: np.ndarray    # (C,) scoring images per class
    removal_order: list[int]    # filters in the order one-shot CAR would remove them
    engine: str

    @property
    def num_filters(self) -> int:
        return self.matrix.shape[0]

    def _ranked(self, f: int, k: int, descending: bool) -> list[tuple[str, float]]:
        row = self.matrix[f]
        present = [c for c in range(len(self.classes)) if not math.isnan(row[c])]
        order = sorted(present, key=lambda c: (-row[c] if descending else row[c],
                                               -self.class_totals[c], c))
        return [(self.classes[c], float(row[c])) for c in order[:k]]

    def most(self, f: int, k: int = 3) -> list[tuple[str, float]]:
        """The k classes that lose the most accuracy without filter f (ties: the class with
        more scoring images, where the share stands on more evidence; then lower class id)."""
        return self._ranked(f, k, descending=True)

    def least(self, f: int, k: int = 3) -> list[tuple[str, float]]:
        """The k classes that lose the least (or gain the most) without filter f (ties as in
        `most`)."""
        return self._ranked(f, k, descending=False)

    def to_json(self, k: int = 3) -> dict:
        def cell(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {
            "layer": self.layer, "engine": self.engine, "classes": self.classes,
            "base_accuracy": self.base_accuracy,
            "class_accuracy": [cell(v) for v in self.class_accuracy],
            "class_totals": [int(n) for n in self.class_totals],
            "removal_order": self.removal_order,
            "filters": [{"filter": f, "car": float(self.car[f]),
                         "most": [{"class": c, "value": v} for c, v in self.most(f, k)],
                         "least": [{"class": c, "value": v} for c, v in self.least(f, k)],
                         "row": [cell(v) for v in self.matrix[f]]}
                        for f in range(self.num_filters)],
        }

    def to_csv(self) -> str:
        """Header `filter,<class names>`; one row per filter; exact floats, empty for NaN."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["filter", *self.classes])
        for f, row in enumerate(self.matrix):
            writer.writerow([f, *("" if math.isnan(v) else repr(float(v)) for v in row)])
        return buf.getvalue()


def class_names(model: nn.Module, num_classes: int, data=None,
                classes: list[str] | None = None) -> list[str]:
    """Names from the caller, the data, or the checkpoint's spec, in that order of preference."""
    spec_classes = getattr(model, "carprune_spec", {}).get("data", {}).get("classes")
    names = classes or getattr(data, "classes", None) or spec_classes
    if names is None:
        return [f"class {c}" for c in range(num_classes)]
    if len(names) != num_classes:
        raise CarpruneError(f"{len(names)} class names were given but the model predicts "
                            f"{num_classes} classes; pass one name per output")
    return [str(n) for n in names]


def class_importance(model: nn.Module, data, layer: str, engine: str = "fast",
                     num_classes: int | None = None, classes: list[str] | None = None,
                     progress: bool = True,
                     device: torch.device | None = None) -> ClassImportance:
    """Class-specific CAR of every filter of `layer`, from one pass of the scoring engine, on
    `device` (default: the model's).

    data: a carprune Data (its val split is scored), a ScoringSet, a TensorDataset or a
    DataLoader of (images, labels). The model is not modified.
    """
    dataset = data.val if isinstance(data, Data) else data
    device = device or device_of(model)
    probe = ScoringSet.from_any(dataset, num_classes).to(device)
    on_device = model if device_of(model) == device else copy.deepcopy(model).to(device)
    surgery = Surgery(on_device, probe.example())
    surgery.check_layer(layer)
    scoring = probe.classified_by(surgery.model)
    if num_classes is not None and num_classes != scoring.num_classes:
        raise CarpruneError(f"num_classes is {num_classes} but the model predicts "
                            f"{scoring.num_classes} classes; leave num_classes out or match "
                            "the model")
    names = class_names(model, scoring.num_classes, data, classes)
    units = [Unit(layer, c) for c in range(surgery.size(layer))]
    with tqdm(total=len(units), desc=f"class CAR {layer}", unit="filter",
              disable=not progress) as bar:
        base, scores = make_engine(EngineOptions(engine)).score(surgery, units, scoring,
                                                                 bar.update)
    totals = scoring.class_totals()
    lost = base.class_correct - scores.class_correct  # (F, C) images lost without each filter
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0: a class with no images
        matrix = lost.double().numpy() / totals.double().numpy()
        base_class = base.class_correct[0].double().numpy() / totals.double().numpy()
    return ClassImportance(
        layer=layer, classes=names, matrix=matrix,
        car=((base.correct - scores.correct).double() / scoring.total).numpy(),
        base_accuracy=float(base.accuracy()[0]), class_accuracy=base_class,
        class_totals=totals.numpy(),
        removal_order=rank(base, scores, list(range(len(units)))), engine=engine)
