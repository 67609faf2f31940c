"""Pictures a person reads a filter by: its weights, the image patches that excite it most, and
the class-importance heat map. Everything is drawn with matplotlib's Agg renderer into PNG bytes
(no pyplot state, no display needed)."""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass

import matplotlib
import matplotlib.image
import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.utils import _pair

from ..errors import CarpruneError
from ..scoring.graph import trace
from .class_importance import ClassImportance

_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
_GLOBAL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear)
_PER_CHANNEL = (_BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SiLU, nn.GELU,
                nn.Hardswish, nn.Mish)
_ACTIVATION_FNS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu,
                   F.hardswish, F.mish, "relu", "relu_"}
RED = np.array([0.85, 0.1, 0.1])


def png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def image_png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) array in [0, 1] as PNG bytes, pixel for pixel."""
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, np.clip(rgb, 0, 1), format="png")
    return buf.getvalue()


# -- where a filter looks ------------------------------------------------------------------

@dataclass(frozen=True)
class ReceptiveField:
    """Per axis (rows, columns): `size` input pixels seen by one output position, `jump` input
    pixels between neighbouring positions, `start` the first input pixel seen by position 0
    (negative where it lies in the padding)."""

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[int, int]

    def box(self, row: int, col: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), exclusive ends, clipped to the image."""
        top = self.start[0] + row * self.jump[0]
        left = self.start[1] + col * self.jump[1]
        return (max(top, 0), max(left, 0), min(top + self.size[0], height),
                min(left + self.size[1], width))


def _trace(model: nn.Module) -> fx.GraphModule:
    """The scoring engine's trace (convs, linears and norms are single calls, so a padding
    computed inside timm's Conv2dSame is no control flow to fx)."""
    traced = trace(model)
    if traced is None:
        raise CarpruneError("torch.fx cannot trace the model; receptive fields and activations "
                            "need a traceable model (no Python control flow on tensors)")
    return traced


def _layer_node(graph: fx.Graph, layer: str) -> fx.Node:
    found = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if not found:
        raise CarpruneError(f"layer {layer!r} is not called in the model's forward; choose a "
                            "conv layer the forward pass uses")
    return found[0]


def _through(rf: ReceptiveField, m: nn.Module) -> ReceptiveField:
    """Receptive field after a conv or pooling module (the standard recurrence per axis)."""
    kernel, stride = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
    dilation = _pair(getattr(m, "dilation", 1))
    padding = m.padding
    if isinstance(padding, str):  # 'valid' or 'same' (stride 1): PyTorch pads the left half
        padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                        for k, d in zip(kernel, dilation, strict=True))
    padding = _pair(padding)
    return ReceptiveField(
        tuple(s + (d * (k - 1)) * j for s, k, d, j
              in zip(rf.size, kernel, dilation, rf.jump, strict=True)),
        tuple(j * st for j, st in zip(rf.jump, stride, strict=True)),
        tuple(s - p * j for s, p, j in zip(rf.start, padding, rf.jump, strict=True)))


def _union(fields: list[ReceptiveField | None]) -> ReceptiveField | None:
    """What an element-wise op on several inputs (a residual sum, a concatenation) sees."""
    if any(f is None for f in fields):
        return None
    start = tuple(min(f.start[a] for f in fields) for a in (0, 1))
    end = tuple(max(f.start[a] + f.size[a] for f in fields) for a in (0, 1))
    return ReceptiveField(tuple(e - s for s, e in zip(start, end, strict=True)),
                          tuple(max(f.jump[a] for f in fields) for a in (0, 1)), start)


def receptive_field(model: nn.Module, layer: str) -> ReceptiveField | None:
    """The input region one output position of `layer` depends on, from the kernels, strides,
    paddings and dilations of every conv and pooling module on the paths to it (residual and
    concatenated paths are united). None when the position sees the whole image (after global
    pooling or a linear layer)."""
    graph = _trace(model).graph
    modules = dict(model.named_modules())
    env: dict[fx.Node, ReceptiveField | None] = {}
    target = _layer_node(graph, layer)
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = ReceptiveField((1, 1), (1, 1), (0, 0))
            continue
        inputs = [env[n] for n in node.all_input_nodes if n in env]
        if not inputs:
            continue
        rf = _union(inputs)
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, _SPATIAL) and rf is not None:
            rf = _through(rf, module)
        elif isinstance(module, _GLOBAL):
            rf = None
        env[node] = rf
        if node is target:
            return rf
    raise CarpruneError(f"layer {layer!r} does not depend on the model's input; choose another")


def activation_model(model: nn.Module, layer: str) -> fx.GraphModule:
    """The model cut after `layer` and the normalisation and activation that directly follow
    it: a filter 'excites' where this output is high (the raw conv output would rank wrongly
    when a BatchNorm scale is negative). Works on a copy: the model is left as it was."""
    traced = _trace(copy.deepcopy(model))
    modules = dict(traced.named_modules())
    node = _layer_node(traced.graph, layer)
    while len(node.users) == 1:
        user = next(iter(node.users))
        per_channel = user.op == "call_module" and isinstance(modules[user.target], _PER_CHANNEL)
        activation = user.op in ("call_function", "call_method") and \
            user.target in _ACTIVATION_FNS
        if not (per_channel or activation):
            break
        node = user
    output = next(n for n in traced.graph.nodes if n.op == "output")
    output.args = (node,)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced.eval()


