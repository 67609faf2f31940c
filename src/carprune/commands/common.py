"""What several commands share: the model door, tables, output directories, model labels."""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .. import dist, io
from ..data import load_data
from ..devices import device_of
from ..errors import CarpruneError
from ..scoring import ScoringSet


def open_model(config, model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, str]:
    """The network a command reads, and how to name it: a model given in Python, a checkpoint,
    or `--model` (with `--weights`), so that evaluate measures the very network prune gets."""
    if model is not None:
        return model, "a model given in Python"
    if config.model and config.checkpoint:
        raise CarpruneError(f"give a checkpoint ({config.checkpoint}) or --model "
                            f"({config.model}), not both")
    if config.weights and not config.model:
        raise CarpruneError("--weights goes with --model; a checkpoint directory carries its "
                            "own weights, drop --weights or give --model instead")
    if config.model:
        return io.from_factory(config.model, config.weights, config.trust_pickle), config.model
    if config.checkpoint is None:
        raise CarpruneError("give a checkpoint directory, or --model package.module:factory "
                            "(with --weights FILE)")
    return io.load(config.checkpoint), str(config.checkpoint)


def open_data(config, model: torch.nn.Module, data=None):
    """`--data` read at the model's input size (or `data` given in Python); a factory model
    records it, so that its checkpoint reloads with the same preprocessing."""
    if data is None:
        data = load_data(config.data, config.data_dir, model, config.image_size, config.workers)
    if "input_shape" not in model.carprune_spec:
        io.attach_data(model, data)
    return data


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


def model_labels(model: torch.nn.Module, dataset, data=None):
    """The same images labelled by the model's own predictions (CAR as loss of agreement).
    Images on disk are labelled through their evaluation transform, in `data`'s workers."""
    device = device_of(model)
    if isinstance(dataset, TensorDataset):
        x = dataset.tensors[0]
        with torch.inference_mode():
            preds = torch.cat([model.eval()(x[i:i + 256].to(device)).argmax(1).cpu()
                               for i in range(0, len(x), 256)])
        return TensorDataset(x, preds)
    view = dataset.eval_view() if hasattr(dataset, "eval_view") else dataset
    loader = data.loader(view) if data is not None else DataLoader(view, batch_size=256)
    with torch.inference_mode():
        preds = torch.cat([model.eval()(x.to(device)).argmax(1).cpu() for x, _ in
                           tqdm(loader, desc="label by the model", unit="batch", leave=False)])
    return Relabelled(dataset, preds.tolist())


class Relabelled(Dataset):
    """A data set's images with other labels (the model's predictions)."""

    def __init__(self, dataset: Dataset, labels: list[int]):
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.dataset[i][0], self.labels[i]

    def eval_view(self) -> Relabelled:
        inner = self.dataset
        return Relabelled(inner.eval_view(), self.labels) if hasattr(inner, "eval_view") \
            else self


def relabelled(data, model: torch.nn.Module):
    """Every split labelled by the model's predictions: accuracies then read as agreement with
    the unpruned network, and fine-tuning distils toward it."""
    with torch.inference_mode():
        classes = model.eval()(data.example(1).to(device_of(model))).shape[-1]
    return dataclasses.replace(
        data, train=model_labels(model, data.train, data),
        val=model_labels(model, data.val, data), test=model_labels(model, data.test, data),
        classes=[str(c) for c in range(classes)],
        meta={**data.meta, "unlabelled": False, "labels": "model"})


def held_in_memory(data, dataset: Dataset, memory_budget: float, device: torch.device,
                   option: str = "--score-samples") -> ScoringSet:
    """The scoring images, decoded once and held on `device`, if they fit the memory budget
    (GiB): the estimate is printed, and a set over budget is refused with how many would fit."""
    per_image = 4 * math.prod(data.input_shape) + 8
    need, budget = per_image * len(dataset), int(memory_budget * 2**30)
    where = "GPU memory" if device.type == "cuda" else "memory"
    if need > budget:
        raise CarpruneError(f"the {len(dataset)} scoring images at {data.input_shape} need "
                            f"{need / 2**30:.2f} GiB of {where}, over --memory-budget "
                            f"{memory_budget:g}; {budget // per_image} fit: lower {option} "
                            "to that or raise --memory-budget")
    if dist.is_main():
        print(f"scoring set: {len(dataset)} images of {'x'.join(map(str, data.input_shape))} "
              f"held in {where}, {need / 2**20:.0f} MiB of the {memory_budget:g} GiB budget")
    return ScoringSet.from_any(data.scoring_source(dataset), data.num_classes).to(device)
