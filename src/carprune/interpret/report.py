"""The pieces of `carprune explain` (commands/explain.py): one section per layer (class
importance, top patches, colour, diversity) and the self-contained report.html around them.
A hidden linear layer's section has no colour and shows whole images (LINEAR_NOTE)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import io
from ..data import Data
from ..errors import CarpruneError
from ..scoring import ScoringSet
from .class_importance import ClassImportance, class_importance
from .colour import (
    ACTIVATION_THRESHOLD,
    WEIGHT_THRESHOLD,
    activation_colour_index,
    colour_figure,
    colour_of_pruned,
    colour_selectivity,
    diversity_comparison,
    diversity_figure,
)
from .pictures import (
    Patches,
    heatmap,
    image_png,
    patch_strip,
    patches_figure,
    top_patches,
)

FIRST_REMOVED = 20
LINEAR_NOTE = ("a linear layer: each unit is one output feature (a row of its weight matrix) "
               "and sees the whole image, so the pictures are whole images, not receptive-field "
               "patches, and there is no colour index or filter picture (they read conv kernels "
               "and feature maps).")


def first_conv(model: nn.Module, channels: int) -> str | None:
    """The conv layer that reads the image: the first Conv2d taking the input's channels."""
    return next((name for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == channels), None)


def removal_orders(prune_run, sizes: dict[str, int]) -> dict[str, list[int]]:
    """Per layer of `sizes` (layer: its units) that the prune run pruned: the original unit
    indices in CAR's removal order, checked against the model the run must have started
    from."""
    if prune_run is None:
        return {}
    result = io.read_json(Path(prune_run) / "result.json")
    pruned = result.get("layers")
    if not isinstance(pruned, dict):
        raise CarpruneError(f"{prune_run}/result.json has no layers entry; give a directory "
                            "written by carprune prune")
    if not set(pruned) & set(sizes):
        raise CarpruneError(f"prune run {prune_run} pruned {', '.join(pruned) or 'no layer'}, "
                            f"none of {', '.join(sizes)}; name one of its layers")
    orders = {}
    for name, size in sizes.items():
        if name not in pruned:
            continue
        record = pruned[name] if isinstance(pruned[name], dict) else {}
        removed = record.get("removed")
        if record.get("filters_before") != size or not isinstance(removed, list) or \
                any(not isinstance(i, int) or not 0 <= i < size for i in removed):
            raise CarpruneError(f"prune run {prune_run} does not fit layer {name!r} of this "
                                f"model ({size} filters); give the checkpoint the run started "
                                "from")
        orders[name] = removed
    return orders


def img_tag(data: bytes, alt: str, css: str = "") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="{css}" alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _classes_cell(pairs: list[tuple[str, float]]) -> str:
    return "<br>".join(f"{html.escape(c)} <b>{points(v)}</b>" for c, v in pairs)


def _colour_html(name: str, imp: ClassImportance, figures: dict[str, bytes], info: dict,
                 linear: bool) -> list[str]:
    colour = info["colour"]
    if linear:  # LINEAR_NOTE says why
        return []
    if colour is None:
        return ["<h3>Colour</h3>",
                "<p>The colour indices do not apply: the images are not RGB.</p>"]
    return ["<h3>Colour</h3>",
            f"<p>{colour['colour_in_first']} of the first {colour['first']} filters "
            f"removed ({html.escape(info['order_source'])}) are colour filters "
            f"({html.escape(colour['index'])} index above {colour['threshold']}), "
            f"against {colour['colour_in_layer']} of {imp.num_filters} "
            f"({100 * colour['layer_share']:.0f}%) in the whole layer.</p>",
            img_tag(figures[f"colour_{name}.png"], f"colour index of {name}")]