# -- patches -------------------------------------------------------------------------------

@dataclass
class Patches:
    """Per filter, the k scoring images it responds to most and where (one patch an image)."""

    layer: str
    rf: ReceptiveField | None
    image: np.ndarray  # (F, k) image indices
    value: np.ndarray  # (F, k) the filter's peak activation in that image, descending
    box: np.ndarray    # (F, k, 4) top, left, bottom, right of the receptive field, clipped


@torch.inference_mode()
def top_patches(model: nn.Module, images: torch.Tensor, layer: str, k: int = 6,
                batch_size: int = 256) -> Patches:
    """The receptive-field patches of `images` (N, C, H, W) that excite each filter of `layer`
    most: per image its peak position, then the k images with the highest peaks (ties: lower
    image index). The units of a linear layer are its output features (the last dimension,
    peaks over any positions before it); their patches are whole images."""
    cut = activation_model(model, layer)
    rf = receptive_field(model, layer)
    linear = isinstance(model.get_submodule(layer), nn.Linear)
    peaks, places = [], []
    width = 0
    for start in range(0, len(images), batch_size):
        act = cut(images[start:start + batch_size])
        if linear:
            act = act.movedim(-1, 1).reshape(act.shape[0], act.shape[-1], -1)
        elif act.ndim != 4:
            raise CarpruneError(f"layer {layer!r} does not output feature maps; choose a conv "
                                "layer")
        width = act.shape[-1]
        peak, place = act.flatten(2).max(2)
        peaks.append(peak)
        places.append(place)
    peak, place = torch.cat(peaks), torch.cat(places)           # (N, F)
    order = torch.sort(peak, dim=0, descending=True, stable=True).indices[:k].T  # (F, k)
    value = torch.gather(peak.T, 1, order).numpy()
    at = torch.gather(place.T, 1, order).numpy()
    height, full_width = images.shape[-2:]
    boxes = np.array([[(0, 0, height, full_width) if rf is None else
                       rf.box(int(p) // width, int(p) % width, height, full_width)
                       for p in row] for row in at], dtype=np.int64)
    return Patches(layer, rf, order.numpy(), value, boxes)


def to_rgb(image: torch.Tensor, mean=None, std=None) -> np.ndarray:
    """(C, H, W) normalised image -> (H, W, 3) in [0, 1] for display (min-max without stats)."""
    x = image.detach().double()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).double().view(-1, 1, 1) + \
            torch.tensor(mean).double().view(-1, 1, 1)
    else:
        x = (x - x.min()) / float(x.max() - x.min() or 1)
    if x.shape[0] != 3:
        x = x.mean(0, keepdim=True).expand(3, -1, -1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _window(lo: int, hi: int, n: int, least: int) -> tuple[int, int]:
    size = min(max(hi - lo, least), n)
    first = min(max((lo + hi) // 2 - size // 2, 0), n - size)
    return first, first + size


def patch_tile(rgb: np.ndarray, box, tile: int = 48, least: int = 12,
               frame: bool = True) -> np.ndarray:
    """The receptive field with some context (at least `least` pixels a side), enlarged to
    tile x tile pixels, the receptive field framed in red (`frame`)."""
    top, left, bottom, right = (int(v) for v in box)
    r0, r1 = _window(top, bottom, rgb.shape[0], least)
    c0, c1 = _window(left, right, rgb.shape[1], least)
    steps = np.arange(tile)
    out = rgb[r0 + steps * (r1 - r0) // tile][:, c0 + steps * (c1 - c0) // tile].copy()

    def at(v: int, lo: int, size: int, end: int = 0) -> int:
        return min(max(round((v - lo) * tile / size) - end, 0), tile - 1)

    t, b = at(top, r0, r1 - r0), at(bottom, r0, r1 - r0, end=1)
    lft, rgt = at(left, c0, c1 - c0), at(right, c0, c1 - c0, end=1)
    if not frame:
        return out
    out[t, lft:rgt + 1] = out[b, lft:rgt + 1] = RED
    out[t:b + 1, lft] = out[t:b + 1, rgt] = RED
    return out


def patch_strip(patches: Patches, f: int, images: torch.Tensor, mean=None, std=None,
                tile: int = 48, gap: int = 2) -> np.ndarray:
    """Filter f's patches side by side on white, strongest first (whole images, unframed, where
    a position sees all of the image)."""
    tiles = [patch_tile(to_rgb(images[i], mean, std), box, tile, frame=patches.rf is not None)
             for i, box in zip(patches.image[f], patches.box[f], strict=True)]
    strip = np.ones((tile, len(tiles) * (tile + gap) - gap, 3))
    for n, t in enumerate(tiles):
        strip[:, n * (tile + gap):n * (tile + gap) + tile] = t
    return strip


def patches_figure(patches: Patches, images: torch.Tensor, mean=None, std=None) -> bytes:
    """Every filter's strip, one row each, labelled with the filter number."""
    tile, gap = 48, 6
    strips = [patch_strip(patches, f, images, mean, std, tile) for f in range(len(patches.image))]
    mosaic = np.ones((len(strips) * (tile + gap) - gap, strips[0].shape[1], 3))
    for f, strip in enumerate(strips):
        mosaic[f * (tile + gap):f * (tile + gap) + tile] = strip
    fig = Figure(figsize=(mosaic.shape[1] / 100 + 1.0, mosaic.shape[0] / 100 + 0.8))
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([f * (tile + gap) + tile / 2 for f in range(len(strips))],
                  [f"{'unit' if patches.rf is None else 'filter'} {f}"
                   for f in range(len(strips))], fontsize=8)
    ax.set_xticks([n * (tile + 2) + tile / 2 for n in range(patches.image.shape[1])],
                  [f"#{n + 1}" for n in range(patches.image.shape[1])], fontsize=8)
    ax.tick_params(length=0)
    title = "the images that excite each unit most\n(each sees the whole image)" \
        if patches.rf is None else "the patches that excite each filter most\n(receptive " \
        f"field {patches.rf.size[0]}x{patches.rf.size[1]} px, framed in red)"
    ax.set_title(f"{patches.layer}: {title}", fontsize=10)
    return png(fig)


# -- weights and importance ----------------------------------------------------------------

def _weight_tile(w: torch.Tensor) -> np.ndarray:
    """One filter as (kh, kw, 3) in [0, 1], 0 mid-grey, scaled to its own largest weight."""
    if w.shape[0] != 3:
        w = w.mean(0, keepdim=True).expand(3, -1, -1)
    return (w / (2 * (float(w.abs().max()) or 1.0)) + 0.5).permute(1, 2, 0).numpy()


def filter_grid(weight: torch.Tensor, layer: str, removed: list[int] | None = None) -> bytes:
    """The filters of a layer reading the image, one tile each: colour for 3 input channels,
    grey (the mean over input channels) otherwise. With a prune run's removal order, each
    removed tile carries its CAR removal number in red and kept tiles are framed green. Drawn
    as one mosaic, so a 96-filter layer costs no more than a 16-filter one."""
    w = weight.detach().double().cpu()
    n, _, kh, kw = w.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = max(1, round(48 / max(kh, kw)))
    th, tw, gap, label = kh * scale, kw * scale, 12, 16
    cell_h, cell_w = th + label + gap, tw + gap
    mosaic = np.ones((rows * cell_h, cols * cell_w, 3))
    for f in range(n):
        top, left = (f // cols) * cell_h + label, (f % cols) * cell_w + gap // 2
        mosaic[top:top + th, left:left + tw] = _weight_tile(w[f]).repeat(scale, 0).repeat(scale, 1)
    fig = Figure(figsize=(mosaic.shape[1] / 100 + 0.4, mosaic.shape[0] / 100 + 0.8))
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    order = {f: pos + 1 for pos, f in enumerate(removed or [])}
    for f in range(n):
        top, left = (f // cols) * cell_h + label, (f % cols) * cell_w + gap // 2
        ax.text(left, top - 3, str(f), ha="left", va="bottom", fontsize=7)
        if f in order:
            ax.text(left + tw, top - 3, f"#{order[f]}", ha="right", va="bottom", color="red",
                    fontsize=8, fontweight="bold")
        elif removed is not None:
            ax.add_patch(Rectangle((left - 2.5, top - 2.5), tw + 4, th + 4, fill=False,
                                   edgecolor="green", linewidth=2.5))
    legend = "black: filter index"
    if removed is not None:
        legend += "; red #n: removed n-th by CAR; green frame: kept"
    ax.set_title(f"{layer} filters\n({legend})", fontsize=9)
    return png(fig)


def heatmap(imp: ClassImportance) -> bytes:
    """The class-importance matrix, filters sorted by CAR index (most important on top)."""
    order = np.argsort(-imp.car, kind="stable")
    m = 100 * imp.matrix[order]
    finite = np.abs(m[np.isfinite(m)])
    lim = float(finite.max()) if finite.size and finite.max() > 0 else 0.1
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")
    n, c = m.shape
    fig = Figure(figsize=(2.2 + 0.5 * c, 1.6 + 0.19 * n))
    ax = fig.add_subplot()
    shown = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(c), imp.classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{f} ({100 * imp.car[f]:+.1f})" for f in order], fontsize=7)
    ax.set_ylabel("filter (CAR index, points)")
    fig.colorbar(shown, ax=ax, shrink=0.6,
                 label="points of class accuracy lost without the filter")
    ax.set_title(f"{imp.layer}: which classes need each filter\n(red: the class needs it; "
                 "sorted by CAR index)", fontsize=10)
    return png(fig)
