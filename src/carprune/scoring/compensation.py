"""Least-squares compensation: when a unit goes, every consumer that reads its channel (a conv or
linear layer) is refit on the inputs it has left, so that its output over the scoring set changes
as little as possible (the reconstruction of He et al. 2017 and ThiNet, in closed form).

A consumer's inputs on the scoring set, unfolded, are a matrix X (rows: images x output
positions; columns: input channels x kernel taps) and its weight W (outputs x columns). Without
the columns I, the least-squares best weight on the rest S is

    W' = W - W_I Q_I,   Q_I = P_II^-1 P_I,   P = (X^T X + damping)^-1

(block inversion: the least-squares fit of X_I from X_S is X_S B with B = -P_SI P_II^-1), and W'
is zero on I. One inverse per consumer serves every candidate. Scoring with compensation scores
each candidate with its consumers' W'; removing applies W' before Torch-Pruning cuts the columns.
Depthwise and grouped consumers keep their weights (their other inputs cannot stand in), and so
do consumers with more than MAX_COLUMNS columns (a VGG classifier reading 7x7x512 features would
need a 5 GB Gram matrix).

The damping is a ridge relative to the Gram diagonal's mean (`RIDGE` unless the engine's options
say otherwise). X^T X is a sum over images: where the images are shared among processes, the
caller passes a `reduce` that sums a tensor over them (scoring/sharded.py); alone, `alone`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import Surgery, Unit

RIDGE = 1e-4  # added to the Gram diagonal, relative to its mean: dead or duplicate inputs
MAX_COLUMNS = 4608  # a 512-channel 3x3 conv: a 170 MB Gram matrix


def refittable(module: nn.Module) -> bool:
    """A linear layer, or a conv whose inputs `unfolded` reproduces (one group, zero padding
    given as numbers), of at most MAX_COLUMNS columns."""
    conv = isinstance(module, nn.Conv2d) and module.groups == 1 \
        and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return (conv or isinstance(module, nn.Linear)) and module.weight[0].numel() <= MAX_COLUMNS


def unfolded(consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer's input as rows of columns, in the order of its flattened weight."""
    if isinstance(consumer, nn.Linear):
        return x.reshape(-1, consumer.in_features)
    cols = F.unfold(x, consumer.kernel_size, consumer.dilation, consumer.padding,
                    consumer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def columns(consumer: nn.Module, inputs: Sequence[int]) -> list[int]:
    """Weight columns of the consumer's input indices (all kernel taps of each channel)."""
    taps = consumer.weight[0].numel() // consumer.weight.shape[1]
    return [i * taps + t for i in inputs for t in range(taps)]


def gram(consumer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """X^T X of one batch of the consumer's inputs."""
    rows = unfolded(consumer, x.float())
    return (rows.T @ rows).double()


def alone(tensor: torch.Tensor) -> None:
    """The sum of a tensor over the processes when there is one: the tensor itself."""


def inverse(xtx: torch.Tensor, ridge: float = RIDGE,
            reduce: Callable[[torch.Tensor], None] = alone) -> torch.Tensor:
    """P = (X^T X + damping)^-1, X^T X summed over every process's share of the images
    (`reduce`); the damping is `ridge` times the diagonal's mean."""
    reduce(xtx)
    damping = ridge * float(xtx.diagonal().mean()) or ridge
    xtx.diagonal().add_(damping)
    return torch.linalg.inv(xtx)


def q_rows(p: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """Q_I = P_II^-1 P_I (rows: the removed columns): W' = W - W_I Q_I, so a consumer output
    X W'^T is X W^T less (X Q_I^T) W_I^T."""
    return torch.linalg.solve(p[cols][:, cols], p[cols])


def delta(weight: torch.Tensor, p: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """W' - W for the columns `cols` removed, as a (outputs x columns) matrix."""
    w = weight.reshape(weight.shape[0], -1).double()
    return (-w[:, cols] @ q_rows(p, cols)).to(weight.dtype)


def consumers_of(surgery: Surgery, units: Sequence[Unit]) -> dict[str, list[int]]:
    """Refittable consumer -> the input indices the units feed it."""
    out: dict[str, list[int]] = {}
    for unit in units:
        for name, idxs in surgery.consumers(unit.layer, unit.channel):
            if refittable(surgery.modules[name]):
                out.setdefault(name, []).extend(idxs)
    return out


@torch.inference_mode()
def inverses(surgery: Surgery, names: Sequence[str], batches, ridge: float = RIDGE,
             reduce: Callable[[torch.Tensor], None] = alone) -> dict[str, torch.Tensor]:
    """P for each named consumer of the current network, from one pass over the batches."""
    if not names:
        return {}
    grams: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        part = gram(surgery.modules[name], x)
        grams[name] = grams[name] + part if name in grams else part

    hooks = [surgery.modules[name].register_forward_pre_hook(
        lambda m, args, name=name: add(name, args[0])) for name in names]
    try:
        for x, _ in batches:
            surgery.model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: inverse(grams[name], ridge, reduce) for name in names}


@torch.no_grad()
def _refit(surgery: Surgery, consumers: dict[str, list[int]],
           p: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give each consumer W'; returns (weight, its old values)."""
    saved = []
    for name, idxs in consumers.items():
        weight = surgery.modules[name].weight
        saved.append((weight, weight.clone()))
        weight.add_(delta(weight, p[name], columns(surgery.modules[name], idxs))
                    .view_as(weight))
    return saved


@contextlib.contextmanager
def refitted(surgery: Surgery, units: Sequence[Unit],
             p: dict[str, torch.Tensor]) -> Iterator[None]:
    """The units' consumers carry W' for the duration of the block (with the units ablated,
    the network is the compensated network without them)."""
    saved = _refit(surgery, consumers_of(surgery, units), p)
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, values in reversed(saved):
                weight.copy_(values)


def remove(surgery: Surgery, layer: str, channels: Sequence[int], batches, ridge: float = RIDGE,
           reduce: Callable[[torch.Tensor], None] = alone) -> list[int]:
    """Refit the consumers of `channels` on what is left, then remove them physically."""
    surgery.check_removal(layer, channels)
    consumers = consumers_of(surgery, [Unit(layer, c) for c in channels])
    _refit(surgery, consumers, inverses(surgery, list(consumers), batches, ridge, reduce))
    return surgery.remove(layer, channels)
