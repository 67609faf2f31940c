"""What every engine shares: the scoring set and the per-candidate tallies."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import CarpruneError
from ..layout import arranged, layout_for


@dataclass
class ScoringSet:
    """Labelled images held as a list of batches; engines reuse them at every greedy step."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    num_classes: int

    @classmethod
    def from_any(cls, data, num_classes: int | None = None,
                 batch_size: int = 64) -> ScoringSet:
        """Accepts a ScoringSet, a TensorDataset or Dataset, or any iterable of (x, y) batches."""
        if isinstance(data, ScoringSet):
            return data
        if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
            data = DataLoader(data, batch_size=batch_size)
        batches = []
        for item in data:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise CarpruneError("scoring data must yield (images, labels) batches; wrap the "
                                    "images in a TensorDataset or DataLoader with labels")
            x, y = torch.as_tensor(item[0]).float(), torch.as_tensor(item[1]).long()
            if x.ndim == 3:
                x, y = x.unsqueeze(0), y.view(1)
            batches.append((x, y))
        if not batches or sum(len(y) for _, y in batches) == 0:
            raise CarpruneError("the scoring set is empty; give at least one labelled image "
                                "(check --score-samples and the data path)")
        labels = torch.cat([y for _, y in batches])
        if labels.min() < 0:
            raise CarpruneError("the scoring labels include negative values; labels must be "
                                "class indices 0..C-1")
        k = int(labels.max()) + 1 if num_classes is None else num_classes
        if labels.max() >= k:
            raise CarpruneError(f"a scoring label is {int(labels.max())} but the model has {k} "
                                "classes; use data that matches the model")
        for x, _ in batches:
            if not bool(torch.isfinite(x).all()):
                raise CarpruneError("the scoring images hold NaN or inf values; clean the data")
        return cls(batches, k)

    @property
    def total(self) -> int:
        return sum(len(y) for _, y in self.batches)

    def labels(self) -> torch.Tensor:
        return torch.cat([y for _, y in self.batches])

    def class_totals(self) -> torch.Tensor:
        return torch.bincount(self.labels(), minlength=self.num_classes)

    def example(self) -> torch.Tensor:
        return self.batches[0][0][:1].contiguous()

    def to(self, device: torch.device) -> ScoringSet:
        """The same images and labels on `device` (where the engines then compute)."""
        return ScoringSet([(x.to(device), y.to(device)) for x, y in self.batches],
                          self.num_classes)

    def nbytes(self) -> int:
        return sum(x.nbytes + y.nbytes for x, y in self.batches)

    def subset(self, n: int) -> ScoringSet:
        """The first n images (class-balanced sets stay balanced when n is a multiple)."""
        out, left = [], n
        for x, y in self.batches:
            if left <= 0:
                break
            out.append((x[:left], y[:left]))
            left -= len(y)
        return ScoringSet(out, self.num_classes)

    def after(self, n: int) -> ScoringSet:
        """The images after the first n."""
        out, skip = [], n
        for x, y in self.batches:
            if skip < len(y):
                out.append((x[skip:], y[skip:]))
            skip = max(0, skip - len(y))
        return ScoringSet(out, self.num_classes)

    def halves(self) -> tuple[ScoringSet, ScoringSet]:
        """The first half of the images (at least one) and the rest: an odd image goes to the
        rest, and a single image is both."""
        half = self.total // 2
        return self.subset(max(1, half)), self.after(half)

    def in_layout(self, layout: torch.memory_format) -> ScoringSet:
        """The same images in the memory layout the network computes in (layout.py); the set
        itself when they are."""
        if all(x.is_contiguous(memory_format=layout) for x, _ in self.batches):
            return self
        return dataclasses.replace(self, batches=[(arranged(x, layout), y)
                                                  for x, y in self.batches])

    def classified_by(self, model: torch.nn.Module) -> ScoringSet:
        """The same images in `model`'s layout, with as many classes as it outputs (one forward
        pass of the example image); a label the model cannot predict is refused. The images
        are made outside inference mode: gradient-based criteria read them."""
        layout = layout_for(model, self.example())
        with torch.inference_mode():
            outputs = int(model(arranged(self.example(), layout)).shape[-1])
        if int(self.labels().max()) >= outputs:
            raise CarpruneError(f"a scoring label is {int(self.labels().max())} but the model "
                                f"has {outputs} classes; use data that matches the model")
        return ScoringSet(self.batches, outputs).in_layout(layout)


@dataclass
class Scores:
    """Tallies for K networks over one scoring set (row k: the network without candidate k),
    kept on the CPU whatever device computed them."""

    correct: torch.Tensor        # (K,) int64
    class_correct: torch.Tensor  # (K, C) int64
    loss: torch.Tensor           # (K,) float64, summed cross-entropy
    total: int

    @classmethod
    def zeros(cls, k: int, num_classes: int) -> Scores:
        return cls(torch.zeros(k, dtype=torch.int64),
                   torch.zeros(k, num_classes, dtype=torch.int64),
                   torch.zeros(k, dtype=torch.float64), 0)

    def add_logits(self, rows: slice | torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate logits of shape (k, B, C) for candidates `rows` on labels y (B,)."""
        k, b, c = logits.shape
        hit = (logits.argmax(-1) == y.view(1, b)).cpu()  # integer matmul is CPU-only
        self.correct[rows] += hit.sum(1)
        onehot = F.one_hot(y.cpu(), self.class_correct.shape[1]).to(torch.int64)
        self.class_correct[rows] += hit.to(torch.int64) @ onehot
        loss = F.cross_entropy(logits.reshape(k * b, c).float(), y.repeat(k), reduction="none")
        self.loss[rows] += loss.view(k, b).double().sum(1).cpu()

    def accuracy(self) -> torch.Tensor:
        return self.correct.double() / self.total

    @staticmethod
    def cat(parts: list[Scores]) -> Scores:
        return Scores(torch.cat([p.correct for p in parts]),
                      torch.cat([p.class_correct for p in parts]),
                      torch.cat([p.loss for p in parts]), parts[0].total)
