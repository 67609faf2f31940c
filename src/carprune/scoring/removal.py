"""Does scoring a unit equal removing it? The check the tests and the support matrix
(benchmarks/model_support.py) run on any network: the network as an engine scores it without
a unit, against a copy with the unit physically removed (docs/engine.md, "Scoring equals
removal")."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ..groups import Surgery, Unit
from . import make_engine
from .engine import EngineOptions
from .sets import ScoringSet


@dataclass(frozen=True)
class Gap:
    """How far scoring is from removal: the largest difference of the ablated network's logits
    (naive engine) from the pruned one's, relative to the largest logit; the largest difference
    of an image's loss as the engine scores it from the pruned network's loss of it, relative
    to the larger of that loss and the image's largest logit (cross-entropy moves at most twice
    as far as the logits: a loss near zero does not turn the logits' rounding into a gap, nor
    tiny logits the loss's); whether it says each image is right exactly when the pruned
    network is."""

    logits: float
    loss: float
    correct: bool


def removal_gap(model: nn.Module, layer: str, unit: int, images: torch.Tensor,
                engine: str = "fast") -> Gap:
    """Score unit `unit` of `layer` on each of `images` alone (labelled by the network's own
    predictions) with `engine`, and compare with a copy of `model` without the unit."""
    surgery = Surgery(model, images[:1])
    pruned = Surgery(model, images[:1])
    pruned.remove(layer, [unit])
    with torch.inference_mode():
        return _gap(surgery, pruned, layer, unit, images.contiguous(
            memory_format=surgery.layout), engine)


def _gap(surgery: Surgery, pruned: Surgery, layer: str, unit: int, x: torch.Tensor,
         engine: str) -> Gap:
    labels = surgery.model(x).argmax(1)
    removed = pruned.model(x.contiguous(memory_format=pruned.layout))
    with surgery.ablated([Unit(layer, unit)]):
        ablated = surgery.model(x)
    logits = float((ablated - removed).abs().max() / removed.abs().max())
    scorer = make_engine(EngineOptions(engine=engine))
    loss, correct = 0.0, True
    for i in range(len(x)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one image: a single class
            scoring = ScoringSet.from_any(TensorDataset(x[i:i + 1], labels[i:i + 1]),
                                          removed.shape[1])
        _, scores = scorer.score(surgery, [Unit(layer, unit)], scoring)
        truth = F.cross_entropy(removed[i:i + 1], labels[i:i + 1], reduction="sum")
        scale = torch.maximum(truth.abs(), removed[i].abs().max()).clamp_min(1e-12)
        loss = max(loss, float((scores.loss[0] - truth).abs() / scale))
        correct &= int(scores.correct[0]) == int(removed[i].argmax() == labels[i])
    return Gap(logits, loss, correct)
