"""Specialisation (DESIGN.md, "Specialisation"): a network narrowed to the classes a user needs.

One place turns a class subset (names or output indices) into the network's output indices and
checks it; finds the classifier, the layer whose outputs are the logits; trims it through
Torch-Pruning, so that the pruning history in model.json rebuilds the narrower head; and
restricts data to the subset's images, labelled in the trimmed head's order (the kept classes
in their original order). CAR then runs on the specialised network as on any other, so every
engine, approximation, resume and torchrun apply unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from .dependency import dependency_graph
from .errors import CarpruneError
from .groups import out_width
from .scoring import ScoringSet

LISTED = 40  # class names an error lists in full; a longer list is cut
TOLERANCE = 1e-4  # relative: the trimmed head's logits against the kept columns of the whole


def output_names(model: nn.Module, given: Sequence[str] | None = None) -> list[str] | None:
    """Names of the network's outputs: a specialised network's own, those `given` (the data's
    classes; mere numbers 0..N-1, which data without names gets, name nothing), or those of the
    data its checkpoint was trained on; None when nothing names them."""
    spec = getattr(model, "carprune_spec", {})
    if given is not None and [str(n) for n in given] == [str(i) for i in range(len(given))]:
        given = None
    names = spec.get("classes") or given or spec.get("data", {}).get("classes")
    return None if names is None else [str(n) for n in names]


def outputs_of(model: nn.Module, example: torch.Tensor) -> int:
    """The number of logits the network computes (one forward pass)."""
    with torch.inference_mode():
        return int(model.eval()(example[:1]).shape[-1])


@dataclass(frozen=True)
class ClassSubset:
    """The kept outputs of a network with `of` outputs: `indices` in the network's own order
    (the trimmed head's order) and their `names`."""

    indices: tuple[int, ...]
    names: tuple[str, ...]
    of: int

    @classmethod
    def resolve(cls, requested: Sequence[str | int], names: Sequence[str] | None,
                outputs: int) -> ClassSubset:
        """The subset `requested` names (class names, any case, or output indices), checked: each
        class known and given once, and at least two of them."""
        names = [str(n) for n in names] if names is not None else None
        if names is not None and len(names) != outputs:
            names = None  # names of another set of outputs name nothing here
        indices = [_index(item, names, outputs) for item in requested]
        twice = sorted({i for i in indices if indices.count(i) > 1})
        if twice:
            raise CarpruneError(f"class {_name(twice[0], names)!r} is given twice; name each "
                                "class once")
        if len(indices) < 2:
            raise CarpruneError(f"a specialised network needs at least two classes, got "
                                f"{len(indices)}; name two or more (one class needs no "
                                "classifier)")
        kept = tuple(sorted(indices))
        return cls(kept, tuple(_name(i, names) for i in kept), outputs)

    @property
    def renumber(self) -> torch.Tensor:
        """Original label -> label in the trimmed head's order (-1: a dropped class)."""
        table = torch.full((self.of,), -1, dtype=torch.int64)
        table[list(self.indices)] = torch.arange(len(self.indices))
        return table

    def scoring(self, scoring: ScoringSet, where: str = "the scoring set") -> ScoringSet:
        """The scoring images of the kept classes, relabelled; refused when a kept class has
        none (its accuracy, and what CAR measures of it, would be undefined)."""
        totals = torch.bincount(scoring.labels().cpu(), minlength=self.of)
        self.check_present(totals[list(self.indices)], where)
        table = self.renumber.to(scoring.batches[0][1].device)
        batches = [(x[keep], table[y[keep]]) for x, y in scoring.batches
                   for keep in [table[y] >= 0] if bool(keep.any())]
        return ScoringSet(batches, len(self.indices))

    def check_present(self, totals: torch.Tensor, where: str) -> None:
        """Every kept class has an image among `totals` (images per kept class, in order)."""
        empty = [n for n, total in zip(self.names, totals.tolist(), strict=True) if total == 0]
        if empty:
            raise CarpruneError(f"class {empty[0]!r} has no image in {where}; give more images "
                                "(--score-samples) or leave the class out")

    def dataset(self, dataset: Dataset) -> Dataset:
        """The images of `dataset` whose label is a kept class, relabelled."""
        table = self.renumber
        labels = table[labels_of(dataset)]
        positions = torch.nonzero(labels >= 0).flatten()
        if isinstance(dataset, TensorDataset):
            x, _ = dataset.tensors
            return TensorDataset(x[positions], labels[positions])
        return Restricted(dataset, positions.tolist(), labels[positions].tolist())

    def data(self, data):
        """A carprune Data with every split restricted to the kept classes."""
        return dataclasses.replace(
            data, train=self.dataset(data.train), val=self.dataset(data.val),
            test=self.dataset(data.test), classes=list(self.names),
            meta={**data.meta, "classes_of": self.of, "class_indices": list(self.indices)})

    def to_json(self) -> dict:
        return {"kept": list(self.names), "indices": list(self.indices), "of": self.of}


def _index(item: str | int, names: list[str] | None, outputs: int) -> int:
    """One requested class as an output index: a name (any case) first, then a number."""
    if isinstance(item, str) and names is not None:
        folded = [n.casefold() for n in names]
        if item.casefold() in folded:
            return folded.index(item.casefold())
    text = str(item).strip()
    if isinstance(item, int) and not isinstance(item, bool) or text.isdigit():
        index = int(text)
        if not 0 <= index < outputs:
            raise CarpruneError(f"class index {index} is out of range: the network has "
                                f"{outputs} outputs, 0 to {outputs - 1}; give an index in that "
                                "range or a class name")
        return index
    if names is None:
        raise CarpruneError(f"unknown class {item!r}: nothing names this network's {outputs} "
                            f"outputs; give output indices 0 to {outputs - 1}")
    listed = ", ".join(names[:LISTED]) + (f", ... ({len(names)} in all)"
                                          if len(names) > LISTED else "")
    raise CarpruneError(f"unknown class {item!r}; the network's classes are: {listed} (or "
                        "their indices)")


def _name(index: int, names: list[str] | None) -> str:
    return names[index] if names is not None else str(index)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every label of a data set, without decoding its images where it keeps them apart."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[list(dataset.indices)]
    for attribute in ("labels", "targets"):
        if hasattr(dataset, attribute):
            return torch.as_tensor(list(getattr(dataset, attribute)), dtype=torch.int64)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


class Restricted(Dataset):
    """Some images of a data set read from disk, with their labels renumbered."""

    def __init__(self, dataset: Dataset, positions: list[int], labels: list[int]):
        self.dataset, self.positions, self.labels = dataset, positions, labels

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.dataset[self.positions[i]][0], self.labels[i]

    def eval_view(self) -> Restricted:
        """The same images through the evaluation transform (data/folders.py)."""
        inner = self.dataset
        return Restricted(inner.eval_view(), self.positions, self.labels) \
            if hasattr(inner, "eval_view") else self


def data_for(model: nn.Module, data):
    """`data` as a specialised network reads it: where the network kept some classes of the
    data it came from (its spec's class_indices) and `data` has all of them, only the kept
    classes' images, relabelled; any other data as it is (check_fits judges it)."""
    spec = getattr(model, "carprune_spec", {})
    indices, names = spec.get("class_indices"), spec.get("classes")
    if indices is None or data.meta.get("unlabelled") or data.num_classes == len(indices):
        return data
    if max(indices) >= data.num_classes or names is not None and any(
            str(data.classes[i]).casefold() != str(n).casefold()
            for i, n in zip(indices, names, strict=True) if not str(data.classes[i]).isdigit()):
        raise CarpruneError(f"the network was specialised to {', '.join(map(str, names or []))} "
                            f"(classes {indices} of the data it came from), which {data.name}'s "
                            f"{data.num_classes} classes do not hold; use the data set it was "
                            "specialised from")
    kept = ClassSubset(tuple(indices), tuple(str(data.classes[i]) for i in indices),
                       data.num_classes)
    return kept.data(data)


def _trim(model: nn.Module, name: str, keep: Sequence[int], example: torch.Tensor) -> list:
    """Remove every output of layer `name` but `keep`, in place, through Torch-Pruning (so
    that the layers it feeds follow); returns the pruning history entries of the removal.
    Torch-Pruning traces the autograd graph, so gradients are on even inside a caller's
    no_grad (CARImportance's)."""
    with torch.enable_grad():
        dg = dependency_graph(model, example)
    module = model.get_submodule(name)
    dropped = sorted(set(range(out_width(module))) - set(keep))
    dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels,
                         dropped).prune()
    return [[n, bool(out), [int(i) for i in idx]] for n, out, idx in dg.pruning_history()]


