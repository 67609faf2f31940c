"""What several commands share: tables, output directories, first-N images, model labels."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from ..errors import CarpruneError


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def command_line() -> str:
    return "carprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def refuse_existing_output(out: str) -> None:
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CarpruneError(f"output directory {out} already exists and is not empty; choose "
                            "another --out or remove it")


def first_images(dataset, n: int | None, option: str):
    """The first n images of a split (our splits are in random order, val class-balanced), or
    all of them; `option` names the flag in the error."""
    if n is None:
        return dataset
    if n <= 0:
        raise CarpruneError(f"{option} must be positive, got {n}")
    return torch.utils.data.TensorDataset(*[t[:n] for t in dataset.tensors])


def model_labels(model: torch.nn.Module, dataset):
    """The same images labelled by the model's own predictions (CAR as loss of agreement)."""
    with torch.inference_mode():
        x = dataset.tensors[0]
        preds = torch.cat([model.eval()(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return torch.utils.data.TensorDataset(x, preds)


def relabelled(data, model: torch.nn.Module):
    """Every split labelled by the model's predictions: accuracies then read as agreement with
    the unpruned network, and fine-tuning distils toward it."""
    with torch.inference_mode():
        classes = model.eval()(data.val.tensors[0][:1]).shape[-1]
    return dataclasses.replace(
        data, train=model_labels(model, data.train), val=model_labels(model, data.val),
        test=model_labels(model, data.test), classes=[str(c) for c in range(classes)],
        meta={**data.meta, "unlabelled": False, "labels": "model"})
