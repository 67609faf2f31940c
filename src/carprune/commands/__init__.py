"""One module per command: each checks its input, calls the API, prints a table and writes its
files. `run_command` imports only the command asked for (explain and compress pull in
matplotlib and ONNX)."""

from __future__ import annotations

import importlib

from ..config import (
    BenchConfig,
    CompareConfig,
    CompressConfig,
    DemoConfig,
    EvaluateConfig,
    ExplainConfig,
    PruneConfig,
    TrainConfig,
)

COMMANDS = {  # name: (its config, one line of help)
    "train": (TrainConfig, "train a zoo model and write a checkpoint"),
    "evaluate": (EvaluateConfig, "accuracy of a checkpoint, overall and per class"),
    "prune": (PruneConfig, "greedy CAR filter pruning, then fine-tuning"),
    "compare": (CompareConfig, "CAR against the other criteria, one layer at a time"),
    "bench": (BenchConfig, "fast against naive CAR: speed-up, lower bound, same picks"),
    "explain": (ExplainConfig, "which classes need each filter, what excites it, colour and "
                "diversity; one report.html"),
    "compress": (CompressConfig, "weight pruning, k-means sharing, Huffman coding into "
                 "model.carz, with a size table"),
    "demo": (DemoConfig, "the main job on the shipped network (what make demo runs)"),
}


def run_command(name: str, config) -> dict | None:
    return importlib.import_module(f"{__name__}.{name}").run(config)
