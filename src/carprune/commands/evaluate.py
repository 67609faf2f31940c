"""`carprune evaluate`: overall and per-class accuracy of a checkpoint."""

from __future__ import annotations

from .. import io
from ..config import EvaluateConfig
from ..data import check_fits, load_data
from ..train import evaluate
from .common import table


def run(config: EvaluateConfig) -> dict:
    model = io.load(config.checkpoint)
    data = load_data(config.data, config.data_dir)
    check_fits(model, data)
    result = evaluate(model, getattr(data, config.split), data.num_classes)
    rows = [[name, f"{acc:.4f}"] for name, acc in zip(data.classes, result.per_class,
                                                       strict=True)]
    print(table(rows, ["class", f"{config.split} accuracy"]))
    print(f"{config.split} accuracy: {result.accuracy:.4f} ({result.correct}/{result.total})")
    summary = {"checkpoint": str(config.checkpoint), "split": config.split,
               "accuracy": result.accuracy, "loss": result.loss,
               "per_class": dict(zip(data.classes, result.per_class, strict=True))}
    if config.json:
        io.write_json(config.json, summary)
    return summary
