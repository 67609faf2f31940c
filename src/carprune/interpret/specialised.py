"""What `carprune explain` says of a specialised prune run (`carprune prune --classes`): for
the filters the run removed, which of the classes it dropped they served. Class importance is
measured on the unpruned network over all classes (class_importance.py), so a reader sees why
the filters could go: they served the classes the specialised network no longer predicts.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from .. import io
from ..errors import CarpruneError
from .class_importance import ClassImportance

SHOWN = 3  # dropped classes named per removed filter


def run_classes(prune_run, names: list[str]) -> list[int] | None:
    """The output indices a prune run kept (its result.json's `classes`), checked against the
    classes of the network explained (`names`); None for a run on all classes."""
    if prune_run is None:
        return None
    kept = io.read_json(Path(prune_run) / "result.json").get("classes")
    if kept is None:
        return None
    indices, of = kept.get("indices"), kept.get("of")
    if of != len(names) or not isinstance(indices, list) or any(
            not isinstance(i, int) or not 0 <= i < len(names) for i in indices):
        raise CarpruneError(f"prune run {prune_run} specialised a network of {of} classes, "
                            f"not this one's {len(names)}; give the checkpoint the run started "
                            "from")
    return indices


def _mean(values: np.ndarray) -> float | None:
    present = values[~np.isnan(values)]
    return float(present.mean()) if len(present) else None


def served(imp: ClassImportance, removed: list[int], kept: list[int]) -> dict:
    """Per removed filter: the dropped classes that lose most without it, and its mean loss on
    the dropped and on the kept classes (fractions of their images); the same means over all
    removed filters, and how many removed filters served a dropped class most of all."""
    dropped = [c for c in range(len(imp.classes)) if c not in set(kept)]
    filters = []
    for f in removed:
        row = imp.matrix[f]
        ranked = sorted((c for c in dropped if not math.isnan(row[c])), key=lambda c: (-row[c], c))
        top = max((c for c in range(len(row)) if not math.isnan(row[c])),
                  key=lambda c: (row[c], -c), default=None)
        filters.append({"filter": f, "car": float(imp.car[f]),
                        "dropped_most": [{"class": imp.classes[c], "value": float(row[c])}
                                         for c in ranked[:SHOWN]],
                        "dropped_mean": _mean(row[dropped]), "kept_mean": _mean(row[kept]),
                        "serves_dropped_most": top is not None and top in dropped})
    block = imp.matrix[removed] if removed else np.empty((0, len(imp.classes)))
    return {"kept": [imp.classes[c] for c in kept], "dropped": [imp.classes[c] for c in dropped],
            "removed": len(removed), "dropped_mean": _mean(block[:, dropped]),
            "kept_mean": _mean(block[:, kept]),
            "serve_dropped_most": sum(r["serves_dropped_most"] for r in filters),
            "filters": filters}


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}"


def section(name: str, info: dict) -> str:
    """The report's section on the filters of `name` that the specialised run removed."""
    rows = "".join(
        f"<tr><td><b>{r['filter']}</b></td><td>{_points(r['car'])}</td><td>"
        + "<br>".join(f"{html.escape(d['class'])} <b>{_points(d['value'])}</b>"
                      for d in r["dropped_most"])
        + f"</td><td>{_points(r['dropped_mean'])}</td><td>{_points(r['kept_mean'])}</td></tr>"
        for r in info["filters"])
    return (f"<h3>Specialisation: why the removed filters of {html.escape(name)} could go</h3>"
            f"<p>The prune run kept {len(info['kept'])} classes "
            f"({html.escape(', '.join(info['kept']))}) and removed {info['removed']} filters "
            f"of this layer. Measured on the unpruned network over all classes, without them "
            f"the dropped classes lose <b>{_points(info['dropped_mean'])}</b> points on average "
            f"and the kept ones <b>{_points(info['kept_mean'])}</b>; "
            f"{info['serve_dropped_most']} of the {info['removed']} served a dropped class "
            "most of all.</p>"
            "<table><tr><th>removed filter</th><th>CAR index (all classes)</th>"
            "<th>dropped classes it served most</th><th>mean, dropped classes</th>"
            f"<th>mean, kept classes</th></tr>{rows}</table>")
