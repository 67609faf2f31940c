"""`carprune demo` (what `make demo` runs): the main job on the shipped network and data."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import io
from .data import fashion_mnist
from .errors import CarpruneError
from .train import evaluate

SHIPPED = "convnet-fmnist"
LAYERS = ["conv1", "conv2", "conv3"]


def _fresh(out: Path) -> None:
    """The demo owns its folder: a previous demo's output is replaced, anything else refused."""
    if out.exists():
        if not (out / "summary.json").is_file():
            raise CarpruneError(f"{out} exists and was not written by carprune demo; choose "
                                "another --out or remove it")
        shutil.rmtree(out)


def run_demo(out: str | Path = "runs/demo", data_dir: str | None = None) -> dict:
    from .runs import prune_run, table

    out = Path(out)
    _fresh(out)
    stages: dict[str, float] = {}
    start = time.perf_counter()
    data = fashion_mnist(data_dir)
    model = io.load(SHIPPED)
    baseline = evaluate(model, data.test, data.num_classes)
    stages["load and evaluate the baseline"] = time.perf_counter() - start
    print(f"shipped baseline {SHIPPED}: test accuracy {baseline.accuracy:.4f} "
          f"({baseline.correct}/{baseline.total})")

    start = time.perf_counter()
    result = prune_run(SHIPPED, data, LAYERS, 0.5, str(out / "prune"), finetune_epochs=2)
    stages["exact CAR, every conv layer to half, + 2 epochs fine-tuning"] = \
        time.perf_counter() - start

    summary = {"baseline_test_accuracy": baseline.accuracy, "prune": result,
               "stage_seconds": stages}
    io.write_json(out / "summary.json", summary)
    print()
    print(table([[name, f"{sec:.1f}"] for name, sec in stages.items()], ["stage", "seconds"]))
    acc = result["accuracy"]
    m = result["model"]
    print(f"baseline test accuracy {acc['test_before']:.4f}; CAR-pruned {acc['test_pruned']:.4f};"
          f" fine-tuned {acc['test_finetuned']:.4f}; params {m['params_before']} -> "
          f"{m['params_after']}, MACs {m['macs_before']} -> {m['macs_after']}")
    print(f"outputs in {out}/ (summary.json, prune/result.json, prune/model.safetensors)")
    return summary