def _layer_html(name: str, imp: ClassImportance, figures: dict[str, bytes], strips: list[bytes],
                info: dict, colour_values, linear: bool) -> str:
    top = max(range(imp.num_filters), key=lambda f: (imp.car[f], -f))
    what = "units" if linear else "filters"
    parts = [f'<h2 id="{html.escape(name)}">Layer {html.escape(name)}</h2>',
             f"<p>{imp.num_filters} {what}. Accuracy of the network on the scoring set: "
             f"<b>{100 * imp.base_accuracy:.2f}%</b>. Most important {what[:-1]}: <b>{top}</b> "
             f"(CAR index {points(imp.car[top])} points; needed most by "
             f"{html.escape(imp.most(top, 1)[0][0])}). Numbers are percentage points of "
             f"accuracy lost without the {what[:-1]} (overall for the CAR index, per class "
             "otherwise).</p>",
             *([f"<p>{html.escape(name)} is {LINEAR_NOTE}</p>"] if linear else []),
             f"<h3>Which classes need which {what[:-1]}</h3>",
             img_tag(figures[f"heatmap_{name}.png"], f"class-importance heat map of {name}"),
             *_colour_html(name, imp, figures, info, linear)]
    div = info["diversity"]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['filters']}</td>"
                   f"<td>{v['mean_cosine_distance']:.3f}</td><td>{v['effective_rank']:.2f}</td>"
                   "</tr>" for k, v in div.items())
    parts += [f"<h3>Diversity of the {'weight rows' if linear else 'filter bank'}</h3>",
              f"<p>Kept {what} by {html.escape(info['order_source'])}, against as many kept by "
              "the L1 norm (smallest removed) and at random (mean of 10 seeded draws).</p>",
              f"<table><tr><th>{what}</th><th>count</th><th>mean cosine distance</th>"
              f"<th>effective rank</th></tr>{rows}</table>",
              img_tag(figures[f"diversity_{name}.png"], f"diversity of {name}")]
    removal = {f: pos + 1 for pos, f in enumerate(info["removal_order"])}
    colour_head = "<th>colour index</th>" if colour_values is not None else ""
    order_head = f"<th>removal # ({html.escape(info['order_source'])})</th>"
    pictures = "whole images that excite it most" if linear else \
        "patches that excite it most (receptive field in red; at the image border part of it " \
        "is padding)"
    parts += [f"<h3>{what.capitalize()}, most important first</h3>",
              f"<table class=filters><tr><th>{what[:-1]}</th><th>CAR index</th>{order_head}"
              f"{colour_head}<th>needed most by</th><th>needed least by</th>"
              f"<th>{pictures}</th></tr>"]
    for f in sorted(range(imp.num_filters), key=lambda f: (-imp.car[f], f)):
        colour_cell = f"<td>{colour_values[f]:.2f}</td>" if colour_values is not None else ""
        parts.append(f"<tr><td><b>{f}</b></td><td>{points(imp.car[f])}</td>"
                     f"<td>{removal.get(f, 'kept')}</td>{colour_cell}"
                     f"<td>{_classes_cell(imp.most(f))}</td><td>{_classes_cell(imp.least(f))}</td>"
                     f"<td>{img_tag(strips[f], f'patches of {what[:-1]} {f}', 'strip')}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


CSS = """body{font-family:sans-serif;max-width:1150px;margin:1em auto;color:#222;padding:0 1em}
h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:14px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:middle}
th{background:#f0f0f0} img{max-width:100%} img.strip{image-rendering:pixelated}
p.meta{color:#555}"""


def page(source: str, data: Data, total: int, prune_run, grid_name: str | None,
          figures: dict[str, bytes], sections: list[str], layers: Sequence[str]) -> str:
    nav = " · ".join(f'<a href="#{html.escape(n)}">{html.escape(n)}</a>' for n in layers)
    grid = "" if grid_name is None else \
        f"<h2>Filters of {html.escape(grid_name)}</h2>" + \
        img_tag(figures[f"filters_{grid_name}.png"], f"filters of {grid_name}")
    run = f"; prune run: {html.escape(str(prune_run))}" if prune_run is not None else ""
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>carprune explain: {html.escape(source)}</title><style>{CSS}</style>"
            f"</head><body><h1>What the filters of {html.escape(source)} do</h1>"
            f"<p class=meta>Data: {html.escape(data.name)} ({len(data.classes)} classes: "
            f"{html.escape(', '.join(data.classes))}); scoring set: the first {total} "
            f"validation images{run}. Layers: {nav}</p>{grid}\n" + "\n".join(sections) +
            "</body></html>\n")


def _strips(patches: Patches, images: torch.Tensor, data: Data) -> list[bytes]:
    return [image_png(patch_strip(patches, f, images, data.mean, data.std))
            for f in range(len(patches.image))]


def _colour(model: nn.Module, images: torch.Tensor, name: str, data: Data, is_first: bool,
            car_order: list[int], ranking: list[int]) -> tuple[dict | None, bytes | None]:
    """The weight index for the layer reading the image, the activation index elsewhere."""
    values = colour_selectivity(model.get_submodule(name).weight) if is_first else None
    kind, threshold = "weight", WEIGHT_THRESHOLD
    if values is None:
        values = activation_colour_index(model, images, name, data.mean, data.std)
        kind, threshold = "activation", ACTIVATION_THRESHOLD
    if values is None:
        return None, None
    colour = {"index": kind, **colour_of_pruned(values, car_order, threshold, FIRST_REMOVED),
              "values": [float(v) for v in values]}
    return colour, colour_figure(values, ranking, threshold, name, f"{kind} colour index",
                                 FIRST_REMOVED)


def explain_layer(model: nn.Module, scoring: ScoringSet, images: torch.Tensor, name: str,
                   data: Data, run_order: list[int] | None, is_first: bool, engine: str,
                   top_k: int, seed: int, progress: bool, device: torch.device):
    """Everything about one layer: (class importance, summary, figures, CSV, HTML section).
    Class importance runs on `device`; the pictures on the CPU, where the model is. A linear
    layer gets no colour index (None)."""
    linear = isinstance(model.get_submodule(name), nn.Linear)
    imp = class_importance(model, scoring, name, engine, classes=data.classes,
                           progress=progress, device=device)
    patches = top_patches(model, images, name, top_k)
    if run_order is not None:
        order, order_source = run_order, "greedy CAR, prune run"
    else:
        order = imp.removal_order[:imp.num_filters // 2]
        order_source = "one-shot CAR index, half the layer"
    gone = set(order)
    ranking = order + [f for f in imp.removal_order if f not in gone]
    colour, colour_png = (None, None) if linear else _colour(
        model, images, name, data, is_first, run_order or imp.removal_order, ranking)
    div = diversity_comparison(model.get_submodule(name).weight, order, seed)
    figures = {f"heatmap_{name}.png": heatmap(imp),
               f"patches_{name}.png": patches_figure(patches, images, data.mean, data.std),
               f"diversity_{name}.png": diversity_figure(div, name)}
    if colour_png is not None:
        figures[f"colour_{name}.png"] = colour_png
    info = {"filters": imp.num_filters, "base_accuracy": imp.base_accuracy,
            "car": [float(v) for v in imp.car], "order_source": order_source,
            "removal_order": order, "colour": colour, "diversity": div,
            "top_patches": {"receptive_field": None if patches.rf is None else
                            list(patches.rf.size), "images": patches.image.tolist()}}
    section = _layer_html(name, imp, figures, _strips(patches, images, data), info,
                          None if colour is None else colour["values"], linear)
    return imp, info, figures, imp.to_csv(), section