def trimmed(model: nn.Module, subset: ClassSubset,
            example: torch.Tensor) -> tuple[str, nn.Module, list]:
    """The classifier's name, a copy of the network with it trimmed to the subset, and the
    trim's pruning history. The classifier is the conv or linear layer (the last such, in the
    network's own order) with as many outputs as the logits whose trim through Torch-Pruning
    leaves exactly the kept logits of the whole network, checked by one forward pass."""
    model = model.eval()
    with torch.inference_mode():
        whole = model(example)[:, list(subset.indices)]
    candidates = [n for n, m in reversed(list(model.named_modules()))
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and out_width(m) == subset.of]
    for name in candidates:
        narrow = copy.deepcopy(model)
        try:
            trim = _trim(narrow, name, subset.indices, example)
        except Exception:  # noqa: BLE001 - Torch-Pruning raises many kinds: not this layer
            continue
        with torch.inference_mode():
            got = narrow.eval()(example)
        scale = float(whole.abs().max()) or 1.0
        if got.shape == whole.shape and torch.allclose(got, whole, rtol=TOLERANCE,
                                                       atol=TOLERANCE * scale):
            return name, narrow, trim
    raise CarpruneError(f"cannot find or trim this network's classifier: no conv or linear "
                        f"layer with its {subset.of} outputs gives its logits alone when "
                        "trimmed (a softmax or another layer after it?); specialise a network "
                        "that ends in its classifier")


