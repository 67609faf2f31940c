"""`carprune compare`: CAR against the other criteria, one layer at a time, with and without
retraining; writes compare.csv, compare.json and one PNG per layer."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import TensorDataset

from .. import compare, io
from ..car import check_layers
from ..config import CompareConfig
from ..data import check_fits, first_images, load_data
from ..devices import resolve_device
from ..errors import CarpruneError
from ..groups import Surgery
from .common import command_line, refuse_existing_output, table


def run(config: CompareConfig, data=None, known: dict | None = None) -> dict:
    """known: {(layer, criterion): removal order} already computed on the same network and
    scoring set (the demo passes prune's conv1 order, so greedy CAR does not run twice)."""
    refuse_existing_output(config.out)
    model = io.load(config.checkpoint).to(resolve_device(config.device))
    data = data if data is not None else load_data(config.data, config.data_dir, model,
                                                   config.image_size, config.workers)
    if not all(isinstance(s, TensorDataset) for s in (data.train, data.val, data.test)):
        raise CarpruneError("compare holds its splits in memory and reads image files only "
                            "through prune and explain; give it a data set held in memory "
                            "(fashion-mnist, or a factory returning TensorDatasets)")
    check_fits(model, data)
    surgery = Surgery(model, data.example(1))
    check_layers(surgery, config.layers)
    train = first_images(data.train, config.train_samples, "--train-samples")
    points = compare.compare(model, data, config.layers, config.criteria, config.keep_grid,
                             retrain_epochs=config.retrain_epochs, seeds=config.seeds,
                             scoring=first_images(data.val, config.score_samples,
                                                  "--score-samples"),
                             train=train, known=known)
    sizes = {name: surgery.size(name) for name in config.layers}
    summary = {"command": command_line(), "config": config.to_json(),
               "checkpoint": str(config.checkpoint),
               "retrain": {"epochs": config.retrain_epochs, "seeds": config.seeds,
                           "train_images": len(train)},
               "keep_0.5": compare.margins(points, 0.5, sizes),
               "keep_0.5_retrained": compare.margins(points, 0.5, sizes, retrained=True),
               "car_minus_oneshot": compare.oneshot_gaps(points)}
    out = Path(config.out)
    io.atomic_write(out / "compare.csv", compare.to_csv(points))
    for layer in config.layers:
        compare.plot(points, layer, out / f"compare_{layer}.png")
    io.write_json(out / "compare.json", summary)
    _print(config, summary)
    return summary


def _print(config: CompareConfig, summary: dict) -> None:
    for key, title in (("keep_0.5", "no retraining"),
                       ("keep_0.5_retrained",
                        f"after {config.retrain_epochs} epoch(s) retraining")):
        if summary[key]:
            print(f"test accuracy (%) at keep 0.5, {title} (± half the range over seeds):")
            print(table([_margin_row(layer, m, config.criteria)
                         for layer, m in summary[key].items()],
                        ["layer", "kept", *config.criteria, "CAR margin"]))
    for layer, gaps in summary["car_minus_oneshot"].items():
        print(f"{layer}: car minus car-oneshot, test points, per filters kept: "
              + ", ".join(f"{kept}: {100 * gap:+.2f}" for kept, gap in sorted(gaps.items()))
              + f" (smallest {100 * min(gaps.values()):+.2f})")
    print(f"written to {config.out}/ (compare.csv, compare.json, "
          f"{', '.join(f'compare_{x}.png' for x in config.layers)})")


def _margin_row(layer: str, m: dict, criteria: list[str]) -> list:
    row = [layer, m["kept"]]
    for c in criteria:
        low, high = m["spread"].get(c, (0, 0))
        row.append("-" if c not in m["accuracy"] else f"{100 * m['accuracy'][c]:.2f}"
                   + (f"±{50 * (high - low):.2f}" if high > low else ""))
    row.append(f"{100 * m['margin']:+.2f} vs {m['best_other']}"
               if m["margin"] is not None else "-")
    return row
