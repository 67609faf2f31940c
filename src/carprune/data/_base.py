"""The shape every data source takes: three splits (train fits, val scores, test reports)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..devices import device_of
from ..errors import CarpruneError

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class Data:
    """A classification data set split three ways: train (fit), val (scoring), test (report).

    In-memory splits are TensorDatasets; image folders and the user's factories give Datasets
    that read from disk, through DataLoaders with `workers` processes."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict = field(default_factory=dict)
    preprocess: dict | None = None  # how files become tensors (data/folders.py), if they do
    workers: int = 0
    augment: bool = True  # False: the training split applies its own random transform

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.preprocess:
            return (3, self.preprocess["size"], self.preprocess["size"])
        return tuple(self.example(1).shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def example(self, n: int = 1) -> torch.Tensor:
        """The first n validation images, as one batch."""
        if isinstance(self.val, TensorDataset):
            return self.val.tensors[0][:n]
        return torch.stack([self.val[i][0] for i in range(min(n, len(self.val)))])

    def loader(self, dataset: Dataset, batch_size: int = 256) -> DataLoader:
        """Batches of `dataset` in order, read by this data set's worker processes."""
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.workers)

    def scoring_source(self, dataset: Dataset):
        """What `ScoringSet.from_any` reads a scoring subset from: in-memory tensors as they
        are, files through this data set's workers."""
        return dataset if isinstance(dataset, TensorDataset) else self.loader(dataset, 64)

    def describe(self) -> dict:
        return {"name": self.name, "classes": self.classes, "mean": list(self.mean),
                "std": list(self.std), "input_shape": list(self.input_shape),
                **({"preprocess": self.preprocess} if self.preprocess else {})}


def first_images(dataset: Dataset, n: int | None, option: str) -> Dataset:
    """The first n images of a split (our splits are in random order, val class-balanced), or
    all of them; `option` names the flag in the error."""
    if n is None:
        return dataset
    if n <= 0:
        raise CarpruneError(f"{option} must be positive, got {n}")
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*[t[:n] for t in dataset.tensors])
    return Subset(dataset, range(min(n, len(dataset))))


def normalise(images: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> normalised float32 (N, C, H, W)."""
    x = torch.tensor(np.asarray(images)).float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def balanced_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out) with `per_class` images of each class held out, reproducibly."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise CarpruneError(f"class {c} has only {len(members)} images, too few to hold out "
                                f"{per_class} for scoring; use more data or a smaller val split")
        held.append(rng.choice(members, size=per_class, replace=False))
    held_idx = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(labels)), held_idx)
    return rest, held_idx


def data_root(data_dir: str | os.PathLike | None, default: Path) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get("CARPRUNE_DATA"):
        return Path(os.environ["CARPRUNE_DATA"])
    return default


def check_fits(model: nn.Module, data: Data) -> None:
    """Refuse data whose image shape or class count does not match the model."""
    shape = getattr(model, "carprune_spec", {}).get("input_shape")
    if shape and list(data.input_shape) != list(shape):
        raise CarpruneError(f"the data's images are {list(data.input_shape)} but the model "
                            f"takes {shape}; use the data set the model was trained on")
    with torch.inference_mode():
        out = model.eval()(data.example(2).to(device_of(model)))
    if out.shape[-1] != data.num_classes and not data.meta.get("unlabelled"):
        raise CarpruneError(f"the model predicts {out.shape[-1]} classes but the data has "
                            f"{data.num_classes}; use the data set the model was trained on")