def specialise(model: nn.Module, classes: Sequence[str | int], example: torch.Tensor,
               names: Sequence[str] | None = None) -> nn.Module:
    """A copy of `model` specialised to `classes` (names, any case, or output indices; `names`
    names the outputs where the model's spec does not), at the input `example`: its
    classifier computes their logits only, in the network's order (trim_head)."""
    subset = ClassSubset.resolve(classes, output_names(model, names), outputs_of(model, example))
    return trim_head(model, subset, example)


def trim_head(model: nn.Module, subset: ClassSubset, example: torch.Tensor) -> nn.Module:
    """A copy of `model` whose classifier computes the subset's logits only: a K-class network
    whose MACs and parameters say so. Its spec records the trim (load() rebuilds it), the kept
    class names and their indices among the first network's outputs."""
    name, narrow, trim = trimmed(model, subset, example)
    spec = dict(getattr(model, "carprune_spec", {}))
    before = spec.get("class_indices")
    spec.update(pruning_history=[*spec.get("pruning_history", []), *trim],
                classes=list(subset.names), classifier=name,
                class_indices=[before[i] for i in subset.indices] if before
                else list(subset.indices))
    narrow.carprune_spec = spec
    return narrow


def specialised(model: nn.Module, data, requested: Sequence[str | int]
                ) -> tuple[nn.Module, ScoringSet]:
    """The Python API's door (car_prune, global_car_prune): the network specialised to the
    `requested` classes and the scoring set `data` restricted to their images."""
    scoring = ScoringSet.from_any(data)
    example = scoring.example()
    subset = ClassSubset.resolve(requested, output_names(model, getattr(data, "classes", None)),
                                 outputs_of(model, example))
    restricted = subset.scoring(scoring.classified_by(model))
    return trim_head(model, subset, example), restricted


@contextlib.contextmanager
def narrowed(layer: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """The classifier `layer` computing the outputs `keep` only, for the duration of the block:
    the trimmed head's very function (the same rows of its weight and bias) on the network
    itself, so that any engine scores a class subset on an untrimmed network (CARImportance)."""
    attribute = "out_features" if isinstance(layer, nn.Linear) else "out_channels"
    saved = {n: getattr(layer, n) for n in ("weight", "bias")}
    width = getattr(layer, attribute)
    try:
        for n, p in saved.items():
            if p is not None:
                rows = torch.tensor(list(keep), device=p.device)
                setattr(layer, n, nn.Parameter(p.detach()[rows], requires_grad=False))
        setattr(layer, attribute, len(keep))
        yield
    finally:
        for n, p in saved.items():
            setattr(layer, n, p)
        setattr(layer, attribute, width)
