"""Colour and diversity indices: is a filter about colour or about shape, and how varied is a
filter bank. The paper reports that most of the first filters CAR removes are colour filters
and that CAR keeps the filter bank diverse; these numbers let a user check both claims."""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from .pictures import activation_model, png

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B in grey
WEIGHT_THRESHOLD = 0.5
ACTIVATION_THRESHOLD = 0.2


def colour_selectivity(weight: torch.Tensor) -> np.ndarray | None:
    """Per filter of a layer that reads RGB, the share of its energy not shared by R, G and B:

        s = 1 - ||m||^2 / ||w||^2,  m = w's mean over the 3 input channels, broadcast to all 3.

    0: the same weights on R, G and B (a grey, shape filter); 2/3: one channel only (a pure-red
    filter); 1: the channels cancel (colour-opponent, R = -G). A filter counts as a colour
    filter above WEIGHT_THRESHOLD (0.5). None when the layer does not read 3 channels: on grey
    images the index does not apply.
    """
    w = weight.detach().double().cpu()
    if w.ndim != 4 or w.shape[1] != 3:
        return None
    energy = w.pow(2).sum((1, 2, 3))
    shared = 3 * w.mean(1).pow(2).sum((1, 2))
    return torch.where(energy > 0, 1 - shared / energy.clamp_min(1e-300), 0.0).numpy()


def grey_version(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """The images with their colour removed (luma in R, G and B), in the same normalisation."""
    m = torch.tensor(mean if mean is not None else (0.0,) * 3).view(1, 3, 1, 1)
    s = torch.tensor(std if std is not None else (1.0,) * 3).view(1, 3, 1, 1)
    pixels = images * s + m
    luma = (pixels * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (luma.expand(-1, 3, -1, -1) - m) / s


@torch.inference_mode()
def activation_colour_index(model: nn.Module, images: torch.Tensor, layer: str, mean=None,
                            std=None, batch_size: int = 256) -> np.ndarray | None:
    """Per filter of any layer, how much its response changes when the colour is taken out:

        a = sum_n |r(x_n) - r(g(x_n))| / sum_n (|r(x_n)| + |r(g(x_n))|)   in [0, 1],

    r the spatial mean of the filter's activation (after its norm and nonlinearity), g the grey
    version of an image. 0: colour-blind; 1: it answers colour or grey images only. A filter
    counts as colour-selective above ACTIVATION_THRESHOLD (0.2: its response moves by a third).
    None for images that are not RGB.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        return None
    cut = activation_model(model, layer)
    change = sizes = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        colour = cut(x).double().mean((2, 3))
        grey = cut(grey_version(x, mean, std)).double().mean((2, 3))
        change = change + (colour - grey).abs().sum(0)
        sizes = sizes + colour.abs().sum(0) + grey.abs().sum(0)
    return torch.where(sizes > 0, change / sizes.clamp_min(1e-300), 0.0).numpy()


def colour_of_pruned(index: np.ndarray, order: list[int], threshold: float,
                     first: int = 20) -> dict:
    """How many of the first `first` filters in CAR's removal order are colour filters, against
    the share of colour filters in the whole layer (the paper: 17 of 20 in AlexNet's conv1)."""
    head = list(order[:first])
    selective = np.asarray(index) > threshold
    return {"threshold": threshold, "first": len(head),
            "colour_in_first": int(selective[head].sum()),
            "share_in_first": float(selective[head].mean()) if head else 0.0,
            "colour_in_layer": int(selective.sum()), "layer_share": float(selective.mean())}


def colour_figure(index: np.ndarray, order: list[int], threshold: float, layer: str,
                  what: str, first: int = 20) -> bytes:
    """The index of every filter in CAR's removal order, the first `first` shaded."""
    values = np.asarray(index)[order]
    fig = Figure(figsize=(max(5.0, 0.14 * len(order) + 1.5), 3.2))
    ax = fig.add_subplot()
    ax.bar(range(len(order)), values, color=["tab:red" if v > threshold else "tab:gray"
                                             for v in values])
    ax.axhline(threshold, color="black", lw=0.8, ls="--", label=f"threshold {threshold}")
    ax.axvspan(-0.5, min(first, len(order)) - 0.5, color="gold", alpha=0.2,
               label=f"first {min(first, len(order))} removed")
    ax.set_xlabel("filters in CAR removal order")
    ax.set_ylabel(what)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"{layer}: colour filters (red) among those CAR removes first", fontsize=10)
    return png(fig)


# -- diversity -----------------------------------------------------------------------------

def diversity(weight: torch.Tensor) -> dict[str, float]:
    """Two numbers for a filter bank, on the flattened filters scaled to unit length:

    - mean pairwise cosine distance, mean over pairs of 1 - cos(w_i, w_j): 0 when all filters
      are the same, 1 when they are orthogonal;
    - effective rank (Roy & Vetterli 2007), exp of the entropy of the singular values divided by
      their sum: 1 for one repeated filter, n for n orthogonal ones.
    A single filter has no pairs: its distance is 0.
    """
    w = weight.detach().double().cpu().reshape(weight.shape[0], -1)
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    n = unit.shape[0]
    pairs = torch.triu_indices(n, n, 1)
    distance = float((1 - (unit @ unit.T)[pairs[0], pairs[1]]).mean()) if n > 1 else 0.0
    s = torch.linalg.svdvals(unit)
    p = s[s > s.max() * 1e-12] / s.sum() if float(s.max()) > 0 else s[:0]
    rank = math.exp(float(-(p * p.log()).sum())) if len(p) else 0.0
    return {"filters": n, "mean_cosine_distance": distance, "effective_rank": rank}


def diversity_comparison(weight: torch.Tensor, car_removed: list[int], seed: int = 0,
                         draws: int = 10) -> dict[str, dict[str, float]]:
    """Diversity of the layer, of the filters CAR keeps, and of as many kept by the L1 norm
    (smallest removed) and at random (the mean over `draws` seeded draws)."""
    n, removed = weight.shape[0], len(car_removed)
    l1 = weight.detach().abs().reshape(n, -1).sum(1)

    def kept(gone) -> list[int]:
        gone = {int(i) for i in gone}
        return [f for f in range(n) if f not in gone]

    rng = np.random.default_rng(seed)
    randoms = [diversity(weight[kept(rng.choice(n, removed, replace=False))])
               for _ in range(draws)]
    return {
        "original": diversity(weight),
        "CAR-kept": diversity(weight[kept(car_removed)]),
        "L1-kept": diversity(weight[kept(torch.argsort(l1, stable=True)[:removed].tolist())]),
        "random-kept": {"filters": n - removed, **{
            key: float(np.mean([r[key] for r in randoms]))
            for key in ("mean_cosine_distance", "effective_rank")}},
    }


def diversity_figure(table: dict[str, dict[str, float]], layer: str) -> bytes:
    names = list(table)
    fig = Figure(figsize=(7.5, 3.2), layout="constrained")
    for i, (key, label) in enumerate((("mean_cosine_distance", "mean cosine distance"),
                                      ("effective_rank", "effective rank"))):
        ax = fig.add_subplot(1, 2, i + 1)
        values = [table[name][key] for name in names]
        bars = ax.bar(names, values, color=["tab:gray", "tab:red", "tab:blue", "tab:green"])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, rotation=20)
        ax.margins(y=0.15)
    fig.suptitle(f"{layer}: diversity of the filter bank "
                 f"({table['CAR-kept']['filters']} of {table['original']['filters']} kept)",
                 fontsize=10)
    return png(fig)
