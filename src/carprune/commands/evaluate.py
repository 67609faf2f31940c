"""`carprune evaluate`: overall and per-class accuracy of a checkpoint, or of a factory's network
with its weights (prune's own door); on images without labels, which classes it predicts."""

from __future__ import annotations

from collections import Counter

from .. import io
from ..classes import data_for
from ..config import EvaluateConfig
from ..data import check_fits
from ..devices import resolve_device
from ..train import evaluate
from .common import model_labels, open_data, open_model, table


def run(config: EvaluateConfig) -> dict:
    """Images of an image folder are read with the preprocessing the model was pruned with (a
    factory's network, with no such record: at --image-size). A network specialised to some
    classes is evaluated on their images of data that has all of them."""
    model, source = open_model(config)
    data = data_for(model, open_data(config, model))
    model.to(resolve_device(config.device))
    check_fits(model, data)
    split = getattr(data, config.split)
    summary = {"checkpoint": source, "split": config.split,
               "preprocess": data.preprocess, "device": config.device}
    if data.meta.get("unlabelled"):
        summary.update(_predictions(model, split, data, config.split))
    else:
        result = evaluate(model, split, data.num_classes, workers=data.workers)
        rows = [[name, f"{acc:.4f}"] for name, acc in zip(data.classes, result.per_class,
                                                           strict=True)]
        print(table(rows, ["class", f"{config.split} accuracy"]))
        print(f"{config.split} accuracy: {result.accuracy:.4f} "
              f"({result.correct}/{result.total})")
        summary.update(accuracy=result.accuracy, loss=result.loss,
                       per_class=dict(zip(data.classes, result.per_class, strict=True)))
    if config.json:
        io.write_json(config.json, summary)
    return summary


def _predictions(model, split, data, name: str) -> dict:
    """No labels, so no accuracy: how many images the model puts in each class."""
    counts = Counter(model_labels(model, split, data).labels)
    print(table([[c, n] for c, n in counts.most_common(10)], ["predicted class", "images"]))
    print(f"{name}: {len(split)} images without labels, so no accuracy; the classes the model "
          f"predicts most are above ({len(counts)} classes in all)")
    return {"accuracy": None, "predicted": {str(c): n for c, n in counts.most_common()}}
