"""The report of `make real` (experiments/real): per network, the per-layer agreement curves of
every criterion, the post-training global table, the first layer's filters with CAR's removals,
its colour and diversity figures, and the filters whose absence costs the most and the least
agreement, with the classes that need them and the patches that excite them most."""

from __future__ import annotations

import copy
import html

import numpy as np
from matplotlib.figure import Figure

from carprune.interpret import class_importance
from carprune.interpret.colour import colour_figure, diversity_figure
from carprune.interpret.pictures import filter_grid, image_png, patch_strip, png, top_patches
from carprune.interpret.report import CSS, img_tag

IMPORTANCE_ROWS = 3


def curves_figure(curves: dict[str, dict[str, dict]], layer: str, filters: int) -> bytes:
    """Top-1 agreement on test against filters kept, one line per criterion."""
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for name, points in curves.items():
        kept = sorted((int(k) for k in points), reverse=True)
        ax.plot([filters, *kept], [1.0, *(points[str(k)]["top1"] for k in kept)], marker="o",
                lw=2.5 if name == "car" else 1.2, label=name)
    ax.set_xlabel(f"filters kept of {filters}")
    ax.set_ylabel("top-1 agreement (test)")
    ax.invert_xaxis()
    ax.set_title(f"{layer}: pruned alone, no retraining", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return png(fig)


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _importance(net, split, progress: bool) -> str:
    """The first layer's filters whose absence loses the most and the least scoring agreement
    (one-shot CAR), the classes that lose most without each, and its top patches."""
    layer = net.layers[0]
    imp = class_importance(net.model, split.scoring, layer, num_classes=len(net.classes),
                           classes=net.classes, progress=progress)
    images = split.scoring.tensors[0]
    patches = top_patches(copy.deepcopy(net.model).cpu(), images, layer, k=6)
    order = np.argsort(-imp.car, kind="stable")
    rows = []
    ends = (("most", order[:IMPORTANCE_ROWS]), ("least", order[::-1][:IMPORTANCE_ROWS]))
    for label, picks in ends:
        for f in picks:
            classes = ", ".join(f"{c} ({100 * v:+.0f})" for c, v in imp.most(int(f))
                                if v > 0) or "none"
            strip = image_png(patch_strip(patches, int(f), images, net.mean, net.std))
            rows.append(f"<tr><td>{label}</td><td>{int(f)}</td><td>{100 * imp.car[f]:+.1f}</td>"
                        f"<td>{html.escape(classes)}</td><td>{img_tag(strip, 'patches', 'strip')}"
                        "</td></tr>")
    return ("<h3>Class importance of " + html.escape(layer) + "</h3><table><tr><th>importance"
            "</th><th>filter</th><th>CAR (points)</th><th>classes losing most (points)</th>"
            "<th>top patches</th></tr>" + "".join(rows) + "</table>")


def network_section(net, result: dict, orders: dict, split, progress: bool) -> str:
    """One network's section of the page."""
    parts = [f"<h2>{html.escape(net.name)}</h2><p>{html.escape(result['network'])}; "
             f"{split.info['scoring']['windows']} scoring windows of "
             f"{', '.join(split.info['scoring']['photos'])}, {split.info['test']['windows']} test "
             f"windows of {', '.join(split.info['test']['photos'])}.</p>"]
    criteria = list(next(iter(result["per_layer"].values())))
    rows = [[layer, *row.values()] for layer, row in result["per_layer"].items()]
    parts.append("<h3>Per layer: top-1 agreement on test at half the filters</h3>" +
                 _table(["layer", *criteria], rows))
    for layer, curves in result["per_layer_curves"].items():
        filters = net.model.get_submodule(layer).out_channels
        parts.append(img_tag(curves_figure(curves, layer, filters), f"{layer} curves"))
    methods = result["global"]["methods"]
    parts.append("<h3>Post-training global pruning, no fine-tuning</h3>" + _table(
        ["method", "MACs left", "top-1", "top-5", "seconds", "on the way (MACs: top-1)"],
        [[m, v["macs"], v["top1"], v.get("top5", "-"), v["seconds"],
          ", ".join(f"{p['macs']:.2f}: {p['top1']:.3f}" for p in v["curve"])]
         for m, v in methods.items()]))
    first, colour = net.layers[0], result["colour"]
    car = orders[first]["car"][0]
    weight = net.model.get_submodule(first).weight.detach().cpu()
    parts.append(f"<h3>{html.escape(first)}: filters, CAR's removal numbers</h3>" +
                 img_tag(filter_grid(weight, first, car), "filters"))
    if colour is not None:
        parts.append(f"<h3>Colour</h3><p>{colour['colour_filters']} of {colour['filters']} "
                     f"filters are colour-selective (weight index &gt; {colour['threshold']}); "
                     f"at the layer's share {colour['expected_at_share']:.1f} of the first "
                     f"{colour['first']} removed would be.</p>" + _table(
                         ["criterion", f"colour among first {colour['first']}", "p-value"],
                         [[c, f"{colour[c]:g}", colour["p_value"].get(c, "-")] for c in criteria]) +
                     img_tag(colour_figure(np.array(colour["index"]), car, colour["threshold"],
                                           first, "weight colour index", colour["first"]),
                             "colour"))
    parts.append(img_tag(diversity_figure(result["diversity"], first), "diversity"))
    parts.append(_importance(net, split, progress))
    return "\n".join(parts)


def page(sections: list[str], summary: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>carprune: real "
            f"networks</title><style>{CSS}</style></head><body><h1>The paper's experiment on "
            f"real pretrained networks</h1><p>{html.escape(summary)}</p>" + "\n".join(sections) +
            "</body></html>\n")
