"""Weight sharing (Han et al., Deep Compression, section 3): k-means per layer, then centroids
that are trained instead of the weights they stand for."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, labels) of Lloyd's k-means on scalars, started from k centroids spread
    linearly over [min, max].

    Linear initialisation (Han et al.'s choice) keeps centroids near the rare large weights,
    which matter most and which density-based starts would starve. Clusters that end empty are
    dropped, so every returned centroid has members; labels index the returned centroids.
    """
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0:
        return np.empty(0), np.empty(0, np.int64)
    centroids = np.linspace(values.min(), values.max(), k)
    labels = np.full(values.size, -1)
    for _ in range(iterations):
        order = np.argsort(centroids, kind="stable")
        edges = (centroids[order][1:] + centroids[order][:-1]) / 2
        new = order[np.searchsorted(edges, values)]
        if np.array_equal(new, labels):
            break
        labels = new
        sums = np.bincount(labels, values, minlength=k)
        counts = np.bincount(labels, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled]
    used = np.unique(labels)
    return centroids[used], np.searchsorted(used, labels)


class SharedWeights(nn.Module):
    """weight = [0, c_1, ..., c_k][index]: a layer's weights as a view of its centroids.

    The centroids become the trained parameter, so autograd gives each centroid the sum of the
    gradients of the weights that share it (Han et al., eq. 3), and pruned weights (index 0)
    stay zero.
    """

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        return torch.cat([centroids.new_zeros(1), centroids])[self.index]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The centroids of an already-quantised weight: every member holds its centroid."""
        centroids = weight.new_zeros(int(self.index.max()) if self.index.numel() else 0)
        members = self.index > 0
        centroids[self.index[members] - 1] = weight.detach()[members]
        return centroids


def quantize_(module: nn.Module, bits: int) -> int:
    """Replace the module's nonzero weights by 2**bits k-means centroids (float16 values, as
    stored) and train those from now on; returns the number of centroids used."""
    weight = module.weight.detach()
    flat = weight.flatten()
    alive = (flat != 0).nonzero().flatten()
    centroids, labels = kmeans_1d(flat[alive].double().numpy(), 2 ** bits)
    index = torch.zeros(flat.numel(), dtype=torch.int64)
    index[alive] = torch.from_numpy(labels) + 1
    table = torch.cat([torch.zeros(1), torch.from_numpy(centroids).half().float()])
    with torch.no_grad():
        module.weight.copy_(table[index].view_as(weight).to(weight.dtype))
    parametrize.register_parametrization(module, "weight", SharedWeights(index.view(weight.shape)),
                                         unsafe=True)
    return len(centroids)


def freeze_(module: nn.Module) -> None:
    """End centroid training: round the centroids to float16 (as the file stores them) and make
    the shared weights a plain parameter again."""
    with torch.no_grad():
        original = module.parametrizations.weight.original
        original.copy_(original.half().float())
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
