"""`carprune explain`: what the filters (or hidden linear units) of some layers do, as files a
person reads (PNGs, one self-contained report.html) and files a program reads (CSV, JSON);
interpret/ computes them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import io
from ..car import check_layers
from ..classes import data_for
from ..config import ExplainConfig
from ..data import Data, check_fits, first_images, load_data
from ..devices import resolve_device
from ..errors import CarpruneError
from ..groups import Surgery
from ..interpret.class_importance import ClassImportance
from ..interpret.pictures import filter_grid
from ..interpret.report import explain_layer, first_conv, page, points, removal_orders
from ..interpret.specialised import run_classes, served
from ..interpret.specialised import section as specialised_section
from ..scoring import EngineOptions, ScoringSet, make_engine
from .common import refuse_existing_output, table


def run(config: ExplainConfig) -> dict:
    device = resolve_device(config.device)
    data = load_data(config.data, config.data_dir, io.load(config.checkpoint),
                     config.image_size, config.workers)
    return explain_run(config.checkpoint, data, config.layers, config.out,
                       prune_run=config.prune_run, score_samples=config.score_samples,
                       engine=config.engine, top_k=config.top_k, device=device)


def _model(checkpoint_or_model) -> tuple[nn.Module, str]:
    if isinstance(checkpoint_or_model, nn.Module):
        return checkpoint_or_model.eval(), "a model given in Python"
    return io.load(checkpoint_or_model), str(checkpoint_or_model)


def _validated(checkpoint_or_model, data: Data, layers: Sequence[str], out, prune_run,
               score_samples: int | None, engine: str, top_k: int):
    if not isinstance(data, Data):
        raise CarpruneError("explain_run needs a carprune Data (e.g. carprune.data."
                            "fashion_mnist()); use class_importance for a bare data set")
    make_engine(EngineOptions(engine=engine))
    if top_k < 1:
        raise CarpruneError(f"top_k must be at least 1 patch per filter, got {top_k}")
    model, source = _model(checkpoint_or_model)
    data = data_for(model, data)
    check_fits(model, data)
    surgery = Surgery(model, data.example(1))
    check_layers(surgery, layers)
    dataset = first_images(data.val, score_samples, "--score-samples")
    orders = removal_orders(prune_run, {name: surgery.size(name) for name in layers})
    kept = run_classes(prune_run, list(data.classes))
    refuse_existing_output(str(out))
    return model, data, source, dataset, orders, kept


def explain_run(checkpoint_or_model, data: Data, layers: Sequence[str], out: str | os.PathLike,
                prune_run: str | os.PathLike | None = None, score_samples: int | None = None,
                engine: str = "fast", top_k: int = 6, seed: int = 0,
                progress: bool = True, device: torch.device | None = None) -> dict:
    """Explain the filters of `layers`: class importance (CSV, JSON, heat map), top patches, the
    first conv layer's filters, colour and diversity indices, and one self-contained
    report.html, all in `out`. Every input is checked before anything is written. A hidden
    linear layer's units get the same but colour (None) and whole images for patches
    (interpret/report.py, LINEAR_NOTE).

    checkpoint_or_model: a checkpoint directory, a shipped name, or an nn.Module.
    prune_run: a `carprune prune` output directory; its removal order annotates the pictures
    (otherwise the one-shot CAR ranking stands in, removing half of each layer). A run
    specialised to some classes (--classes) adds, per layer, which of the dropped classes the
    filters it removed served (interpret/specialised.py).
    score_samples: score on the first N validation images (default: all).
    device: where class importance is computed (default: the CPU); pictures are drawn on it.
    """
    model, data, source, dataset, orders, kept = _validated(
        checkpoint_or_model, data, layers, out, prune_run, score_samples, engine, top_k)
    out = Path(out)
    scoring = ScoringSet.from_any(data.scoring_source(dataset), data.num_classes)
    images = torch.cat([x for x, _ in scoring.batches]).contiguous()
    grid_name = first_conv(model, images.shape[1])
    figures: dict[str, bytes] = {}
    texts: dict[str, str] = {}
    explained, sections = {}, []
    for name in layers:
        imp, info, layer_figures, table_csv, section = explain_layer(
            model, scoring, images, name, data, orders.get(name), name == grid_name, engine,
            top_k, seed, progress, device or torch.device("cpu"))
        if kept is not None and name in orders:
            info["specialisation"] = served(imp, orders[name], kept)
            section += specialised_section(name, info["specialisation"])
        explained[name] = (imp, info)
        figures.update(layer_figures)
        texts[f"class_importance_{name}.csv"] = table_csv
        sections.append(section)
    if grid_name is not None:
        figures[f"filters_{grid_name}.png"] = filter_grid(
            model.get_submodule(grid_name).weight, grid_name, orders.get(grid_name))
    texts["report.html"] = page(source, data, scoring.total, prune_run, grid_name, figures,
                                 sections, layers)
    files = sorted([*figures, *texts, *[f"class_importance_{n}.json" for n in layers],
                    "explain.json"])
    summary = {"checkpoint": source, "data": data.name, "classes": list(data.classes),
               "score_samples": scoring.total, "engine": engine,
               "prune_run": None if prune_run is None else str(prune_run),
               "first_conv": grid_name, "files": files,
               "kept_classes": None if kept is None else [data.classes[c] for c in kept],
               "layers": {n: info for n, (_, info) in explained.items()}}
    for filename, payload in {**figures, **texts}.items():
        io.atomic_write(out / filename, payload)
    for name, (imp, _) in explained.items():
        io.write_json(out / f"class_importance_{name}.json", imp.to_json())
    io.write_json(out / "explain.json", summary)
    _print_summary(explained, out, {n for n in layers
                                    if isinstance(model.get_submodule(n), nn.Linear)})
    return summary


def _print_summary(layers: dict[str, tuple[ClassImportance, dict]], out: Path,
                   linear: set[str]) -> None:
    rows = []
    for name, (imp, info) in layers.items():
        top = max(range(imp.num_filters), key=lambda f: (imp.car[f], -f))
        low = min(range(imp.num_filters), key=lambda f: (imp.car[f], f))
        div = info["diversity"]
        colour = info["colour"]
        rows.append([name, imp.num_filters, f"{100 * imp.base_accuracy:.2f}",
                     f"{top} ({points(imp.car[top])}, {imp.most(top, 1)[0][0]})",
                     f"{low} ({points(imp.car[low])})",
                     f"{div['original']['mean_cosine_distance']:.3f} -> "
                     f"{div['CAR-kept']['mean_cosine_distance']:.3f}",
                     "n/a (linear)" if name in linear else "n/a (grey)" if colour is None else
                     f"{colour['colour_in_first']}/{colour['first']}"])
    print(table(rows, ["layer", "filters", "acc %", "most important (pts, class)",
                       "least important", "diversity -> CAR-kept", "colour in first removed"]))
    print(f"report: {out / 'report.html'}")
